"""The examples run as the README says and report success: each is started as its own Python process on the cpu
platform (the way a user runs it), and its own check (against a dense or NumPy computation) must pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout_s: float = 300.0) -> str:
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_shard_map_minimal():
    assert "round trip exact: True" in run_example("shard_map_minimal.py")


@pytest.mark.parametrize("extra", [[], ["--backend", "xla", "--fp8", "ue8m0"]], ids=["auto", "xla-fp8"])
def test_moe_layer(extra):
    out = run_example("moe_layer.py", "--ranks", "4", "--tokens", "8", "--iters", "2", *extra)
    assert out.rstrip().endswith("OK") and "padding tokens combine to zero: True" in out, out


@pytest.mark.multiprocess
@pytest.mark.parametrize(("processes", "devices"), [(2, 1), (2, 2)])
def test_multiprocess(processes, devices):
    out = run_example("multiprocess.py", "--processes", str(processes), "--devices-per-process", str(devices))
    assert out.rstrip().endswith("OK"), out
    assert out.count("own tokens exact: True") == processes, out
