"""The GPU benchmark's driver (benchmarks/run.py --suite gpu) end to end on CPU devices (JAX_LL_EP_BENCH_DRY_RUN=1:
the cpu backend stands in for cuda and the stamps read zero): the programs trace, compile and run, and the result
files hold the rows the suite promises, the loop mode's included. The numbers mean nothing here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_gpu_benchmark_rows_on_cpu(tmp_path):
    env = {**os.environ, "JAX_LL_EP_BENCH_DRY_RUN": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--suite", "gpu", "--ranks", "1", "--tokens", "1", "16",
        "--methods", "cuda", "jax_packed", "cuda_loop", "jax_packed_loop",
        "--hidden", "256", "--experts", "16", "--topk", "4",
        "--calls", "2", "--executions", "1", "--warmup-calls", "0", "--sets", "2",
        "--loop-tokens", "1", "16", "--loop-iterations", "3", "--loop-repeats", "2",
        "--out-dir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result_path,) = tmp_path.glob("*.json")
    rows = json.loads(result_path.read_text())["rows"]
    got = {(r["method"], r["tokens"]) for r in rows}
    assert got == {
        ("cuda", 1),
        ("cuda", 16),
        ("jax_packed", 1),  # baselines run at --baseline-tokens (1, 128) only
        ("cuda_loop", 1),
        ("cuda_loop", 16),
        ("jax_packed_loop", 1),
        ("jax_packed_loop", 16),
    }
    for r in rows:
        assert "error" not in r, r
        if r["method"].endswith("_loop"):
            assert r["loop_iterations"] == 3 and r["loop_unrolled"] is False
            assert r["pair_us"]["samples"] == 2 and r["pair_us"]["median_us"] > 0, r
            assert "dispatch" not in r and "combine" not in r
        else:
            assert r["dispatch"]["samples"] > 0 and r["combine"]["samples"] > 0, r
    table = (tmp_path / result_path.name.replace(".json", ".md")).read_text()
    assert "| T | jax_ll_ep pair us | JAX-native packed pair us | ratio |" in table
    assert "_loop" not in table.split("Loop mode")[0]  # loop rows are not in the per-op table
