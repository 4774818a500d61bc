"""The ``xla`` backend: dispatch and combine in pure JAX, over ``jax.lax.all_to_all``.

ops.py calls :func:`dispatch` and :func:`combine` inside ``jax.shard_map`` over the buffer's axis, on this rank's
local shard, after validating shapes and dtypes. The results follow the contract of DESIGN.md section 3 bit for bit
(the same as the ``cpu`` and ``cuda`` backends and the NumPy oracle in tests/oracle.py).

How it works. Each (token, choice k) is one *slot*. A rank builds a send buffer of [R, n, K] slots, where slot
(d, t, k) carries token t if its k-th expert lives on rank d: a fixed capacity of n <= T slots per (destination rank,
k), so nothing can ever be dropped. One ``all_to_all`` moves the buffer (payload plus each slot's local expert id);
the receiver then computes, from the ids alone, where each arrived slot goes in the [E_l, R*T, ...] layout (by source
rank, then source token) and moves the payload there with one gather. Combine builds the inverse map from the handle,
gathers the expert outputs back into [R, n, K] slots, sends them home with one ``all_to_all`` and reduces them in
float32 in k order.

Data moves only by gathers (whose transpose is a scatter-add), so ``jax.grad`` through bf16 dispatch and through
combine is plain JAX autodiff. FP8 dispatch is forward-only and raises if differentiated.

Floating point: the contract fixes every rounding step, and XLA rewrites some of them unless told not to:
  - ``a / broadcast(c)`` becomes ``a * broadcast(1 / c)`` (the simplifier, every platform), and XLA:GPU lowers
    float32 division to ``div.full``, which may be 2 ulp off; the two divisions of fp8 quantization are therefore
    done by integer long division of the significands (:func:`_divide_rn`), exact everywhere;
  - XLA:CPU lets LLVM contract ``acc + w * y`` into an FMA ("always allow FMA fusion"), which skips the rounding of
    the product; the products are therefore materialized behind an ``optimization_barrier`` before the adds;
  - ``0 + p`` is simplified to ``p``, which is wrong for ``p = -0.0`` (IEEE gives +0.0); the initial zero
    accumulator crosses the same barrier.
tests/test_reference.py checks each of them against the oracle bit for bit (on GPU too, marked ``gpu``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .config import SCALE_BLOCK, BufferConfig, Fp8Options
from .types import DispatchHandle, Fp8Array

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # keeps the scale of an all-zero block finite


# ---------------------------------------------------------------------------------------------------------------
# FP8 quantization
# ---------------------------------------------------------------------------------------------------------------
def _split_positive_normal(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(24-bit integer significand with its hidden bit, unbiased exponent - 23) of positive normal float32 v."""
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    significand = jnp.bitwise_or(jnp.bitwise_and(bits, 0x7FFFFF), 0x800000)
    return significand, jnp.right_shift(bits, 23) - 127 - 23


def _divide_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` rounded to nearest even, for positive normal float32 operands with a normal quotient.

    Computed by integer long division of the significands, so it is the IEEE quotient on every platform: XLA's
    simplifier turns a division by a broadcast scalar into a multiplication by its reciprocal, and XLA:GPU lowers
    float32 division to ``div.full`` (up to 2 ulp off); neither is the contract's rounding.
    """
    ma, ea = _split_positive_normal(a)
    mb, eb = _split_positive_normal(b)
    # Align so that ma / mb is in [1, 2): the quotient's leading bit is then the first bit produced.
    shift = (ma < mb).astype(jnp.int32)
    rem = jnp.left_shift(ma, shift)  # < 2^25
    exponent = ea - eb - shift

    def step(_, carry):  # one significand bit per step, most significant first
        rem, quotient = carry
        bit = (rem >= mb).astype(jnp.int32)
        return jnp.left_shift(rem - bit * mb, 1), jnp.left_shift(quotient, 1) + bit  # rem < 2^26

    # A loop, not 24 unrolled steps: each step reads `rem` twice, and fusing an unrolled chain of them makes XLA
    # compile an expression that doubles with every step.
    rem, quotient = jax.lax.fori_loop(0, 24, step, (rem, jnp.zeros_like(rem)))  # zeros_like keeps rem's varying axes
    # rem is now twice the final remainder: compare it with mb to round to nearest, ties to even.
    round_up = (rem > mb) | ((rem == mb) & (jnp.bitwise_and(quotient, 1) == 1))
    quotient = quotient + round_up.astype(jnp.int32)  # in [2^23, 2^24]; 2^24 carries into the exponent below
    bits = jnp.left_shift(exponent + 127, 23) + (quotient - 0x800000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def quantize_fp8(x: jax.Array, fp8: Fp8Options | str) -> tuple[jax.Array, jax.Array]:
    """Per token, per 128-channel block fp8 (e4m3) quantization, every step in float32 IEEE arithmetic.

    ``amax = max(max_i |x_i|, 1e-4)``. Scale format "float": ``scale = amax / 448``, ``inv = 448 / amax``.
    "pow2" and "ue8m0": ``e`` = the smallest integer with ``2**e >= amax / 448`` (read off the bits of the float32
    quotient), ``scale = 2**e``, ``inv = 2**-e``. Then ``data = e4m3fn(round_nearest_even(clip(x * inv, ±448)))``.

    Args:
      x: [..., H] bfloat16 or float32, H a multiple of 128.
      fp8: the options, or just the scale format name.
    Returns:
      ``(data [..., H] float8_e4m3fn, scale [..., H/128])``; scale is float32, or float8_e8m0fnu holding the byte
      ``e + 127`` for "ue8m0". The original value is ``data * scale`` per block.
    """
    scale_format = fp8.scale_format if isinstance(fp8, Fp8Options) else Fp8Options(fp8).scale_format
    *lead, hidden = x.shape
    if hidden % SCALE_BLOCK:
        raise ValueError(f"quantize_fp8: hidden={hidden} must be a multiple of {SCALE_BLOCK}")
    blocks = x.astype(jnp.float32).reshape(*lead, hidden // SCALE_BLOCK, SCALE_BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), jnp.float32(AMAX_FLOOR))
    fp8_max = jnp.full(amax.shape, FP8_MAX, jnp.float32)
    quotient = _divide_rn(amax, fp8_max)  # amax / 448, rounded once
    if scale_format == "float":
        scale = quotient
        inv = _divide_rn(fp8_max, amax)
    else:
        # quotient >= 1e-4 / 448 is a positive normal float32: e = unbiased exponent, +1 unless a power of two.
        q_bits = jax.lax.bitcast_convert_type(quotient, jnp.int32)
        biased = jnp.right_shift(q_bits, 23)  # sign bit is 0
        exponent = biased - 127 + (jnp.bitwise_and(q_bits, 0x7FFFFF) != 0).astype(jnp.int32)
        # 2**e and 2**-e built from their bits: exact (-23 <= e <= 120 for any finite input).
        scale = jax.lax.bitcast_convert_type(jnp.left_shift(exponent + 127, 23), jnp.float32)
        inv = jax.lax.bitcast_convert_type(jnp.left_shift(127 - exponent, 23), jnp.float32)
    scaled = jnp.clip(blocks * inv[..., None], -FP8_MAX, FP8_MAX)
    data = scaled.astype(jnp.float8_e4m3fn).reshape(*lead, hidden)  # round to nearest, ties to even
    if scale_format == "ue8m0":
        scale = jax.lax.bitcast_convert_type((exponent + 127).astype(jnp.uint8), jnp.float8_e8m0fnu)
    return data, scale


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------
def sanitize_topk(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """Ids outside [0, E) and repeats of an expert within a row (after its first occurrence) become -1, so bad
    routing can never address a slot out of bounds or twice."""
    in_range = (topk_idx >= 0) & (topk_idx < num_experts)
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]  # [n, K, K]: same[t, k, j]
    earlier = jnp.tril(jnp.ones((k, k), bool), k=-1)  # j < k
    repeated = jnp.any(same & earlier & in_range[:, None, :], axis=-1)
    return jnp.where(in_range & ~repeated, topk_idx, -1)


INVALID_EXPERT, DUPLICATE_EXPERT = 3, 4  # ErrorCode values of layout.h


def _report_routing_errors(topk_idx: jax.Array, num_experts: int, on_error: Callable[[int, int], None]) -> None:
    """Calls ``on_error(code, expert_id)`` on the host for the first bad entry of this rank's call, if any: an id
    outside [-1, E) (INVALID_EXPERT) or an expert repeated within a row (DUPLICATE_EXPERT). A clean call costs one
    reduction and a branch; only a bad one reaches the host."""
    invalid = (topk_idx < -1) | (topk_idx >= num_experts)
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), k=-1)
    duplicate = jnp.any(same & earlier, axis=-1) & (topk_idx >= 0) & ~invalid
    any_invalid, any_duplicate = jnp.any(invalid), jnp.any(duplicate)
    code = jnp.where(any_invalid, INVALID_EXPERT, DUPLICATE_EXPERT).astype(jnp.int32)
    flat = jnp.where(any_invalid, invalid, duplicate).reshape(-1)
    value = topk_idx.reshape(-1)[jnp.argmax(flat)]  # the first offending entry in (token, k) order

    def report(code, value):
        jax.debug.callback(lambda c, v: on_error(int(c), int(v)), code, value)

    jax.lax.cond(any_invalid | any_duplicate, report, lambda code, value: None, code, value)


def _all_to_all(x: jax.Array, axis_name: str) -> jax.Array:
    """out[s] = what rank s put at index (this rank) of its x: the exchange of a [R, ...] send buffer."""
    return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0)


def _slot_layout(config: BufferConfig, recv_expert: jax.Array):
    """Where each received slot goes in the [E_l, R*T] layout.

    recv_expert: [R, n, K] int32, the local expert of slot (source rank, token, k), -1 if empty.
    Returns (src_slot [E_l, R*T]: the flat index r*n*K + t*K + k of the slot each row holds, or R*n*K past
    recv_count; recv_count [E_l]; layout_range [E_l, R, 2]).
    """
    num_ranks, n, k = recv_expert.shape
    e_l, rows = config.num_local_experts, config.recv_rows
    # chosen[e, r, t, k]: slot (r, t, k) targets local expert e (at most one k per (e, r, t)).
    chosen = recv_expert[None] == jnp.arange(e_l, dtype=jnp.int32)[:, None, None, None]
    present = jnp.any(chosen, axis=-1).astype(jnp.int32)  # [E_l, R, n]
    counts = jnp.sum(present, axis=-1)  # [E_l, R]
    offsets = jnp.cumsum(counts, axis=-1) - counts  # rows of the ranks before r (also for empty ranges)
    # Row of (e, r, t): ranks before r, then tokens of r before t (so rows are by source rank, then token).
    row_of = offsets[:, :, None] + jnp.cumsum(present, axis=-1) - present  # [E_l, R, n]
    slot_row = jnp.where(chosen, row_of[..., None], rows)  # [E_l, R, n, K]; `rows` is out of bounds
    slot_id = jnp.arange(num_ranks * n * k, dtype=jnp.int32).reshape(num_ranks, n, k)
    expert_id = jnp.broadcast_to(jnp.arange(e_l, dtype=jnp.int32)[:, None, None, None], chosen.shape)
    # Integer scatter of the permutation only; data moves by the gather in the caller.
    src_slot = jnp.full((e_l, rows), num_ranks * n * k, jnp.int32)
    src_slot = src_slot.at[expert_id, slot_row].set(jnp.broadcast_to(slot_id, chosen.shape), mode="drop")
    layout_range = jnp.stack([offsets, counts], axis=-1).astype(jnp.int32)
    return src_slot, jnp.sum(counts, axis=-1).astype(jnp.int32), layout_range


def _gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] along axis 0; out-of-range indices give zero rows (and are never read)."""
    if table.shape[0] == 0:  # no tokens on any rank: every index is out of range
        return jnp.zeros((*index.shape, *table.shape[1:]), table.dtype)
    return jnp.take(table, index, axis=0, mode="fill", fill_value=0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------
def _dispatch(config: BufferConfig, fp8: Fp8Options | None, x: jax.Array, topk_idx: jax.Array):
    n, hidden = x.shape
    k = topk_idx.shape[1]
    num_ranks, e_l, axis = config.num_ranks, config.num_local_experts, config.axis_name
    topk_idx = sanitize_topk(topk_idx, config.num_experts)
    dest = jnp.where(topk_idx >= 0, topk_idx // e_l, -1)  # [n, K]
    # The payload is cast (or quantized) once per token, then copied into every slot that sends it.
    payloads = [x] if fp8 is None else list(quantize_fp8(x, fp8))
    to_rank = dest[None] == jnp.arange(num_ranks, dtype=jnp.int32)[:, None, None]  # [R, n, K]
    send_expert = jnp.where(to_rank, topk_idx % e_l, -1)
    recv_expert = _all_to_all(send_expert, axis)  # [R_src, n, K]
    src_slot, recv_count, layout_range = _slot_layout(config, recv_expert)

    received = []
    for p in payloads:
        width = p.shape[-1]
        send = jnp.where(to_rank[..., None], p[None, :, None, :], jnp.zeros((), p.dtype))  # [R, n, K, width]
        recv = _all_to_all(send, axis).reshape(num_ranks * n * k, width)
        received.append(_gather_rows(recv, src_slot))  # [E_l, R*T, width]
    valid = src_slot < num_ranks * n * k
    src_info = jnp.where(valid, (src_slot // k) % n, 0).astype(jnp.int32)
    src_topk_pos = jnp.where(valid, src_slot % k, 0).astype(jnp.int32)
    recv_x = received[0] if fp8 is None else Fp8Array(*received)
    del hidden
    return recv_x, recv_count, DispatchHandle(src_info, layout_range, src_topk_pos)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _dispatch_fp8(config: BufferConfig, fp8: Fp8Options, x: jax.Array, topk_idx: jax.Array):
    return _dispatch(config, fp8, x, topk_idx)


@_dispatch_fp8.defjvp
def _dispatch_fp8_jvp(config, fp8, primals, tangents):
    del config, primals, tangents
    raise NotImplementedError(
        f"jax_ll_ep.dispatch with fp8={fp8!r} is forward-only: fp8 quantization has no useful derivative. "
        "Differentiate a bf16 dispatch (fp8=None), or stop the gradient at its input (jax.lax.stop_gradient(x))."
    )


def dispatch(
    config: BufferConfig,
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    fp8: Fp8Options | None,
    on_routing_error: Callable[[int, int], None] | None = None,
):
    """This rank's part of dispatch. x: [n, H] bfloat16, topk_idx: [n, K] int32 (validated by ops.py).

    Returns ``(recv_x [E_l, R*T, H] (or Fp8Array), recv_count [E_l], DispatchHandle)``. Rows past recv_count are
    zero here (the contract leaves them unspecified). Bad ids are treated as -1 (a repeated expert keeps its first
    occurrence); with ``on_routing_error``, the first one of each call is also reported to it on the host as
    ``(code, expert_id)`` with code INVALID_EXPERT or DUPLICATE_EXPERT.
    """
    if on_routing_error is not None:
        _report_routing_errors(topk_idx, config.num_experts, on_routing_error)
    if fp8 is None:
        return _dispatch(config, None, x, topk_idx)
    return _dispatch_fp8(config, fp8, x, topk_idx)


# ---------------------------------------------------------------------------------------------------------------
# Combine
# ---------------------------------------------------------------------------------------------------------------
def combine(
    config: BufferConfig,
    y: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    handle: DispatchHandle,
) -> jax.Array:
    """This rank's part of combine: ``out[t] = bf16(acc)``, ``acc = 0; for k: if topk_idx[t,k] >= 0:
    acc = acc + float32(w[t,k] * y[slot(t,k)])``. y: [E_l, R*T, H] bfloat16 in the layout of ``handle``; rows past
    recv_count are never read. Returns [n, H] bfloat16."""
    n, k = topk_idx.shape
    num_ranks, e_l, rows, axis = config.num_ranks, config.num_local_experts, config.recv_rows, config.axis_name
    hidden = y.shape[-1]
    num_slots = num_ranks * n * k

    # Inverse of dispatch's layout: which row of y goes to slot (source rank, token, k).
    offsets, counts = handle.layout_range[..., 0], handle.layout_range[..., 1]  # [E_l, R]
    row = jnp.arange(rows, dtype=jnp.int32)
    ends = offsets + counts
    # source rank of row j = number of ranks whose range ends at or before j (empty ranges end where they start)
    src_rank = jnp.sum(ends[:, None, :] <= row[None, :, None], axis=-1).astype(jnp.int32)  # [E_l, R*T]
    token, pos = handle.src_info, handle.src_topk_pos
    valid = (
        (row[None, :] < jnp.sum(counts, axis=-1, keepdims=True)) & (token >= 0) & (token < n) & (pos >= 0) & (pos < k)
    )
    slot = jnp.where(valid, (src_rank * n + token) * k + pos, num_slots)
    row_id = jnp.arange(e_l * rows, dtype=jnp.int32).reshape(e_l, rows)
    src_row = jnp.full((num_slots,), e_l * rows, jnp.int32).at[slot].set(row_id, mode="drop")
    send = _gather_rows(y.reshape(e_l * rows, hidden), src_row).reshape(num_ranks, n, k, hidden)
    back = _all_to_all(send, axis)  # [R_owner, n, K, H]: back[d, t, k] = y row for (t, k) if d owns its expert

    topk_idx = sanitize_topk(topk_idx, config.num_experts)
    chosen = topk_idx >= 0
    owner = jnp.where(chosen, topk_idx // e_l, 0)
    y_rows = back[owner, jnp.arange(n)[:, None], jnp.arange(k)[None, :]]  # [n, K, H]
    # Weights of unchosen k may be anything (even NaN): zero them so neither the value nor its gradient sees them.
    weights = jnp.where(chosen, topk_weights, 0.0)
    products = weights[..., None] * y_rows.astype(jnp.float32)  # [n, K, H], each rounded to float32
    # The barrier materializes the products before the adds, so XLA:CPU cannot contract them into FMAs; and it
    # hides that acc starts at +0.0, so XLA cannot fold `0 + p` into `p` (which differs for p = -0.0).
    acc, products = jax.lax.optimization_barrier((jnp.zeros((n, hidden), jnp.float32), products))
    for j in range(k):  # in k order, as the contract fixes it
        acc = jnp.where(chosen[:, j, None], acc + products[:, j], acc)
    return acc.astype(jnp.bfloat16)
