"""Starts one jax.distributed job of N Python processes on localhost, and never hangs.

Each process runs ``script --process-id i --num-processes N --coordinator 127.0.0.1:PORT [args...]`` on the cpu
platform, with its output in ``log_dir/process<i>.log``. The processes are run by
:func:`jax_ll_ep.testing.launch_ranks`: shared fate (as soon as one process exits with a failure, the others are
killed), a deadline, and a result that says which process failed first and carries every log.

    result = launch(worker, 4, args=["--devices", "2"], deadline_s=240, log_dir=tmp_path)
    assert result.ok, result.report()
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jax_ll_ep.testing import LaunchResult, free_port, launch_ranks

ROOT = Path(__file__).resolve().parents[2]


def launch(
    script: str | Path,
    num_processes: int,
    *,
    args: list[str] = (),
    deadline_s: float = 300.0,
    log_dir: str | Path,
    env: dict[str, str] | None = None,
    may_die: tuple[int, ...] = (),
) -> LaunchResult:
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
    common = ["--num-processes", str(num_processes), "--coordinator", f"127.0.0.1:{port}", *args]
    commands = [[sys.executable, str(script), "--process-id", str(i), *common] for i in range(num_processes)]
    return launch_ranks(
        commands, log_dir=log_dir, deadline_s=deadline_s, env=child_env, log_name="process{}.log", may_die=may_die
    )
