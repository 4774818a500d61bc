"""The GPU suite: the cuda backend against the NumPy oracle with 1 rank and with 2, 4 and 8 ranks as processes
sharing GPU 0 (one process per rank, ``jax.distributed.initialize(local_device_ids=[0])``), and one process driving
every visible GPU (the peer-access transport, tests/gpu/single_process_worker.py).

Run it with ``scripts/gpu_suite.sh`` (it starts the CUDA MPS daemon, which the ranks' spin-waiting kernels need to
run concurrently, and gives each process its share of the GPU). Each rank count starts its processes once and runs
every check of tests/gpu/mp_worker.py in them; each (rank count, check) is one test here. Environment:
  JAX_LL_EP_GPU_RANKS   rank counts to run (default "1,2,4,8")
  JAX_LL_EP_GPU_OUT     folder for per-rank logs and results (default: a temporary folder)
  JAX_LL_EP_GPU_SUITE_TIMEOUT   seconds for one rank count's whole run (default 600)
  JAX_LL_EP_GPU_CHECKS  a comma-separated subset of the checks (default: all)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

from jax_ll_ep.testing import free_port, launch_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")
RANKS = [int(r) for r in os.environ.get("JAX_LL_EP_GPU_RANKS", "1,2,4,8").split(",") if r.strip()]
CHECKS = [
    "bf16",
    "fp8",
    "skewed_and_empty",
    "topk_range",
    "t1",
    "t256",
    "hidden_7168",
    "hidden_120",
    "split_forms",
    "routing_errors",
    "delays",
    "scan_fresh_data",
    "graph_replay",
    "back_to_back",
    "put_path",
    "mesh_2d",
    "sequence_mismatch",
    "timeout",
    "mask",
    "mask_large",
    "stopped_rank_masked",
    "stopped_rank_raise_then_mask",
    "fuzz_sample",
]
SUITE_TIMEOUT_S = float(os.environ.get("JAX_LL_EP_GPU_SUITE_TIMEOUT", "600"))
# JAX_LL_EP_GPU_CHECKS: a comma-separated subset of CHECKS to run (the others are skipped)
SELECTED = [c for c in os.environ.get("JAX_LL_EP_GPU_CHECKS", "").split(",") if c] or CHECKS


def worker_env(num_ranks: int) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # one node: no network transport
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Under MPS each rank gets its share of the SMs (NVSHMEM's multi-process-per-GPU mode wants the shares to sum
    # to at most 100); without MPS the variable is ignored.
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(100 // num_ranks, 1))
    # Capture everything into command buffers (CUDA graphs), so every check also runs under graph replay.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1").strip()
    root = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_ranks(
    num_ranks: int, out_dir: str, checks=(), *, timeout_s: float = SUITE_TIMEOUT_S, prefix=(), may_die=()
) -> dict:
    """Starts one worker process per rank (``prefix`` goes before each command line, e.g. a sanitizer) and waits
    for all of them: shared fate (when one exits with an error, the others get 20 s to report their own results,
    then are killed) and a deadline. Returns {"returncodes", "results": {rank: {check: ...}}, "logs": {rank: tail}}."""
    port = free_port()
    commands = [
        [*prefix, sys.executable, WORKER, str(r), str(num_ranks), str(port), out_dir, *checks] for r in range(num_ranks)
    ]
    run = launch_ranks(
        commands, log_dir=out_dir, deadline_s=timeout_s, env=worker_env(num_ranks), grace_s=20.0, may_die=may_die
    )
    results = {}
    for r in range(num_ranks):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[r] = json.load(f)
    return {
        "returncodes": run.returncodes,
        "results": results,
        "logs": dict(enumerate(log[-3000:] for log in run.logs)),
    }


_runs: dict[int, dict] = {}


def suite(num_ranks: int) -> dict:
    if num_ranks not in _runs:
        base = os.environ.get("JAX_LL_EP_GPU_OUT") or tempfile.mkdtemp(prefix="jax_ll_ep_gpu_")
        checks = [] if SELECTED == CHECKS else SELECTED
        _runs[num_ranks] = run_ranks(num_ranks, os.path.join(base, f"ranks{num_ranks}"), checks)
    return _runs[num_ranks]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_gpu(num_ranks, check):
    if check not in SELECTED:
        pytest.skip(f"{check} not selected (JAX_LL_EP_GPU_CHECKS)")
    run = suite(num_ranks)
    problems = []
    for r in range(num_ranks):
        res = run["results"].get(r, {}).get(check)
        if res is None:
            problems.append(f"rank {r}: no result (exit code {run['returncodes'][r]}); log tail:\n{run['logs'][r]}")
        elif not res["ok"]:
            problems.append(f"rank {r}:\n{res['error']}")
    assert not problems, f"{check} with {num_ranks} ranks failed:\n" + "\n".join(problems)


@pytest.mark.parametrize("num_ranks", RANKS)
def test_gpu_processes_exit_cleanly(num_ranks):
    """Every rank finished every check and exited 0 (teardown included: close, NVSHMEM finalize at exit)."""
    run = suite(num_ranks)
    bad = {r: c for r, c in enumerate(run["returncodes"]) if c != 0}
    assert not bad, f"exit codes {bad}; log tails:\n" + "\n".join(run["logs"][r] for r in bad)


@pytest.mark.parametrize("num_ranks", [r for r in RANKS if r >= 2])
def test_gpu_killed_peer(num_ranks):
    """The last rank's process SIGKILLs itself mid-run (mp_worker.py: check_killed): the survivors go on with it
    masked, make 100 calls that equal the oracle, and exit 0; nothing hangs (the launcher's deadline)."""
    if "killed" not in SELECTED and SELECTED != CHECKS:
        pytest.skip("killed not selected (JAX_LL_EP_GPU_CHECKS)")
    base = os.environ.get("JAX_LL_EP_GPU_OUT") or tempfile.mkdtemp(prefix="jax_ll_ep_gpu_")
    out_dir = os.path.join(base, f"killed{num_ranks}")
    run = run_ranks(num_ranks, out_dir, ["killed"], timeout_s=300, may_die=(num_ranks - 1,))
    assert run["returncodes"][-1] == -9, f"the victim did not die by SIGKILL: {run['returncodes']}\n{run['logs']}"
    for r in range(num_ranks - 1):
        res = run["results"].get(r, {}).get("killed")
        assert res is not None and res["ok"], f"rank {r}: {res and res.get('error')}\n{run['logs'][r]}"
        assert run["returncodes"][r] == 0, f"rank {r} exit code {run['returncodes'][r]}:\n{run['logs'][r]}"


# ---------------------------------------------------------------------------------------------------------------
# One process driving every visible GPU (the peer-access transport; tests/gpu/single_process_worker.py)
# ---------------------------------------------------------------------------------------------------------------
SINGLE_WORKER = os.path.join(os.path.dirname(WORKER), "single_process_worker.py")
SINGLE_CHECKS = ["roundtrip", "back_to_back", "mesh_2d"]
_single: dict = {}


@pytest.mark.parametrize("check", SINGLE_CHECKS, ids=lambda c: f"1proc-{c}")
def test_single_process(check):
    if not _single:
        base = os.environ.get("JAX_LL_EP_GPU_OUT") or tempfile.mkdtemp(prefix="jax_ll_ep_gpu_")
        out_dir = os.path.join(base, "single_process")
        env = worker_env(1)
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)  # the one process may use the whole GPU(s)
        run = launch_ranks(
            [[sys.executable, SINGLE_WORKER, out_dir]], log_dir=out_dir, deadline_s=SUITE_TIMEOUT_S, env=env
        )
        path = os.path.join(out_dir, "result.json")
        _single["results"] = {}
        if os.path.exists(path):
            with open(path) as f:
                _single["results"] = json.load(f)
        _single["log"] = run.logs[0][-3000:]
        _single["returncode"] = run.returncodes[0]
    res = _single["results"].get(check)
    assert res is not None, f"no result (exit code {_single['returncode']}); log tail:\n{_single['log']}"
    assert res["ok"], res["error"]
