"""The contract's fp8 quantization: per token, per 128-channel block, e4m3 data and a float32 (or UE8M0) scale,
every step in float32 IEEE arithmetic with one rounding each, the same bits on every platform.

The ``xla`` backend quantizes with it; the native backends implement the same steps (xla_ffi/cpu/numerics.h, the
CUDA dispatch kernel), and tests/oracle.py is the independent reference all of them are checked against.

XLA rewrites some rounding steps unless told not to: ``a / broadcast(c)`` becomes ``a * broadcast(1 / c)`` (the
simplifier, every platform), and XLA:GPU lowers float32 division to ``div.full``, which may be 2 ulp off. The two
divisions of the quantization are therefore done by integer long division of the significands (:func:`_divide_rn`),
exact everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._extension import SCALE_BLOCK
from .config import Fp8Options

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # keeps the scale of an all-zero block finite


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
