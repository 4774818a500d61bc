"""Payload builders, mesh runners and a process launcher shared by tests, examples and benchmarks; backend-agnostic.

Per-device data is handled as Python lists indexed by the device's *flat index*: devices are ordered by the mesh
axes other than the buffer's (in mesh order), then by the buffer's axis, so flat index ``i`` is rank ``i % R`` of
group ``i // R`` (one group per slice of the mesh along the other axes). A global array is the per-device arrays
stacked along axis 0 and sharded ``P((*other_axes, axis))``; :func:`shard_per_device` and
:func:`unshard_per_device` convert between the two.

    buf = Buffer(ep_mesh(8), "ep", num_experts=32, max_tokens_per_rank=16, hidden=256, backend="xla")
    rng = np.random.default_rng(0)
    xs = [self_describing_tokens(rng, r, 16, 256) for r in range(8)]
    topks = [random_routing(rng, 16, 4, 32) for _ in range(8)]
    got = run_dispatch(buf, xs, topks)          # list of dicts, one per device, keyed like tests/oracle.py

Multi-process runs (one OS process per rank or per host) go through :func:`launch_ranks`, which never hangs: a
deadline, shared fate once one process fails, every process group killed at the end, every log kept.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .buffers import Buffer
from .config import Fp8Options
from .ops import combine, dispatch
from .types import DispatchHandle, Fp8Array

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Routing and payloads
# ---------------------------------------------------------------------------------------------------------------
def random_routing(
    rng: np.random.Generator, num_tokens: int, topk: int, num_experts: int, *, drop_prob: float = 0.0
) -> np.ndarray:
    """[n, K] int32 of distinct experts per token, uniformly at random; each entry becomes -1 ("no expert") with
    probability ``drop_prob``."""
    if topk > num_experts:
        raise ValueError(f"topk={topk} distinct experts need num_experts >= topk, got {num_experts}")
    keys = rng.random((num_tokens, num_experts))
    idx = np.argsort(keys, axis=1)[:, :topk].astype(np.int32)
    if drop_prob > 0:
        idx[rng.random(idx.shape) < drop_prob] = -1
    return idx


def skewed_routing(
    rng: np.random.Generator, num_tokens: int, topk: int, num_experts: int, *, expert: int = 0
) -> np.ndarray:
    """Every token chooses ``expert`` (at a random position k); its other choices are random distinct experts.
    With every rank doing this, ``expert`` receives R*n rows: the full capacity of its layout."""
    idx = random_routing(rng, num_tokens, topk, num_experts)
    for t in range(num_tokens):
        row = [e for e in idx[t] if e != expert][: topk - 1]
        row.insert(int(rng.integers(0, topk)), expert)
        idx[t] = row
    return idx


def random_weights(rng: np.random.Generator, topk_idx: np.ndarray, *, invalid: float = np.nan) -> np.ndarray:
    """[n, K] float32 softmax weights over each token's valid choices; entries of -1 choices get ``invalid``
    (NaN by default, so a combine that reads them cannot go unnoticed)."""
    logits = rng.standard_normal(topk_idx.shape).astype(np.float32)
    logits = np.where(topk_idx >= 0, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(logits - np.max(logits, axis=1, keepdims=True))
        w = w / np.sum(w, axis=1, keepdims=True)
    return np.where(topk_idx >= 0, w, np.float32(invalid)).astype(np.float32)


def random_tokens(rng: np.random.Generator, num_tokens: int, hidden: int) -> np.ndarray:
    """[n, H] bfloat16 random values whose magnitude varies across 128-channel blocks and tokens (over ~12 binades),
    so fp8 scales differ from block to block."""
    blocks = max(hidden // 128, 1)
    magnitude = np.exp2(rng.integers(-6, 7, size=(num_tokens, blocks))).astype(np.float32)
    magnitude = np.repeat(magnitude, 128, axis=1)[:, :hidden]
    return (rng.standard_normal((num_tokens, hidden)).astype(np.float32) * magnitude).astype(BF16)


SOURCE_CHANNELS = 3  # channels 0..2 of a self-describing row: rank, token % 128, token // 128 (exact in bf16)


def self_describing_tokens(rng: np.random.Generator, rank: int, num_tokens: int, hidden: int) -> np.ndarray:
    """Random bf16 tokens whose first channels encode (source rank, token index), so a receiver can tell where
    each row came from (see :func:`decode_source`). Ranks up to 256 and tokens up to 32768 are exact."""
    x = random_tokens(rng, num_tokens, hidden)
    t = np.arange(num_tokens)
    x[:, 0] = rank
    x[:, 1] = t % 128
    x[:, 2] = t // 128
    return x


def decode_source(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source rank, source token) of bf16 rows built by :func:`self_describing_tokens`."""
    f = np.asarray(rows[..., :SOURCE_CHANNELS]).astype(np.float32).astype(np.int64)
    return f[..., 0], f[..., 1] + 128 * f[..., 2]


def poison_invalid_rows(y: np.ndarray, recv_count: np.ndarray, value: float = np.nan) -> np.ndarray:
    """A copy of [E_l, R*T, ...] ``y`` whose rows past recv_count hold ``value`` (NaN: reading one shows)."""
    y = np.array(y, copy=True)
    for e, c in enumerate(np.asarray(recv_count)):
        y[e, int(c) :] = value
    return y


# ---------------------------------------------------------------------------------------------------------------
# Meshes and sharding
# ---------------------------------------------------------------------------------------------------------------
def ep_mesh(
    num_ranks: int, axis_name: str = "ep", *, dp: int = 0, dp_axis: str = "dp", devices: Sequence | None = None
) -> Mesh:
    """A mesh over the first ``devices`` (default: ``jax.devices()``): 1-D ``(axis_name,)``, or 2-D
    ``(dp_axis, axis_name)`` when dp > 0."""
    count = num_ranks * max(dp, 1)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < count:
        raise ValueError(f"a mesh of {count} devices needs {count} devices; this process has {len(devices)}")
    if dp:
        return Mesh(np.array(devices[:count]).reshape(dp, num_ranks), (dp_axis, axis_name))
    return Mesh(np.array(devices[:count]), (axis_name,))


def device_axes(buf: Buffer) -> tuple[str, ...]:
    """The mesh axes in flat-index order: the other axes (mesh order), then the buffer's axis."""
    others = tuple(a for a in buf.mesh.axis_names if a != buf.axis_name)
    return (*others, buf.axis_name)


def device_spec(buf: Buffer) -> P:
    return P(device_axes(buf))


def num_devices(buf: Buffer) -> int:
    return buf.mesh.devices.size


def shard_per_device(buf: Buffer, arrays: Sequence[np.ndarray]) -> jax.Array:
    """Stacks one array per device (flat index order; equal shapes) along axis 0 and shards it over the mesh."""
    if len(arrays) != num_devices(buf):
        raise ValueError(f"need one array per device ({num_devices(buf)}), got {len(arrays)}")
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"per-device arrays must share one shape inside shard_map, got {sorted(shapes)}")
    stacked = np.concatenate([np.asarray(a) for a in arrays], axis=0)
    return jax.device_put(stacked, NamedSharding(buf.mesh, device_spec(buf)))


def unshard_per_device(buf: Buffer, arr: jax.Array) -> list[np.ndarray]:
    """The inverse of :func:`shard_per_device`: the global array split into per-device NumPy arrays."""
    return np.split(np.asarray(arr), num_devices(buf), axis=0)


def group_slices(buf: Buffer) -> list[slice]:
    """Flat-index slices of the independent groups (one per slice of the mesh along the other axes)."""
    r = buf.num_ranks
    return [slice(g * r, (g + 1) * r) for g in range(num_devices(buf) // r)]


def per_device_shard_map(buf: Buffer, fn: Callable) -> Callable:
    """``jax.jit(jax.shard_map(fn))`` with every argument and result sharded per device (see the module doc)."""
    spec = device_spec(buf)
    return jax.jit(jax.shard_map(fn, mesh=buf.mesh, in_specs=spec, out_specs=spec))


# ---------------------------------------------------------------------------------------------------------------
# Runners: per-device NumPy in, per-device NumPy out
# ---------------------------------------------------------------------------------------------------------------
def dispatch_outputs(outs) -> dict:
    """dispatch's results as a dict of arrays (the oracle's field names; recv_scale None without fp8)."""
    recv_x, recv_count, handle = outs
    if isinstance(recv_x, Fp8Array):
        recv_x, recv_scale = recv_x.data, recv_x.scale
    else:
        recv_scale = None
    return dict(
        recv_x=recv_x,
        recv_scale=recv_scale,
        recv_count=recv_count,
        src_info=handle.src_info,
        layout_range=handle.layout_range,
        src_topk_pos=handle.src_topk_pos,
    )


def _split_dispatch(buf: Buffer, out: dict) -> list[dict]:
    per_key = {k: (None if v is None else unshard_per_device(buf, v)) for k, v in out.items()}
    return [{k: (None if v is None else v[i]) for k, v in per_key.items()} for i in range(num_devices(buf))]


@functools.cache
def _dispatch_fn(buf: Buffer, fp8: Fp8Options | None):
    return per_device_shard_map(buf, lambda x, t: dispatch_outputs(dispatch(buf, x, t, fp8=fp8)))


@functools.cache
def _combine_fn(buf: Buffer):
    def body(y, topk_idx, weights, src_info, layout_range, src_topk_pos):
        handle = DispatchHandle(src_info, layout_range, src_topk_pos)
        return combine(buf, y, topk_idx, weights, handle)

    return per_device_shard_map(buf, body)


def run_dispatch(
    buf: Buffer, xs: Sequence[np.ndarray], topks: Sequence[np.ndarray], *, fp8: Fp8Options | None = None
) -> list[dict]:
    """Runs ``dispatch`` over the buffer's mesh. Returns one dict per device with the keys of tests/oracle.py
    (recv_x, recv_scale (None without fp8), recv_count, src_info, layout_range, src_topk_pos)."""
    out = _dispatch_fn(buf, fp8)(shard_per_device(buf, xs), shard_per_device(buf, topks))
    return _split_dispatch(buf, out)


def run_combine(
    buf: Buffer,
    ys: Sequence[np.ndarray],
    topks: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    handles: Sequence[dict],
) -> list[np.ndarray]:
    """Runs ``combine`` over the buffer's mesh with per-device expert outputs and handles (dicts with src_info,
    layout_range, src_topk_pos, e.g. from :func:`run_dispatch` or the oracle). Returns one [n, H] bf16 per
    device."""
    args = [ys, topks, weights] + [[h[k] for h in handles] for k in ("src_info", "layout_range", "src_topk_pos")]
    out = _combine_fn(buf)(*(shard_per_device(buf, a) for a in args))
    return unshard_per_device(buf, out)


def dequantize(recv_x) -> jax.Array:
    """bf16 view of a dispatch payload: the array itself, or ``data * scale`` per 128 channels for fp8."""
    if not isinstance(recv_x, Fp8Array):
        return recv_x
    scale = jnp.repeat(recv_x.scale.astype(jnp.float32), 128, axis=-1)
    return (recv_x.data.astype(jnp.float32) * scale).astype(jnp.bfloat16)


@functools.cache
def _roundtrip_fn(buf: Buffer, fp8: Fp8Options | None, expert_fn: Callable | None):
    def body(x, topk_idx, weights):
        recv_x, recv_count, handle = dispatch(buf, x, topk_idx, fp8=fp8)
        y = dequantize(recv_x) if expert_fn is None else expert_fn(recv_x, recv_count)
        out = combine(buf, y, topk_idx, weights, handle)
        return out, dispatch_outputs((recv_x, recv_count, handle))

    return per_device_shard_map(buf, body)


def run_roundtrip(
    buf: Buffer,
    xs: Sequence[np.ndarray],
    topks: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    fp8: Fp8Options | None = None,
    expert_fn: Callable | None = None,
) -> tuple[list[np.ndarray], list[dict]]:
    """dispatch -> ``expert_fn(recv_x, recv_count)`` (default: the identity, dequantized for fp8) -> combine, in
    one jitted shard_map. Returns (per-device combine outputs, per-device dispatch dicts)."""
    fn = _roundtrip_fn(buf, fp8, expert_fn)
    out, disp = fn(*(shard_per_device(buf, a) for a in (xs, topks, weights)))
    return unshard_per_device(buf, out), _split_dispatch(buf, disp)


# ---------------------------------------------------------------------------------------------------------------
# Processes: one job of several OS processes on localhost (jax.distributed), with a deadline and shared fate
# ---------------------------------------------------------------------------------------------------------------
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
) -> LaunchResult:
    """Starts one process per command (process ``i`` runs ``commands[i]``, its output in
    ``log_dir / log_name.format(i)``) and waits for all of them. Shared fate: once one exits with a failure, the
    others get ``grace_s`` seconds to finish on their own (e.g. to report their own error), then are killed; past
    ``deadline_s`` everyone is killed. Each process leads its own process group, so killing it also ends what it
    started. ``env`` is the processes' whole environment (default: this process's)."""
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
            failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
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
