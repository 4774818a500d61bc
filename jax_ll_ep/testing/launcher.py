"""One job of several OS processes on localhost (``jax.distributed``), with a deadline and shared fate: it never
hangs, every process group is killed at the end, every log is kept."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a coordinator binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LaunchResult:
    returncodes: list[int]  # negative: killed by that signal (-9: shared fate or the deadline)
    logs: list[str]  # each process's whole output (stdout and stderr)
    elapsed_s: float
    first_failure: int | None  # the process seen failing first (None if none did)
    timed_out: bool  # the deadline passed with processes still running

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


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it started (e.g. under a sanitizer)
        except ProcessLookupError:
            pass
    proc.wait()


def launch_ranks(
    commands: Sequence[Sequence[str]],
    *,
    log_dir: str | Path,
    deadline_s: float,
    env: Mapping[str, str] | None = None,
    grace_s: float = 0.0,
    log_name: str = "rank{}.log",
    may_die: Sequence[int] = (),
) -> LaunchResult:
    """Starts one process per command (process ``i`` runs ``commands[i]``, its output in
    ``log_dir / log_name.format(i)``) and waits for all of them. Shared fate: once one exits with a failure, the
    others get ``grace_s`` seconds to finish on their own (e.g. to report their own error), then are killed; past
    ``deadline_s`` everyone is killed. Each process leads its own process group, so killing it also ends what it
    started. ``env`` is the processes' whole environment (default: this process's). Processes in ``may_die`` (a fault
    test's victims) do not trigger shared fate when they exit with a failure."""
    if not commands:
        raise ValueError("commands must hold at least one command line, got none")
    if deadline_s <= 0 or grace_s < 0:
        raise ValueError(f"need deadline_s > 0 and grace_s >= 0, got deadline_s={deadline_s}, grace_s={grace_s}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = [log_dir / log_name.format(i) for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    first_failure, timed_out = None, False
    start = time.monotonic()
    try:
        for cmd, path in zip(commands, paths, strict=True):
            with open(path, "w") as log:  # the child writes through its own copy of the descriptor
                procs.append(
                    subprocess.Popen(
                        [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
        stop_at = start + deadline_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, rc in enumerate(codes) if rc not in (None, 0) and i not in may_die]
            if failed and first_failure is None:
                first_failure = failed[0]
                stop_at = min(stop_at, time.monotonic() + grace_s)
            if all(rc is not None for rc in codes):
                break
            now = time.monotonic()
            if now >= stop_at:
                timed_out = now >= start + deadline_s
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill_group(p)
    logs = [path.read_text(errors="replace") for path in paths]
    return LaunchResult([p.returncode for p in procs], logs, time.monotonic() - start, first_failure, timed_out)
