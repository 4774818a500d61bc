"""Starts one jax.distributed job of N Python processes on localhost, and never hangs.

Each process runs ``script --process-id i --num-processes N --coordinator 127.0.0.1:PORT [args...]`` with its output
in its own log file. Shared fate: as soon as one process exits with a failure, the others are killed; past the
deadline, everyone is killed. The result says which process failed first and carries every log.

    result = launch(worker, 4, args=["--devices", "2"], deadline_s=240, log_dir=tmp_path)
    assert result.ok, result.report()
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    returncodes: list[int]
    logs: list[str]
    elapsed_s: float
    first_failure: int | None  # the process that failed first (None if none did)
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def report(self, tail_lines: int = 60) -> str:
        lines = [
            f"{len(self.returncodes)} processes, {self.elapsed_s:.1f} s, return codes {self.returncodes}"
            + (", DEADLINE EXCEEDED" if self.timed_out else "")
            + (f", first failure: process {self.first_failure}" if self.first_failure is not None else "")
        ]
        for i, log in enumerate(self.logs):
            tail = "\n".join(log.splitlines()[-tail_lines:])
            lines.append(f"----- process {i} (rc={self.returncodes[i]}) -----\n{tail}")
        return "\n".join(lines)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it started
        except ProcessLookupError:
            pass
    proc.wait()


def launch(
    script: str | Path,
    num_processes: int,
    *,
    args: list[str] = (),
    deadline_s: float = 300.0,
    log_dir: str | Path,
    env: dict[str, str] | None = None,
) -> Result:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    child_env = dict(os.environ)
    child_env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), child_env.get("PYTHONPATH", "")]),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    child_env.update(env or {})
    procs, files = [], []
    start = time.monotonic()
    for i in range(num_processes):
        log = open(log_dir / f"process{i}.log", "w")  # noqa: SIM115 - closed below
        files.append(log)
        cmd = [
            sys.executable,
            str(script),
            "--process-id",
            str(i),
            "--num-processes",
            str(num_processes),
            "--coordinator",
            f"127.0.0.1:{port}",
            *args,
        ]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True))
    first_failure, timed_out = None, False
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
            if failed:
                first_failure = failed[0]
                break
            if all(rc == 0 for rc in codes):
                break
            if time.monotonic() - start > deadline_s:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill(p)
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]  # negative: killed by that signal (-9: shared fate or the deadline)
    logs = [(log_dir / f"process{i}.log").read_text(errors="replace") for i in range(num_processes)]
    return Result(codes, logs, time.monotonic() - start, first_failure, timed_out)
