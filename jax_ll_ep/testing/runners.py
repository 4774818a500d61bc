"""Meshes, per-device sharding and runners: per-device NumPy arrays in, per-device NumPy arrays out.

Per-device data is handled as Python lists indexed by the device's *flat index*: devices are ordered by the mesh
axes other than the buffer's (in mesh order), then by the buffer's axis, so flat index ``i`` is rank ``i % R`` of
group ``i // R`` (one group per slice of the mesh along the other axes). A global array is the per-device arrays
stacked along axis 0 and sharded ``P((*other_axes, axis))``; :func:`shard_per_device` and
:func:`unshard_per_device` convert between the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..buffers import Buffer
from ..config import Fp8Options
from ..ops import combine, combine_recv, combine_send, dispatch, dispatch_recv, dispatch_send
from ..types import DispatchHandle, Fp8Array


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


def split_dispatch_outputs(buf: Buffer, out: dict) -> list[dict]:
    """The sharded dict of :func:`dispatch_outputs` as one dict of NumPy arrays per device."""
    per_key = {k: (None if v is None else unshard_per_device(buf, v)) for k, v in out.items()}
    return [{k: (None if v is None else v[i]) for k, v in per_key.items()} for i in range(num_devices(buf))]


@functools.cache
def dispatch_fn(buf: Buffer, fp8: Fp8Options | None):
    """The jitted per-device dispatch of :func:`run_dispatch` (sharded in, sharded dict out)."""
    return per_device_shard_map(buf, lambda x, t: dispatch_outputs(dispatch(buf, x, t, fp8=fp8)))


@functools.cache
def combine_fn(buf: Buffer):
    """The jitted per-device combine of :func:`run_combine`: (y, topk_idx, weights, src_info, layout_range,
    src_topk_pos), all sharded, -> out."""

    def body(y, topk_idx, weights, src_info, layout_range, src_topk_pos):
        handle = DispatchHandle(src_info, layout_range, src_topk_pos)
        return combine(buf, y, topk_idx, weights, handle)

    return per_device_shard_map(buf, body)


def run_dispatch(
    buf: Buffer, xs: Sequence[np.ndarray], topks: Sequence[np.ndarray], *, fp8: Fp8Options | None = None
) -> list[dict]:
    """Runs ``dispatch`` over the buffer's mesh. Returns one dict per device with the keys of tests/oracle.py
    (recv_x, recv_scale (None without fp8), recv_count, src_info, layout_range, src_topk_pos)."""
    out = dispatch_fn(buf, fp8)(shard_per_device(buf, xs), shard_per_device(buf, topks))
    return split_dispatch_outputs(buf, out)


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
    out = combine_fn(buf)(*(shard_per_device(buf, a) for a in args))
    return unshard_per_device(buf, out)


def dequantize(recv_x) -> jax.Array:
    """bf16 view of a dispatch payload: the array itself, or ``data * scale`` per 128 channels for fp8."""
    if not isinstance(recv_x, Fp8Array):
        return recv_x
    scale = jnp.repeat(recv_x.scale.astype(jnp.float32), 128, axis=-1)
    return (recv_x.data.astype(jnp.float32) * scale).astype(jnp.bfloat16)


@functools.cache
def roundtrip_fn(buf: Buffer, fp8: Fp8Options | None, expert_fn: Callable | None, split: bool = False):
    """The jitted per-device round trip of :func:`run_roundtrip`: (x, topk_idx, weights) -> (out, dispatch dict)."""

    def body(x, topk_idx, weights):
        if split:
            recv_x, recv_count, handle = dispatch_recv(buf, dispatch_send(buf, x, topk_idx, fp8=fp8))
        else:
            recv_x, recv_count, handle = dispatch(buf, x, topk_idx, fp8=fp8)
        y = dequantize(recv_x) if expert_fn is None else expert_fn(recv_x, recv_count)
        if split:
            out = combine_recv(buf, combine_send(buf, y, topk_idx, weights, handle))
        else:
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
    split: bool = False,
) -> tuple[list[np.ndarray], list[dict]]:
    """dispatch -> ``expert_fn(recv_x, recv_count)`` (default: the identity, dequantized for fp8) -> combine, in
    one jitted shard_map; with ``split``, through the split forms (send, then receive, of each op). Returns
    (per-device combine outputs, per-device dispatch dicts)."""
    fn = roundtrip_fn(buf, fp8, expert_fn, split)
    out, disp = fn(*(shard_per_device(buf, a) for a in (xs, topks, weights)))
    return unshard_per_device(buf, out), split_dispatch_outputs(buf, disp)
