#!/usr/bin/env bash
# One timing round on a one-GPU machine, with the repository and its built modules (jax_ll_ep/*.so) in place:
#   benchmarks/gpu_round.sh [OUT_DIR]
# 1. makes nvshmem4py importable (as scripts/gpu_suite.sh step 1: the wheel(s) in .whl/ into a private folder),
# 2. runs `benchmarks/run.py --suite gpu --ranks 1 8 --tokens 1 16 128 256` (every method: the per-op rows, the
#    1-rank baselines at T = 1 and 128, and the loop mode at T = 1, 16, 128, 256), results in OUT_DIR,
# 3. with GPU_ROUND_NCU=1 and ncu on PATH, also profiles one rank's kernels at T = 1 and 128 as
#    docs/performance.md did (ncu --set full; reports and text pages in OUT_DIR/ncu). Off by default: it adds about
#    3 minutes.
# Correctness is scripts/gpu_suite.sh's job (run it on the same build): these numbers mean something only when it
# passes. Python: $PYTHON (default python3) with jax[cuda13] and nvidia-nvshmem-cu13 installed.
#
# Device time, estimated from the v2 run's per-row seconds (benchmarks/results/*-v2.json, H100): 1 rank ~20 s of
# start (import, copy bandwidth, stamp overheads) + 4 cuda rows x ~6 s + 8 baseline rows (xla, jax_packed,
# jax_padded, ragged_a2a at T = 1, 128) x ~8 s + 8 loop rows x ~7 s (compiling a 200-pair loop, a buffer, 6 loops
# of under 20 ms) = ~165 s; 8 ranks under MPS ~40 s of start (8 processes, NVSHMEM) + 4 rows x ~13 s = ~95 s. About
# 4.5 minutes in all, under 6 with a slow start; the run's own per-row seconds land in the JSON (`seconds`).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$(mkdir -p "${1:-build/gpu-round}" && cd "${1:-build/gpu-round}" && pwd)"
py="${PYTHON:-python3}"
source "$root/scripts/gpu_env.sh" || { echo "FAIL: nvshmem4py is not installed and .whl/ has no usable wheel"; exit 1; }
"$py" -c "import jax_ll_ep._extension as e; assert e.cuda_available(); e.cuda_module()" \
  || { echo "FAIL: the CUDA module does not load (build it here first: scripts/dev.sh build)"; exit 1; }
echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (modified)')"

label="${GPU_ROUND_LABEL:-round}"
start=$(date +%s)
"$py" benchmarks/run.py --suite gpu --ranks 1 8 --tokens 1 16 128 256 --out-dir "$out" --work-dir "$out/work" \
  --label "$label" >"$out/run.log" 2>&1
status=$?
echo "run.py: exit $status, $(($(date +%s) - start)) s (log: $out/run.log); $(grep -E '^ranks=' "$out/run.log" | tr '\n' ' ')"

if [ "${GPU_ROUND_NCU:-0}" = 1 ] && command -v ncu >/dev/null 2>&1; then
  mkdir -p "$out/ncu"
  for t in 1 128; do
    ncu --clock-control none --set full --import-source yes -k regex:'dispatch_kernel|combine_kernel' \
      --launch-skip 12 --launch-count 4 -f -o "$out/ncu/ll_t$t" \
      "$py" benchmarks/profile_ops.py --tokens "$t" --calls 12 >"$out/ncu/ncu_t$t.log" 2>&1
    ncu --import "$out/ncu/ll_t$t.ncu-rep" --page details --print-details all >"$out/ncu/details_t$t.txt" 2>&1
    ncu --import "$out/ncu/ll_t$t.ncu-rep" --page source --csv --print-source sass >"$out/ncu/src_t$t.csv" 2>&1
  done
  echo "ncu: reports and pages in $out/ncu ($(($(date +%s) - start)) s since the start)"
fi

# The tables last (the per-op table, then the loop mode's); on a failure, the end of the log.
cat "$out"/*-"$label".md 2>/dev/null || tail -n 40 "$out/run.log"
exit $status
