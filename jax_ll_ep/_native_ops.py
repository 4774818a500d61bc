"""The fused native (cpu / cuda) dispatch and combine calls, and their reverse-mode derivatives.

Derivatives, written with the forward ops themselves so they run on the same native path:
  dispatch (bf16):  recv_x[slot(t,k)] = x[t]
                    => dx[t] = sum_k g[slot(t,k)]            a combine of g with unit weights
  combine:          out[t] = sum_k w[t,k] * y[slot(t,k)]
                    => dy[slot(t,k)] = w[t,k] * g[t]         a dispatch of g, scaled per row by the row's weight
                       dw[t,k] = <g[t], y[slot(t,k)]>        a per-row dot product sent back by a combine
Per-row float32 scalars (the weights forward, the weight gradients back) travel exactly inside bf16 payloads: each
scalar is split into three bfloat16 terms (hi + mid + lo), each placed in its own columns so that the float32
accumulation of combine adds only zeros to it. fp8 dispatch is forward-only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi
from .config import SCALE_BLOCK, Fp8Options, fp8_mode_code
from .types import DispatchHandle, Fp8Array

_SPLIT_TERMS = 3  # bf16 terms per float32 scalar


def aval(like: jax.Array, shape, dtype):
    """A result type that keeps the caller's varying-manual-axes type, so shard_map's checks pass."""
    return jax.typeof(like).update(shape=tuple(shape), dtype=jnp.dtype(dtype), weak_type=False)


def ticket_aval(like):
    return aval(like, (1,), jnp.int32)


def dispatch_result_avals(buf, like: jax.Array, fp8: Fp8Options | None):
    e_l, rows, h, r = buf.num_local_experts, buf.config.recv_rows, buf.hidden, buf.num_ranks
    data_dtype = jnp.float8_e4m3fn if fp8 is not None else jnp.bfloat16
    if fp8 is None:
        scale = aval(like, (1,), jnp.float32)  # unused placeholder result
    else:
        scale_dtype = jnp.float8_e8m0fnu if fp8.scale_format == "ue8m0" else jnp.float32
        scale = aval(like, (e_l, rows, h // SCALE_BLOCK), scale_dtype)
    return [
        aval(like, (e_l, rows, h), data_dtype),
        scale,
        aval(like, (e_l,), jnp.int32),
        aval(like, (e_l, rows), jnp.int32),
        aval(like, (e_l, r, 2), jnp.int32),
        aval(like, (e_l, rows), jnp.int32),
    ]


def pack_dispatch(outs, fp8: Fp8Options | None):
    recv_x, recv_scale, recv_count, src_info, layout_range, src_topk_pos = outs
    if fp8 is not None:
        recv_x = Fp8Array(recv_x, recv_scale)
    return recv_x, recv_count, DispatchHandle(src_info, layout_range, src_topk_pos)


def _raw_dispatch(buf, x, topk_idx, fp8):
    outs = _ffi.native_call(
        "jax_ll_ep_dispatch",
        [x, topk_idx],
        dispatch_result_avals(buf, x, fp8),
        buffer_id=buf.handle,
        fp8_mode=np.int32(fp8_mode_code(fp8)),
    )
    return pack_dispatch(outs, fp8)


def _raw_combine(buf, y, topk_idx, topk_weights, handle):
    (out,) = _ffi.native_call(
        "jax_ll_ep_combine",
        [y, handle.src_info, handle.layout_range, handle.src_topk_pos, topk_idx, topk_weights],
        [aval(y, (topk_idx.shape[0], buf.hidden), jnp.bfloat16)],
        buffer_id=buf.handle,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exact transport of float32 scalars inside bf16 rows.
# ---------------------------------------------------------------------------------------------------------------
def _split_bf16(v: jax.Array) -> jax.Array:
    """float32 [...] -> bf16 [..., 3] with hi + mid + lo == v up to float32 rounding."""
    hi = v.astype(jnp.bfloat16)
    r1 = v - hi.astype(jnp.float32)
    mid = r1.astype(jnp.bfloat16)
    lo = (r1 - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.stack([hi, mid, lo], axis=-1)


def _join_bf16(parts: jax.Array) -> jax.Array:
    p = parts.astype(jnp.float32)
    return (p[..., 0] + p[..., 1]) + p[..., 2]


def _chunks(hidden: int, k: int) -> tuple[int, int]:
    """(scalars per row, number of rows needed) to carry k scalars per token in rows of `hidden` bf16."""
    per_row = hidden // _SPLIT_TERMS
    return per_row, -(-k // per_row)


def _row_weights(buf, topk_idx, topk_weights, handle) -> jax.Array:
    """The float32 weight of every received row ([E_l, R*T]), dispatched exactly from the source tokens."""
    n, k = topk_idx.shape
    per_row, num_chunks = _chunks(buf.hidden, k)
    pos = handle.src_topk_pos
    chunk_of_row, col_of_row = pos // per_row, pos % per_row
    result = jnp.zeros(pos.shape, jnp.float32)
    for c in range(num_chunks):
        ks = range(c * per_row, min(k, (c + 1) * per_row))
        carrier = jnp.zeros((n, buf.hidden), jnp.bfloat16)
        carrier = carrier.at[:, : _SPLIT_TERMS * len(ks)].set(
            _split_bf16(topk_weights[:, ks.start : ks.stop]).reshape(n, -1)
        )
        recv, _, _ = _raw_dispatch(buf, carrier, topk_idx, None)
        terms = recv[..., : _SPLIT_TERMS * per_row].reshape(*recv.shape[:2], per_row, _SPLIT_TERMS)
        picked = jnp.take_along_axis(terms, jnp.clip(col_of_row, 0, per_row - 1)[..., None, None], axis=2)[..., 0, :]
        result = jnp.where(chunk_of_row == c, _join_bf16(picked), result)
    return result


def _return_row_scalars(buf, values, topk_idx, handle) -> jax.Array:
    """Sends one float32 per received row back to its source (token, k); returns [n, K] float32."""
    n, k = topk_idx.shape
    per_row, num_chunks = _chunks(buf.hidden, k)
    pos = handle.src_topk_pos
    col_of_row = pos % per_row
    split = _split_bf16(values)  # [E_l, R*T, 3]
    cols = jnp.arange(per_row)
    out = []
    for c in range(num_chunks):
        in_chunk = (pos // per_row) == c
        # Row j carries its terms in columns of its own k; every other column is zero, so combine's float32
        # accumulation over k adds only zeros to each term and returns it exactly.
        onehot = (cols[None, None, :] == col_of_row[..., None]) & in_chunk[..., None]
        rows = jnp.where(onehot[..., None], split[..., None, :], jnp.zeros((), jnp.bfloat16))
        carrier = jnp.zeros((*pos.shape, buf.hidden), jnp.bfloat16)
        carrier = carrier.at[..., : _SPLIT_TERMS * per_row].set(rows.reshape(*pos.shape, -1))
        ks = jnp.arange(k)
        unit = jnp.where((ks // per_row == c)[None, :] & (topk_idx >= 0), 1.0, 0.0).astype(jnp.float32)
        back = _raw_combine(buf, carrier, topk_idx, unit, handle)
        terms = back[:, : _SPLIT_TERMS * per_row].reshape(n, per_row, _SPLIT_TERMS)
        out.append(_join_bf16(terms)[:, : min(k, (c + 1) * per_row) - c * per_row])
    return jnp.concatenate(out, axis=1)


def _valid_rows(buf, recv_count) -> jax.Array:
    rows = jnp.arange(buf.config.recv_rows)
    return rows[None, :] < recv_count[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Differentiable entry points used by ops.py
# ---------------------------------------------------------------------------------------------------------------
def dispatch(buf, x, topk_idx, fp8: Fp8Options | None):
    if fp8 is not None:
        return _dispatch_fp8_forward_only(buf, x, topk_idx, fp8)

    @jax.custom_vjp
    def f(x, topk_idx):
        return _raw_dispatch(buf, x, topk_idx, None)

    def fwd(x, topk_idx):
        out = _raw_dispatch(buf, x, topk_idx, None)
        return out, (topk_idx, out[2])

    def bwd(res, cotangents):
        topk_idx, handle = res
        g_recv_x = cotangents[0]
        unit = jnp.where(topk_idx >= 0, 1.0, 0.0).astype(jnp.float32)
        dx = _raw_combine(buf, g_recv_x.astype(jnp.bfloat16), topk_idx, unit, handle)
        return dx, None

    f.defvjp(fwd, bwd)
    return f(x, topk_idx)


def _dispatch_fp8_forward_only(buf, x, topk_idx, fp8):
    @jax.custom_vjp
    def f(x, topk_idx):
        return _raw_dispatch(buf, x, topk_idx, fp8)

    def fwd(x, topk_idx):
        return f(x, topk_idx), None

    def bwd(res, cotangents):
        raise NotImplementedError(
            "jax_ll_ep.dispatch with fp8 is forward-only (the e4m3 cast has no useful derivative); differentiate "
            "a bf16 dispatch (fp8=None) instead"
        )

    f.defvjp(fwd, bwd)
    return f(x, topk_idx)


def combine(buf, y, topk_idx, topk_weights, handle: DispatchHandle):
    @jax.custom_vjp
    def f(y, topk_idx, topk_weights, handle):
        return _raw_combine(buf, y, topk_idx, topk_weights, handle)

    def fwd(y, topk_idx, topk_weights, handle):
        return _raw_combine(buf, y, topk_idx, topk_weights, handle), (y, topk_idx, topk_weights, handle)

    def bwd(res, g):
        y, topk_idx, topk_weights, handle = res
        recv_g, recv_count, _ = _raw_dispatch(buf, g.astype(jnp.bfloat16), topk_idx, None)
        valid = _valid_rows(buf, recv_count)
        g32 = jnp.where(valid[..., None], recv_g.astype(jnp.float32), 0.0)
        w_rows = _row_weights(buf, topk_idx, topk_weights, handle)
        dy = (g32 * w_rows[..., None]).astype(y.dtype)
        row_dots = jnp.sum(g32 * y.astype(jnp.float32), axis=-1)
        dw = jnp.where(topk_idx >= 0, _return_row_scalars(buf, row_dots, topk_idx, handle), 0.0)
        return dy, None, dw, None

    f.defvjp(fwd, bwd)
    return f(y, topk_idx, topk_weights, handle)
