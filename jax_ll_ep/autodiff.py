"""The reverse-mode derivatives of the native backends' dispatch and combine, written with the forward ops
themselves so that they run on the same native path (the xla backend is differentiated by JAX itself):

  dispatch (bf16):  recv_x[slot(t,k)] = x[t]
                    => dx[t] = sum_k g[slot(t,k)]            a combine of g with unit weights
  combine:          out[t] = sum_k w[t,k] * y[slot(t,k)]
                    => dy[slot(t,k)] = w[t,k] * g[t]         a dispatch of g, scaled per row by the row's weight
                       dw[t,k] = <g[t], y[slot(t,k)]>        a per-row dot product sent back by a combine

Per-row float32 scalars (the weights forward, the weight gradients back) travel exactly inside bf16 payloads: each
scalar is split into three bfloat16 terms (hi + mid + lo), each placed in its own columns so that the float32
accumulation of combine adds only zeros to it. fp8 dispatch is forward-only.

``backend`` is a native backend (backends/native.py): ``backend.raw_dispatch`` / ``raw_combine`` are its calls
without derivative rules, ``backend.config`` its buffer's configuration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import Fp8Options
from .types import DispatchHandle

_SPLIT_TERMS = 3  # bf16 terms per float32 scalar


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


def _row_weights(backend, topk_idx, topk_weights, handle) -> jax.Array:
    """The float32 weight of every received row ([E_l, R*T]), dispatched exactly from the source tokens."""
    n, k = topk_idx.shape
    per_row, num_chunks = _chunks(backend.config.hidden, k)
    pos = handle.src_topk_pos
    chunk_of_row, col_of_row = pos // per_row, pos % per_row
    result = jnp.zeros(pos.shape, jnp.float32)
    for c in range(num_chunks):
        ks = range(c * per_row, min(k, (c + 1) * per_row))
        carrier = jnp.zeros((n, backend.config.hidden), jnp.bfloat16)
        carrier = carrier.at[:, : _SPLIT_TERMS * len(ks)].set(
            _split_bf16(topk_weights[:, ks.start : ks.stop]).reshape(n, -1)
        )
        recv, _, _ = backend.raw_dispatch(carrier, topk_idx, None)
        terms = recv[..., : _SPLIT_TERMS * per_row].reshape(*recv.shape[:2], per_row, _SPLIT_TERMS)
        picked = jnp.take_along_axis(terms, jnp.clip(col_of_row, 0, per_row - 1)[..., None, None], axis=2)[..., 0, :]
        result = jnp.where(chunk_of_row == c, _join_bf16(picked), result)
    return result


def _return_row_scalars(backend, values, topk_idx, handle) -> jax.Array:
    """Sends one float32 per received row back to its source (token, k); returns [n, K] float32."""
    n, k = topk_idx.shape
    per_row, num_chunks = _chunks(backend.config.hidden, k)
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
        carrier = jnp.zeros((*pos.shape, backend.config.hidden), jnp.bfloat16)
        carrier = carrier.at[..., : _SPLIT_TERMS * per_row].set(rows.reshape(*pos.shape, -1))
        ks = jnp.arange(k)
        unit = jnp.where((ks // per_row == c)[None, :] & (topk_idx >= 0), 1.0, 0.0).astype(jnp.float32)
        back = backend.raw_combine(carrier, topk_idx, unit, handle)
        terms = back[:, : _SPLIT_TERMS * per_row].reshape(n, per_row, _SPLIT_TERMS)
        out.append(_join_bf16(terms)[:, : min(k, (c + 1) * per_row) - c * per_row])
    return jnp.concatenate(out, axis=1)


def _valid_rows(backend, recv_count) -> jax.Array:
    rows = jnp.arange(backend.config.recv_rows)
    return rows[None, :] < recv_count[:, None]


# ---------------------------------------------------------------------------------------------------------------
# The differentiable ops of backends/native.py
# ---------------------------------------------------------------------------------------------------------------
def dispatch(backend, x, topk_idx, fp8: Fp8Options | None):
    if fp8 is not None:
        return _dispatch_fp8_forward_only(backend, x, topk_idx, fp8)

    @jax.custom_vjp
    def f(x, topk_idx):
        return backend.raw_dispatch(x, topk_idx, None)

    def fwd(x, topk_idx):
        out = backend.raw_dispatch(x, topk_idx, None)
        return out, (topk_idx, out[2])

    def bwd(res, cotangents):
        topk_idx, handle = res
        g_recv_x = cotangents[0]
        unit = jnp.where(topk_idx >= 0, 1.0, 0.0).astype(jnp.float32)
        dx = backend.raw_combine(g_recv_x.astype(jnp.bfloat16), topk_idx, unit, handle)
        return dx, None

    f.defvjp(fwd, bwd)
    return f(x, topk_idx)


def _dispatch_fp8_forward_only(backend, x, topk_idx, fp8):
    @jax.custom_vjp
    def f(x, topk_idx):
        return backend.raw_dispatch(x, topk_idx, fp8)

    def fwd(x, topk_idx):
        return f(x, topk_idx), None

    def bwd(res, cotangents):
        raise NotImplementedError(
            "jax_ll_ep.dispatch with fp8 is forward-only (the e4m3 cast has no useful derivative); differentiate "
            "a bf16 dispatch (fp8=None) instead"
        )

    f.defvjp(fwd, bwd)
    return f(x, topk_idx)


def combine(backend, y, topk_idx, topk_weights, handle: DispatchHandle):
    @jax.custom_vjp
    def f(y, topk_idx, topk_weights, handle):
        return backend.raw_combine(y, topk_idx, topk_weights, handle)

    def fwd(y, topk_idx, topk_weights, handle):
        return backend.raw_combine(y, topk_idx, topk_weights, handle), (y, topk_idx, topk_weights, handle)

    def bwd(res, g):
        y, topk_idx, topk_weights, handle = res
        recv_g, recv_count, _ = backend.raw_dispatch(g.astype(jnp.bfloat16), topk_idx, None)
        valid = _valid_rows(backend, recv_count)
        g32 = jnp.where(valid[..., None], recv_g.astype(jnp.float32), 0.0)
        w_rows = _row_weights(backend, topk_idx, topk_weights, handle)
        dy = (g32 * w_rows[..., None]).astype(y.dtype)
        row_dots = jnp.sum(g32 * y.astype(jnp.float32), axis=-1)
        dw = jnp.where(topk_idx >= 0, _return_row_scalars(backend, row_dots, topk_idx, handle), 0.0)
        return dy, None, dw, None

    f.defvjp(fwd, bwd)
    return f(y, topk_idx, topk_weights, handle)
