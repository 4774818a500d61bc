"""The loop mode's programs, shared by gpu_worker.py (timed) and profile_loop.py (traced): the pair as a model calls
it, for jax_ll_ep and for the JAX-native packed pair, and the jitted fori_loop of dependent pairs around either.
Imports jax_ll_ep from sys.path as the caller set it (run.py --package-root puts another build first)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ll_ep as ep


def weighted_sum(rows, w):
    """rows [n, K, H] -> bf16 [n, H], float32 accumulation in k order."""
    acc = jnp.zeros((rows.shape[0], rows.shape[2]), jnp.float32)
    for k in range(rows.shape[1]):
        acc = acc + w[:, k, None] * rows[:, k].astype(jnp.float32)
    return acc.astype(jnp.bfloat16)


def native_pair(buf):
    """x -> combine(dispatch(x)): bf16 dispatch, the received rows themselves as the experts' outputs."""

    def pair(x, t, w):
        recv_x, _, handle = ep.dispatch(buf, x, t)
        return ep.combine(buf, recv_x, t, w, handle)

    return pair


def jax_packed_pair(experts):
    """The JAX-native packed pair in bf16: argsort + gather into [n*K, H] (and the per-expert counts), then the
    inverse permutation and the weighted sum in k order (the contract's rounding), as ``jax_packed`` without fp8."""

    def pair(x, t, w):
        n, k = t.shape
        flat = t.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        counts = jnp.bincount(flat, length=experts)
        rows = x[order // k]
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        out = weighted_sum(rows[inv].reshape(n, k, -1), w)
        # counts feed the result (by a value that is always 0) so that XLA keeps the whole dispatch
        return out + (jnp.min(counts) * 0).astype(out.dtype)

    return pair


def loop_program(m: Mesh, axis: str, pair, iters: int, *, unroll: bool = False):
    """One jitted fori_loop of `iters` pairs, each consuming the previous pair's output (weights sum to 1, so the
    values stay bounded). unroll=True: one straight program of `iters` pairs, no loop counter."""

    def body(x, t, w):
        return jax.lax.fori_loop(0, iters, lambda _, xc: pair(xc, t, w), x, unroll=unroll)

    return jax.jit(jax.shard_map(body, mesh=m, in_specs=(P(axis),) * 3, out_specs=P(axis)))
