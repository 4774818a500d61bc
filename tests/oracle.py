"""An independent NumPy oracle for dispatch, combine and fp8 quantization.

Written from the contract (the docstrings of jax_ll_ep/ops.py and jax_ll_ep/fp8.py), not from any backend: loops
over ranks, tokens and top-k choices, with every float step spelled out in float32 NumPy arithmetic (NumPy never
contracts a multiply and an add into an FMA). Every backend must match it bit for bit on the valid rows.

Conventions:
- ``R`` ranks, each passing ``xs[r]`` [n_r, H] and ``topks[r]`` [n_r, K]; ``E`` experts, ``E_l = E / R`` per rank,
  ``T = max_tokens`` (every n_r <= T).
- Dispatch results per destination rank: dicts of ``recv_x`` [E_l, R*T, H] (bfloat16, or float8_e4m3fn with fp8),
  ``recv_scale`` [E_l, R*T, H/128] (float32, float8_e8m0fnu for "ue8m0", None without fp8), ``recv_count`` [E_l],
  ``src_info`` [E_l, R*T], ``layout_range`` [E_l, R, 2], ``src_topk_pos`` [E_l, R*T] (int32). Rows past
  ``recv_count`` are zero here; backends leave them unspecified, so compare valid rows only
  (:func:`assert_dispatch_equal`).
- ``layout_range[e][r] = (offset, count)``: the offset of an empty range is the running offset (the sum of the
  counts of the ranks before it), so layout_range is fully specified.
- Runtime routing errors (an id outside [-1, E), an expert repeated within a token's row) are not undefined: the
  offending entry is treated as -1 (the first occurrence of a repeated expert is kept) in dispatch and in combine.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
SCALE_BLOCK = 128
FP8_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)
SCALE_FORMATS = ("float", "pow2", "ue8m0")


# ---------------------------------------------------------------------------------------------------------------
# FP8 quantization
# ---------------------------------------------------------------------------------------------------------------
def pow2_exponents(q: np.ndarray) -> np.ndarray:
    """The smallest integers e with 2**e >= q, for positive normal float32 q, read off the bits of q: the unbiased
    exponent, plus one unless q is a power of two (zero mantissa)."""
    q_bits = np.ascontiguousarray(q, dtype=np.float32).view(np.uint32).astype(np.int64)
    biased, mantissa = (q_bits >> 23) & 0xFF, q_bits & 0x7FFFFF
    assert np.all((biased > 0) & (biased < 255)), "amax/448 must be a positive normal float32"
    return biased - 127 + (mantissa != 0)


def quantize_fp8(x: np.ndarray, scale_format: str) -> tuple[np.ndarray, np.ndarray]:
    """Per token, per 128-channel block fp8 quantization, all steps in float32.

    ``amax = max(max_i |x_i|, 1e-4)``; "float": ``scale = amax / 448``, ``inv = 448 / amax``; "pow2"/"ue8m0":
    ``e`` = the smallest integer with ``2**e >= amax / 448``, ``scale = 2**e``, ``inv = 2**-e``;
    ``data = e4m3fn(round_nearest_even(clip(x * inv, -448, 448)))``.

    x: [n, H] bfloat16 (or float32), H a multiple of 128. Returns ``data`` [n, H] float8_e4m3fn and ``scale``
    [n, H/128]: float32 for "float"/"pow2", float8_e8m0fnu (the byte e + 127) for "ue8m0".
    """
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format={scale_format!r}; allowed: {SCALE_FORMATS}")
    x = np.asarray(x)
    n, h = x.shape
    assert h % SCALE_BLOCK == 0, f"hidden={h} must be a multiple of {SCALE_BLOCK}"
    blocks = x.astype(np.float32).reshape(n, h // SCALE_BLOCK, SCALE_BLOCK)
    # max is exact in any order; the floor keeps all-zero blocks finite.
    amax = np.maximum(np.max(np.abs(blocks), axis=-1), AMAX_FLOOR).astype(np.float32)
    if scale_format == "float":
        scale = (amax / FP8_MAX).astype(np.float32)  # float32 / float32: one IEEE rounding
        inv = (FP8_MAX / amax).astype(np.float32)
        exps = None
    else:
        exps = pow2_exponents((amax / FP8_MAX).astype(np.float32))
        scale = np.ldexp(np.float32(1.0), exps).astype(np.float32)  # exact: -23 <= e <= 120
        inv = np.ldexp(np.float32(1.0), -exps).astype(np.float32)
    scaled = (blocks * inv[..., None]).astype(np.float32)  # one float32 product per element
    clipped = np.clip(scaled, -FP8_MAX, FP8_MAX)
    data = clipped.astype(E4M3).reshape(n, h)  # ml_dtypes rounds to nearest, ties to even
    if scale_format == "ue8m0":
        return data, (exps + 127).astype(np.uint8).view(E8M0)
    return data, scale


def dequantize_fp8(data: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``data * scale`` per 128-channel block, in float32."""
    d = np.asarray(data).astype(np.float32)
    s = np.asarray(scale).astype(np.float32)
    return d * np.repeat(s, SCALE_BLOCK, axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------
def sanitize_topk(topk: np.ndarray, num_experts: int) -> np.ndarray:
    """Ids outside [0, E) become -1; a repeated expert keeps its first occurrence, the repeats become -1."""
    topk = np.asarray(topk, dtype=np.int64)
    out = np.full(topk.shape, -1, dtype=np.int64)
    for t in range(topk.shape[0]):
        seen = set()
        for k in range(topk.shape[1]):
            idx = int(topk[t, k])
            if 0 <= idx < num_experts and idx not in seen:
                seen.add(idx)
                out[t, k] = idx
    return out


def mask_routing(topks: list[np.ndarray], masked, num_experts: int) -> list[np.ndarray]:
    """The routing a masked exchange runs (the contract of ``Buffer.mask_ranks``): every id routed to an expert of a
    masked rank becomes -1 ("dropped exactly as if its id were -1"), and a masked rank sends nothing (its ids all
    become -1). The outputs of the live ranks then equal the oracle's on this routing; a masked rank's are
    unspecified."""
    masked = set(int(r) for r in masked)
    num_ranks = len(topks)
    e_l = num_experts // num_ranks
    out = []
    for r, topk in enumerate(topks):
        t = np.array(topk, dtype=np.int32, copy=True)
        if r in masked:
            t[:] = -1
        else:
            owner = np.where((t >= 0) & (t < num_experts), t // e_l, -1)
            t[np.isin(owner, list(masked))] = -1
        out.append(t)
    return out


def count_dropped(topk: np.ndarray, masked, num_experts: int, num_ranks: int) -> int:
    """The (token, expert) pairs of one live rank's topk_idx that a mask drops: valid entries (first occurrence of
    an id in [0, E)) whose expert belongs to a masked rank."""
    e_l = num_experts // num_ranks
    clean = sanitize_topk(topk, num_experts)
    return int(np.sum((clean >= 0) & np.isin(clean // e_l, [int(r) for r in masked])))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------
def dispatch(
    xs: list[np.ndarray],
    topks: list[np.ndarray],
    num_experts: int,
    max_tokens: int,
    fp8: str | None = None,
) -> list[dict]:
    """What every destination rank receives. See the module docstring for the result format."""
    num_ranks = len(xs)
    assert len(topks) == num_ranks and num_experts % num_ranks == 0
    e_l, t_max = num_experts // num_ranks, max_tokens
    rows = num_ranks * t_max
    hidden = np.asarray(xs[0]).shape[1]
    # The payload each source rank puts on the wire: the bf16 row, or its fp8 quantization.
    payloads = []
    for r in range(num_ranks):
        x = np.asarray(xs[r]).astype(BF16)
        assert x.shape[0] <= t_max, f"rank {r} passes {x.shape[0]} tokens > max_tokens={t_max}"
        payloads.append((x, None) if fp8 is None else quantize_fp8(x, fp8))
    sanitized = [sanitize_topk(topks[r], num_experts) for r in range(num_ranks)]

    # Every (source rank, token, k) that chose an expert, visited by source rank, then token: appending to the
    # expert's list in this visiting order gives exactly the contract's row order.
    arrivals: dict[int, list[tuple[int, int, int]]] = {expert: [] for expert in range(num_experts)}
    for r in range(num_ranks):
        for t in range(sanitized[r].shape[0]):
            for k in range(sanitized[r].shape[1]):
                expert = int(sanitized[r][t, k])
                if expert >= 0:
                    arrivals[expert].append((r, t, k))

    results = []
    for d in range(num_ranks):
        if fp8 is None:
            recv_x = np.zeros((e_l, rows, hidden), dtype=BF16)
            recv_scale = None
        else:
            recv_x = np.zeros((e_l, rows, hidden), dtype=E4M3)
            scale_dtype = E8M0 if fp8 == "ue8m0" else np.float32
            recv_scale = np.zeros((e_l, rows, hidden // SCALE_BLOCK), dtype=scale_dtype)
        recv_count = np.zeros((e_l,), dtype=np.int32)
        src_info = np.zeros((e_l, rows), dtype=np.int32)
        src_topk_pos = np.zeros((e_l, rows), dtype=np.int32)
        layout_range = np.zeros((e_l, num_ranks, 2), dtype=np.int32)
        for e in range(e_l):
            for row, (r, t, k) in enumerate(arrivals[d * e_l + e]):
                data, scale = payloads[r]
                recv_x[e, row] = data[t]
                if scale is not None:
                    recv_scale[e, row] = scale[t]
                src_info[e, row] = t
                src_topk_pos[e, row] = k
                layout_range[e, r, 1] += 1
            recv_count[e] = len(arrivals[d * e_l + e])
            # offset of source rank r = rows of the ranks before it (also for an empty range)
            layout_range[e, :, 0] = np.cumsum(layout_range[e, :, 1]) - layout_range[e, :, 1]
        results.append(
            dict(
                recv_x=recv_x,
                recv_scale=recv_scale,
                recv_count=recv_count,
                src_info=src_info,
                layout_range=layout_range,
                src_topk_pos=src_topk_pos,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------------------------
# Combine
# ---------------------------------------------------------------------------------------------------------------
def slot_table(handle: dict) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(local expert, source rank, source token) -> (row, topk position), read from one destination's handle
    (layout_range and src_info alone decide the row, as the contract defines them)."""
    table = {}
    lr = np.asarray(handle["layout_range"])
    for e in range(lr.shape[0]):
        for r in range(lr.shape[1]):
            offset, count = int(lr[e, r, 0]), int(lr[e, r, 1])
            for row in range(offset, offset + count):
                key = (e, r, int(handle["src_info"][e, row]))
                assert key not in table, f"token {key[2]} of rank {r} appears twice in local expert {e}"
                table[key] = (row, int(handle["src_topk_pos"][e, row]))
    return table


def combine(
    ys: list[np.ndarray],
    topks: list[np.ndarray],
    weights: list[np.ndarray],
    handles: list[dict],
    num_experts: int,
    max_tokens: int,
) -> list[np.ndarray]:
    """``out[t] = bf16(acc)`` with ``acc = 0; for k: if topk[t,k] >= 0: acc = acc + float32(w[t,k] * y_row)``.

    ys[d]: [E_l, R*T, H] bfloat16 expert outputs on destination rank d, in the dispatch layout described by
    handles[d]. Returns one [n_r, H] bfloat16 array per rank. Rows of ys past recv_count are never read.
    """
    num_ranks = len(ys)
    e_l = num_experts // num_ranks
    del max_tokens  # shapes come from ys; kept for a symmetric signature with dispatch
    tables = [slot_table(h) for h in handles]
    outs = []
    for r in range(num_ranks):
        topk = sanitize_topk(topks[r], num_experts)
        w = np.asarray(weights[r], dtype=np.float32)
        n = topk.shape[0]
        hidden = np.asarray(ys[0]).shape[2]
        out = np.zeros((n, hidden), dtype=BF16)
        for t in range(n):
            acc = np.zeros((hidden,), dtype=np.float32)
            for k in range(topk.shape[1]):
                expert = int(topk[t, k])
                if expert < 0:
                    continue
                d, e = divmod(expert, e_l)
                row, pos = tables[d][(e, r, t)]
                assert pos == k, f"rank {d} recorded topk position {pos} for token {t} of rank {r}, want {k}"
                y_row = np.asarray(ys[d][e, row]).astype(np.float32)
                prod = (w[t, k] * y_row).astype(np.float32)  # rounded to float32 before the add (no FMA)
                acc = (acc + prod).astype(np.float32)
            out[t] = acc.astype(BF16)  # round to nearest even
        outs.append(out)
    return outs


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers: only valid rows carry meaning
# ---------------------------------------------------------------------------------------------------------------
def bits(a: np.ndarray) -> np.ndarray:
    """A view of an array's raw bytes (so NaNs and -0.0 compare by representation)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize) if a.ndim else a.view(np.uint8)


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def valid_rows(arr: np.ndarray, recv_count: np.ndarray) -> list[np.ndarray]:
    """The valid rows of each local expert of a [E_l, R*T, ...] array."""
    return [np.asarray(arr)[e, : int(c)] for e, c in enumerate(np.asarray(recv_count))]


def valid_rows_equal(got: np.ndarray, want: np.ndarray, recv_count: np.ndarray) -> bool:
    """Bitwise equality of the rows below recv_count of two [E_l, R*T, ...] arrays."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    return all(
        bitwise_equal(g, w) for g, w in zip(valid_rows(got, recv_count), valid_rows(want, recv_count), strict=True)
    )


def assert_dispatch_equal(got: dict, want: dict, *, where: str = "") -> None:
    """Asserts that one rank's dispatch result matches the oracle's: recv_count and layout_range exactly, and
    recv_x / recv_scale / src_info / src_topk_pos bitwise on the valid rows. ``got`` holds NumPy arrays with the
    oracle's keys (recv_scale may be absent or None without fp8)."""
    prefix = f"{where}: " if where else ""
    count = np.asarray(want["recv_count"])
    np.testing.assert_array_equal(np.asarray(got["recv_count"]), count, err_msg=prefix + "recv_count")
    np.testing.assert_array_equal(
        np.asarray(got["layout_range"]), want["layout_range"], err_msg=prefix + "layout_range"
    )
    keys = ["src_info", "src_topk_pos", "recv_x"]
    if want.get("recv_scale") is not None:
        keys.append("recv_scale")
    for key in keys:
        g, w = np.asarray(got[key]), np.asarray(want[key])
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"{prefix}{key}: got {g.dtype}{g.shape}, want {w.dtype}{w.shape}"
        )
        for e, c in enumerate(count):
            if not bitwise_equal(g[e, :c], w[e, :c]):
                bad = [i for i in range(int(c)) if not bitwise_equal(g[e, i], w[e, i])]
                raise AssertionError(
                    f"{prefix}{key} differs on local expert {e} at valid rows {bad[:8]} "
                    f"(of {int(c)}; {len(bad)} rows differ)"
                )


def assert_bitwise_equal(got, want, *, what: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"
    )
    if not bitwise_equal(got, want):
        diff = np.argwhere(np.any(bits(got) != bits(want), axis=-1))
        first = tuple(int(v) for v in diff[0])
        raise AssertionError(
            f"{what}: {len(diff)} elements differ bitwise; first at {first}: got {got[first]!r}, want {want[first]!r}"
        )
