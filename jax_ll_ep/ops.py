"""dispatch / combine and their split forms: the public ops, validated at trace time.

Every op runs inside ``jax.shard_map`` over the buffer's axis, once per device on its local shard:

    recv_x, recv_count, handle = dispatch(buf, x, topk_idx, fp8=None)
    y = expert_fn(recv_x, recv_count)
    out = combine(buf, y, topk_idx, topk_weights, handle)

Shapes per rank (R ranks on the axis, E experts, E_l = E/R, T = buf.max_tokens_per_rank, H = buf.hidden, K = top-k,
n = tokens passed to this call, n <= T):
  x [n, H] bfloat16 (float32 is cast); topk_idx [n, K] int32 in [-1, E) (-1: no expert); topk_weights [n, K] f32.
  recv_x [E_l, R*T, H] bfloat16, or with fp8 an Fp8Array(data [E_l, R*T, H] float8_e4m3fn, scale [E_l, R*T, H/128]).
  recv_count [E_l] int32: valid rows per local expert. Rows past it are unspecified and never read by combine.
  Row order within a local expert: by source rank, then by source token index (deterministic).
  combine's y [E_l, R*T, H] in that layout; out [n, H] bfloat16 with out[t] = sum_k w[t,k] * y[slot(t,k)] over
  k with topk_idx[t,k] >= 0, accumulated in float32 in k order (bitwise repeatable).

Reuse rules: all ranks must issue the same sequence of calls on a buffer. Inside one program that holds by
construction (every call on a buffer is ordered after the previous one). A split send must be followed by its
receive before the next send on the same buffer (on every backend; the native ones refuse a second send).

Each op validates its arguments here, at trace time, then calls the buffer's backend (jax_ll_ep/backends/).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._extension import MAX_TOPK, SCALE_BLOCK
from .buffers import Buffer
from .config import Fp8Options
from .types import CombinePending, DispatchHandle, DispatchPending


# ---------------------------------------------------------------------------------------------------------------
# Trace-time validation. Each error names the argument, the value and what is allowed.
# ---------------------------------------------------------------------------------------------------------------
def _check_context(buf: Buffer, op: str) -> None:
    if not isinstance(buf, Buffer):
        raise TypeError(f"{op}: buf must be a jax_ll_ep.Buffer, got {type(buf).__name__}")
    buf.ensure_open()
    try:
        size = jax.lax.axis_size(buf.axis_name)
    except NameError:
        size = None
    if size is None:
        raise ValueError(
            f"{op} must be called inside jax.shard_map over the buffer's mesh axis {buf.axis_name!r} (one call per "
            f"device on its local shard); axis {buf.axis_name!r} is not bound here"
        )
    if size != buf.num_ranks:
        raise ValueError(
            f"{op}: mesh axis {buf.axis_name!r} has size {size} here but the buffer was created for "
            f"{buf.num_ranks} ranks; use the buffer with the mesh it was created for"
        )


def _check_tokens(buf: Buffer, op: str, name: str, arr, *, float_ok: bool) -> jax.Array:
    arr = jnp.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] != buf.hidden:
        raise ValueError(f"{op}: {name} must have shape [n, hidden={buf.hidden}], got {tuple(arr.shape)}")
    if arr.shape[0] > buf.max_tokens_per_rank:
        raise ValueError(
            f"{op}: {name} has {arr.shape[0]} tokens but the buffer holds at most "
            f"max_tokens_per_rank={buf.max_tokens_per_rank}"
        )
    if arr.dtype == jnp.bfloat16:
        return arr
    if float_ok and arr.dtype == jnp.float32:
        return arr.astype(jnp.bfloat16)
    raise TypeError(f"{op}: {name} must be bfloat16 (float32 is cast), got {arr.dtype}")


def _check_topk(buf: Buffer, op: str, topk_idx, num_tokens: int) -> jax.Array:
    topk_idx = jnp.asarray(topk_idx)
    if topk_idx.ndim != 2 or topk_idx.shape[0] != num_tokens:
        raise ValueError(f"{op}: topk_idx must have shape [n={num_tokens}, K], got {tuple(topk_idx.shape)}")
    k = topk_idx.shape[1]
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"{op}: topk_idx has K={k} columns; allowed: 1 <= K <= {MAX_TOPK}")
    if topk_idx.dtype != jnp.int32:
        raise TypeError(f"{op}: topk_idx must be int32 with values in [-1, {buf.num_experts}), got {topk_idx.dtype}")
    return topk_idx


def _check_weights(op: str, topk_weights, shape) -> jax.Array:
    topk_weights = jnp.asarray(topk_weights)
    if tuple(topk_weights.shape) != tuple(shape):
        raise ValueError(
            f"{op}: topk_weights must have the shape of topk_idx {tuple(shape)}, got {tuple(topk_weights.shape)}"
        )
    if topk_weights.dtype != jnp.float32:
        raise TypeError(f"{op}: topk_weights must be float32, got {topk_weights.dtype}")
    return topk_weights


def _check_fp8(buf: Buffer, op: str, fp8) -> Fp8Options | None:
    if fp8 is None:
        return None
    if not isinstance(fp8, Fp8Options):
        raise TypeError(f"{op}: fp8 must be None or jax_ll_ep.Fp8Options, got {fp8!r}")
    if buf.hidden % SCALE_BLOCK:
        raise ValueError(f"{op}: fp8 dispatch needs hidden to be a multiple of {SCALE_BLOCK}; hidden={buf.hidden}")
    return fp8


def _check_layout(buf: Buffer, op: str, name: str, arr, dtype, trailing: tuple[int, ...]) -> jax.Array:
    arr = jnp.asarray(arr)
    shape = (buf.num_local_experts, buf.config.recv_rows, *trailing)
    if tuple(arr.shape) != shape:
        raise ValueError(
            f"{op}: {name} must have shape {shape} (the dispatch layout [E_l, R*T, ...]), got {tuple(arr.shape)}"
        )
    if arr.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {jnp.dtype(dtype).name}, got {arr.dtype}")
    return arr


def _check_expert_outputs(buf: Buffer, op: str, y) -> jax.Array:
    """combine's y: bfloat16 in the dispatch layout (float32 is cast, as for dispatch's x)."""
    y = jnp.asarray(y)
    if y.dtype == jnp.float32:
        y = y.astype(jnp.bfloat16)
    return _check_layout(buf, op, "y", y, jnp.bfloat16, (buf.hidden,))


def _check_handle(buf: Buffer, op: str, handle) -> DispatchHandle:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"{op}: handle must be the DispatchHandle returned by dispatch, got {type(handle).__name__}")
    e_l = buf.num_local_experts
    _check_layout(buf, op, "handle.src_info", handle.src_info, jnp.int32, ())
    _check_layout(buf, op, "handle.src_topk_pos", handle.src_topk_pos, jnp.int32, ())
    lr = jnp.asarray(handle.layout_range)
    if tuple(lr.shape) != (e_l, buf.num_ranks, 2) or lr.dtype != jnp.int32:
        raise ValueError(
            f"{op}: handle.layout_range must be int32 [{e_l}, {buf.num_ranks}, 2], got {lr.dtype}{tuple(lr.shape)}"
        )
    return handle


def _check_dispatch_args(buf: Buffer, op: str, x, topk_idx, fp8):
    _check_context(buf, op)
    x = _check_tokens(buf, op, "x", x, float_ok=True)
    topk_idx = _check_topk(buf, op, topk_idx, x.shape[0])
    return x, topk_idx, _check_fp8(buf, op, fp8)


def _check_combine_args(buf: Buffer, op: str, y, topk_idx, topk_weights, handle):
    _check_context(buf, op)
    y = _check_expert_outputs(buf, op, y)
    topk_idx = jnp.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"{op}: topk_idx must have shape [n, K], got {tuple(topk_idx.shape)}")
    if topk_idx.shape[0] > buf.max_tokens_per_rank:
        raise ValueError(
            f"{op}: topk_idx has {topk_idx.shape[0]} tokens but the buffer holds at most "
            f"max_tokens_per_rank={buf.max_tokens_per_rank}"
        )
    topk_idx = _check_topk(buf, op, topk_idx, topk_idx.shape[0])
    topk_weights = _check_weights(op, topk_weights, topk_idx.shape)
    return y, topk_idx, topk_weights, _check_handle(buf, op, handle)


# ---------------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------------
def dispatch(buf: Buffer, x, topk_idx, *, fp8: Fp8Options | None = None):
    """Sends each token to the ranks owning its top-k experts; returns ``(recv_x, recv_count, handle)``.

    Returns only after every token addressed to this rank by every rank has arrived (see docs/protocol.md).
    """
    return buf.backend.dispatch(*_check_dispatch_args(buf, "dispatch", x, topk_idx, fp8))


def combine(buf: Buffer, y, topk_idx, topk_weights, handle: DispatchHandle):
    """Sends expert outputs back to their source tokens and reduces them: ``out[t] = sum_k w[t,k] * y[slot(t,k)]``
    over valid k, in float32, in k order. Returns ``out`` [n, H] bfloat16."""
    return buf.backend.combine(*_check_combine_args(buf, "combine", y, topk_idx, topk_weights, handle))


def dispatch_send(buf: Buffer, x, topk_idx, *, fp8: Fp8Options | None = None) -> DispatchPending:
    """The send half of dispatch: returns as soon as this rank's tokens and signals are out. Work placed between
    dispatch_send and dispatch_recv overlaps the transfer. Call dispatch_recv before the next send on ``buf``."""
    return buf.backend.dispatch_send(*_check_dispatch_args(buf, "dispatch_send", x, topk_idx, fp8))


def dispatch_recv(buf: Buffer, pending: DispatchPending):
    """The receive half of dispatch: waits for every rank's tokens; returns ``(recv_x, recv_count, handle)``."""
    _check_context(buf, "dispatch_recv")
    if not isinstance(pending, DispatchPending):
        raise TypeError(f"dispatch_recv: pending must come from dispatch_send, got {type(pending).__name__}")
    return buf.backend.dispatch_recv(pending)


def combine_send(buf: Buffer, y, topk_idx, topk_weights, handle: DispatchHandle) -> CombinePending:
    """The send half of combine. Call combine_recv before the next send on ``buf``."""
    return buf.backend.combine_send(*_check_combine_args(buf, "combine_send", y, topk_idx, topk_weights, handle))


def combine_recv(buf: Buffer, pending: CombinePending):
    """The receive half of combine: waits for every expert output addressed to this rank and reduces them."""
    _check_context(buf, "combine_recv")
    if not isinstance(pending, CombinePending):
        raise TypeError(f"combine_recv: pending must come from combine_send, got {type(pending).__name__}")
    return buf.backend.combine_recv(pending)
