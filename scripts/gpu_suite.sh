#!/usr/bin/env bash
# The whole GPU suite in one command on a one-GPU machine:
#   scripts/gpu_suite.sh [OUT_DIR]
# 1. makes nvshmem4py importable (installs the wheel(s) in .whl/ into a private folder when it is missing),
# 2. builds the native modules, or brings them up to date (CMake + the image's nvcc),
# 3. starts the CUDA MPS daemon (private pipe/log folders) so that several rank processes share the GPU
#    concurrently; each rank gets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 / ranks,
# 4. runs tests/gpu with 1 rank and with 2, 4 and 8 ranks (JAX_LL_EP_GPU_RANKS overrides), and one process
#    driving every visible GPU (the peer-access transport),
# 5. stops MPS and runs compute-sanitizer (memcheck, racecheck) on a small 2-rank case,
# 6. prints a summary. Logs and results go to OUT_DIR (default build/gpu-suite).
# JAX_LL_EP_GPU_RANKS (default 1,2,4,8) picks the rank counts; JAX_LL_EP_GPU_SANITIZER=0 skips step 5, and
# JAX_LL_EP_GPU_SANITIZER_TOOLS (default "memcheck racecheck") picks its tools; JAX_LL_EP_GPU_TESTS (default tests/gpu)
# the pytest paths of step 4 (e.g. tests/gpu/test_gpu_suite.py::test_gpu, with JAX_LL_EP_GPU_CHECKS, for a re-run).
# Python: $PYTHON (default python3) with jax[cuda13], nvidia-nvshmem-cu13, cuda-core and pytest installed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$(mkdir -p "${1:-build/gpu-suite}" && cd "${1:-build/gpu-suite}" && pwd)"
py="${PYTHON:-python3}"
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

# 1. the GPU environment and nvshmem4py
source "$root/scripts/gpu_env.sh" || { note "FAIL: nvshmem4py is not installed and .whl/ has no usable wheel"; exit 1; }
note "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
note "versions: $("$py" -c 'import jax, nvshmem, cuda.core as c, importlib.metadata as m; print("jax", jax.__version__, "| nvshmem4py", nvshmem.__version__ if hasattr(nvshmem, "__version__") else m.version("nvshmem4py-cu13"), "| cuda.core", m.version("cuda-core"), "| nvidia-nvshmem-cu13", m.version("nvidia-nvshmem-cu13"))' 2>&1 | tail -1)"

# 2. the native modules, built or brought up to date on every run (the build is incremental, and a module left by an
#    earlier checkout would load but not match these sources), then loaded once
#    (JAX_LL_EP_GPU_PREBUILT=1: use the modules in jax_ll_ep/ as they are, e.g. built from these sources on another
#    machine with the same jaxlib, NVSHMEM and nvcc, and carried here; saves the build's minute of GPU-machine time)
if [ "${JAX_LL_EP_GPU_PREBUILT:-0}" = 1 ]; then
  note "using the prebuilt modules: $(ls jax_ll_ep/*.so 2>/dev/null | tr '\n' ' ')"
else
  nvshmem_dir="$("$py" -c 'import nvidia.nvshmem as m; print(m.__path__[0])')"
  { cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$py")" \
      -DJAX_LL_EP_CUDA=ON -DNVSHMEM_DIR="$nvshmem_dir" -DCMAKE_INSTALL_PREFIX="$root" \
      && cmake --build build/gpu -j "$(nproc)" && cmake --install build/gpu; } >"$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; note "FAIL: build (see $out/build.log)"; exit 1; }
fi
"$py" -c "import jax_ll_ep._extension as e; assert e.cuda_available(), 'cuda backend unavailable'; e.cuda_module()" \
  >"$out/import.log" 2>&1 || { tail -5 "$out/import.log"; note "FAIL: the cuda backend is not available"; exit 1; }

# 3. MPS, stopped on any exit
mps="$(mktemp -d)"
export CUDA_MPS_PIPE_DIRECTORY="$mps/pipe" CUDA_MPS_LOG_DIRECTORY="$mps/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
stop_mps() { [ -n "${mps_on:-}" ] && echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; mps_on=; }
trap stop_mps EXIT
nvidia-cuda-mps-control -d && mps_on=1 || note "WARNING: MPS did not start; ranks will time-slice"

# 4. the suite
status=0
JAX_LL_EP_GPU_OUT="$out/runs" "$py" -m pytest ${JAX_LL_EP_GPU_TESTS:-tests/gpu} -m gpu -p no:cacheprovider -q -rfE \
  --junitxml="$out/junit.xml" -o "junit_family=xunit2" >"$out/pytest.log" 2>&1 || status=1
tail -25 "$out/pytest.log"
"$py" - "$out/junit.xml" <<'EOF' | tee -a "$summary"
import collections, sys, xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
table = collections.defaultdict(lambda: [0, 0, []])
for c in cases:
    name = c.get("name")  # test_gpu[RANKS-CHECK] or test_gpu_processes_exit_cleanly[RANKS]
    ranks = name[name.index("[") + 1 : -1].split("-")[0] if "[" in name else "?"
    bad = c.find("failure") is not None or c.find("error") is not None
    skipped = c.find("skipped") is not None
    row = table[f"ranks={ranks} {'clean exit' if 'exit' in name else 'checks'}"]
    if bad:
        row[1] += 1
        row[2].append(name)
    elif not skipped:
        row[0] += 1
for key, (ok, bad, names) in sorted(table.items()):
    print(f"{key}: {ok} passed, {bad} failed" + (f" ({', '.join(names)})" if names else ""))
EOF
stop_mps

# 5. compute-sanitizer on a small 2-rank case (without MPS: the tools instrument each process on its own)
[ "${JAX_LL_EP_GPU_SANITIZER:-1}" = 0 ] && tools="" || tools="${JAX_LL_EP_GPU_SANITIZER_TOOLS:-memcheck racecheck}"
for tool in $tools; do
  dir="$out/sanitizer-$tool"
  "$py" - "$dir" "$tool" <<'EOF' >>"$out/sanitizer.log" 2>&1
import os, sys
sys.path.insert(0, "tests/gpu")
from test_gpu_suite import run_ranks
out_dir, tool = sys.argv[1], sys.argv[2]
# Host API errors are not ours to judge (cuda-python probes driver entry points that do not exist, and the
# sanitizer counts each); kernel memory errors and shared-memory hazards are.
prefix = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "86", "--target-processes", "all",
          "--report-api-errors", "no"]
os.environ["JAX_LL_EP_FUZZ_CASES"] = "8"  # (a sample of the sample: the tools slow every kernel down)
run = run_ranks(2, out_dir, ["bf16", "fp8", "split_forms", "mask", "fuzz_sample"], timeout_s=600, prefix=prefix)
print(tool, "exit codes", run["returncodes"])
for r, res in sorted(run["results"].items()):
    print(tool, "rank", r, {k: v["ok"] for k, v in res.items()})
EOF
  codes="$(grep "^$tool exit codes" "$out/sanitizer.log" | tail -1)"
  errors="$(cat "$dir"/rank*.log 2>/dev/null | grep -E "(ERROR|RACECHECK) SUMMARY" | sort | uniq -c | tr -s ' ' | head -3)"
  note "sanitizer $tool: ${codes:-no result} | ${errors:-no summary line}"
  [[ "$codes" == *"[0, 0]"* ]] || status=1
done

note "GPU suite: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (logs in $out)"
exit $status
