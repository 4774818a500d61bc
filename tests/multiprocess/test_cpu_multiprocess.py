"""The cpu backend across OS processes: pytest starts 2 and 4 processes on localhost (jax.distributed, 1 and 2 CPU
devices each) that share one POSIX shared-memory buffer; worker_cpu.py runs the checks in every process (exact
results against the oracle, slow ranks, back-to-back calls in lax.scan, a 2-D mesh, diverging call sequences, a
process that never calls). launch.py gives each run a deadline and shared fate, so a failure never hangs."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import launch

WORKER = Path(__file__).with_name("worker_cpu.py")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("num_processes", "devices"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_cpu_backend_across_processes(tmp_path, num_processes, devices):
    result = launch(WORKER, num_processes, args=["--devices", str(devices)], deadline_s=300, log_dir=tmp_path)
    assert result.ok, result.report()
    assert all("WORKER OK" in log for log in result.logs), result.report()


@pytest.mark.multiprocess
def test_launcher_shares_fate(tmp_path):
    """Process 1 fails at once while process 0 would sleep for 10 minutes: the launcher returns within seconds,
    names process 1, and kills process 0."""
    result = launch(WORKER, 2, args=["--scenarios", "fail"], deadline_s=120, log_dir=tmp_path)
    assert not result.ok and result.first_failure == 1, result.report()
    assert result.returncodes[0] == -9 and result.elapsed_s < 60, result.report()
    assert "fails on purpose" in result.logs[1]
