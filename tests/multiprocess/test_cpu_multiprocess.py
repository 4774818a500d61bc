"""The cpu backend across OS processes: pytest starts 2 and 4 processes on localhost (jax.distributed, 1 and 2 CPU
devices each) that share one POSIX shared-memory buffer; worker_cpu.py runs the checks in every process (exact
results against the oracle, slow ranks, back-to-back calls in lax.scan, a 2-D mesh, diverging call sequences, a
process that never calls), and a process killed with SIGKILL mid-run. launch.py gives each run a deadline and shared
fate, so a failure never hangs."""

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


@pytest.mark.multiprocess
@pytest.mark.parametrize("on_timeout", ["raise", "mask"])
@pytest.mark.parametrize("devices", [1, 2])
def test_survivors_of_a_killed_process_go_on(tmp_path, on_timeout, devices):
    """The last of 3 processes SIGKILLs itself at a random moment of a run of back-to-back round trips. Each
    survivor's next call ends within timeout_s (a ProtocolTimeoutError, or with on_timeout="mask" the dead ranks
    masked); the survivors then mask the dead ranks together and make 100 further calls that match the oracle for the
    live experts, and exit 0. The launcher's deadline proves that nothing hangs."""
    result = launch(
        WORKER,
        3,
        args=["--devices", str(devices), "--scenarios", "killed", "--on-timeout", on_timeout],
        deadline_s=180,
        log_dir=tmp_path,
        may_die=(2,),
    )
    assert not result.timed_out and result.returncodes[:2] == [0, 0], result.report()
    assert result.returncodes[2] == -9, result.report()  # the victim died by its own SIGKILL
    for log in result.logs[:2]:
        assert "WORKER OK" in log and "100 calls after the fault matched the oracle" in log, result.report()
        want = "RanksMaskedError" if on_timeout == "mask" else "ProtocolTimeoutError"
        assert f"({want})" in log, result.report()


@pytest.mark.multiprocess
def test_a_late_rank_cannot_reach_the_calls_of_those_that_masked_it(tmp_path):
    """on_timeout="mask", timeout_s = 2 s: the last of 3 processes sleeps 4 s inside a call before sending anything.
    The others mask it and go on; it then wakes and writes that call's tokens and its next combine's rows into their
    regions while they keep calling: every one of their calls (thousands) still equals the oracle for the live
    experts. Then all three restore it and 20 calls with everyone are exact."""
    result = launch(WORKER, 3, args=["--devices", "1", "--scenarios", "late"], deadline_s=180, log_dir=tmp_path)
    assert result.ok, result.report()
    assert "wrote its late calls" in result.logs[2] and "masked (0, 1) in turn" in result.logs[2], result.report()
    for log in result.logs[:2]:
        assert "without the late rank over" in log and "all exact" in log, result.report()
    assert all("20 calls with every rank exact" in log for log in result.logs), result.report()
