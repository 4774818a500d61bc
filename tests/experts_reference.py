"""An independent NumPy reference for jax_ll_ep.experts, and the random operands the tests draw.

Written from the contract (float64 products of each expert's valid rows; fp8 values are data times the block
scale), not from the implementation. Shared by tests/test_experts.py (CPU: the interpreted kernel and the
reference path) and tests/gpu/test_experts_gpu.py (the compiled kernel).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_ll_ep as ep

BLOCK = 128


def value(a) -> np.ndarray:
    """float64 value of a bf16 array or an Fp8Array (per-row 128-channel scales, or 128x128 block scales)."""
    if isinstance(a, ep.Fp8Array):
        data = np.asarray(a.data).astype(np.float64)
        scale = np.asarray(a.scale).astype(np.float64)  # float8_e8m0fnu converts to its power of two
        if scale.shape[1] == data.shape[1]:  # [E, M, K/128]: per row
            return data * np.repeat(scale, BLOCK, axis=2)
        return data * np.repeat(np.repeat(scale, BLOCK, axis=1), BLOCK, axis=2)
    return np.asarray(a).astype(np.float64)


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def products(x, weights, counts, w_layout: str) -> list[list[np.ndarray]]:
    """Per weight, per expert: the float64 product of the expert's valid rows ([count, N])."""
    xv = value(x)
    out = []
    for w in weights:
        wv = value(w)
        if w_layout == "nk":
            wv = np.swapaxes(wv, 1, 2)
        out.append([xv[e, : counts[e]] @ wv[e] for e in range(len(counts))])
    return out


def grouped_matmul(x, w, counts, w_layout="kn") -> list[np.ndarray]:
    return products(x, [w], counts, w_layout)[0]


def swiglu(x, w_gate, w_up, counts, w_layout="kn") -> list[np.ndarray]:
    g, u = products(x, [w_gate, w_up], counts, w_layout)
    return [silu(a) * b for a, b in zip(g, u, strict=True)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / denom) if denom else float(np.linalg.norm(got))


def check_rows(got, want_per_expert, counts, tol: float) -> None:
    """Every valid row of ``got`` [E, M, N] finite and, per expert, within ``tol`` (relative) of the reference."""
    got = np.asarray(got, np.float64)
    for e, want in enumerate(want_per_expert):
        rows = got[e, : counts[e]]
        assert np.isfinite(rows).all(), f"expert {e}: non-finite values in its {counts[e]} valid rows"
        if counts[e]:
            err = relative_error(rows, want)
            assert err <= tol, f"expert {e} ({counts[e]} rows): relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# Random operands
# ---------------------------------------------------------------------------------------------------------------
def random_counts(rng, e: int, m: int) -> np.ndarray:
    """Counts in [0, m] including an empty and a full expert whenever there are two or more experts."""
    counts = rng.integers(0, m + 1, size=e)
    if e >= 2:
        counts[rng.choice(e, 2, replace=False)] = [0, m]
    return counts.astype(np.int32)


def random_rows(rng, e: int, m: int, k: int, counts: np.ndarray) -> np.ndarray:
    """bf16 rows [e, m, k], NaN in every row at or past the count (what dispatch may leave there)."""
    x = (rng.standard_normal((e, m, k)) * np.exp2(rng.integers(-3, 3, size=(e, m, 1)))).astype(np.float32)
    x[np.arange(m)[None, :] >= counts[:, None]] = np.nan
    return x.astype(ml_dtypes.bfloat16)


def quantize_rows(x: np.ndarray, fmt: str) -> ep.Fp8Array:
    """Per row, per 128 channels, e4m3 with the scale format of fp8 dispatch; NaN rows keep NaN data and scales."""
    e, m, k = x.shape
    xf = np.asarray(x, np.float32).reshape(e, m, k // BLOCK, BLOCK)
    poisoned = np.isnan(xf).any(axis=-1)
    finite = np.where(np.isnan(xf), 0.0, xf)
    scale = np.maximum(np.abs(finite).max(axis=-1), 1e-4) / 448.0
    if fmt != "float":
        scale = np.exp2(np.ceil(np.log2(scale)))
    data = (xf / scale[..., None]).reshape(e, m, k).astype(ml_dtypes.float8_e4m3fn)  # NaN rows stay NaN
    scale = np.where(poisoned, np.nan, scale)
    if fmt == "ue8m0":
        return ep.Fp8Array(jnp.asarray(data), jnp.asarray(scale.astype(ml_dtypes.float8_e8m0fnu)))
    return ep.Fp8Array(jnp.asarray(data), jnp.asarray(scale.astype(np.float32)))


def random_weights(rng, e: int, k: int, n: int, *, fp8: bool, w_layout: str):
    """[e, k, n] (or [e, n, k] for "nk") bf16, or fp8 with one float32 scale per 128x128 block."""
    w = (rng.standard_normal((e, k, n)) / np.sqrt(k)).astype(np.float32)
    if w_layout == "nk":
        w = np.ascontiguousarray(np.swapaxes(w, 1, 2))
    if not fp8:
        return jnp.asarray(w.astype(ml_dtypes.bfloat16))
    a, b = w.shape[1:]
    blocks = w.reshape(e, a // BLOCK, BLOCK, b // BLOCK, BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(2, 4)), 1e-4) / 448.0
    data = (blocks / scale[:, :, None, :, None]).reshape(e, a, b).astype(ml_dtypes.float8_e4m3fn)
    return ep.Fp8Array(jnp.asarray(data), jnp.asarray(scale.astype(np.float32)))


def bf16_case(rng, e: int, m: int, k: int, n: int):
    """(counts, x [e, m, k] with NaN past each count, w [e, k, n]): a random bf16 grouped-matmul problem."""
    counts = random_counts(rng, e, m)
    x = jnp.asarray(random_rows(rng, e, m, k, counts))
    return counts, x, random_weights(rng, e, k, n, fp8=False, w_layout="kn")
