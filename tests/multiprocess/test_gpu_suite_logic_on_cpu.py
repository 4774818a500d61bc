"""The GPU suite's own logic (tests/gpu/mp_worker.py: input sharding, oracle comparisons, the timeout and refusal
checks, teardown) run by its real driver on the cpu backend, 2 CPU processes: so that a change to the suite is
caught on a machine without a GPU, before the suite next runs on one (JAX_LL_EP_SUITE_BACKEND=cpu)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))
from test_gpu_suite import run_ranks  # noqa: E402

# (routing_errors is left out: it asserts the cuda backend's way of reporting, where the call completes and a later
# call or buf.check() raises; the cpu backend fails the call itself)
# (fuzz_sample runs without its bad ids here: they fail a cpu call on one rank, whose peers would then wait for it)
CHECKS = [
    "bf16",
    "fp8",
    "split_forms",
    "sequence_mismatch",
    "timeout",
    "mask",
    "stopped_rank_masked",
    "stopped_rank_raise_then_mask",
    "fuzz_sample",
]


@pytest.mark.multiprocess
def test_gpu_suite_checks_pass_on_the_cpu_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_LL_EP_SUITE_BACKEND", "cpu")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    run = run_ranks(2, str(tmp_path), CHECKS, timeout_s=400)
    assert run["returncodes"] == [0, 0], run["logs"]
    for rank in range(2):
        results = run["results"].get(rank, {})
        assert sorted(results) == sorted(CHECKS), (rank, sorted(results), run["logs"][rank])
        failed = {name: res["error"] for name, res in results.items() if not res["ok"]}
        assert not failed, (rank, failed)


@pytest.mark.multiprocess
def test_gpu_suite_killed_peer_check_passes_on_the_cpu_backend(tmp_path, monkeypatch):
    """The GPU suite's killed-peer check (3 ranks, the last SIGKILLs itself) with its driver's expectations."""
    monkeypatch.setenv("JAX_LL_EP_SUITE_BACKEND", "cpu")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    run = run_ranks(3, str(tmp_path), ["killed"], timeout_s=300, may_die=(2,))
    assert run["returncodes"] == [0, 0, -9], run["logs"]
    for rank in range(2):
        result = run["results"].get(rank, {}).get("killed")
        assert result is not None and result["ok"], (rank, result, run["logs"][rank])
