"""Closed-form checks of the NumPy oracle itself: hand-computed layouts, exact identities, fp8 rounding cases."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import oracle
import pytest

from jax_ll_ep import testing

BF16 = ml_dtypes.bfloat16


def _tiny():
    """R=2, E=4 (E_l=2), T=3, H=8; values are small integers (exact in bf16, also times 4)."""
    xs = [(np.arange(24).reshape(3, 8) + 30 * r).astype(BF16) for r in range(2)]
    topks = [
        np.array([[1, 2], [2, -1], [0, 3]], np.int32),
        np.array([[3, 0], [-1, -1], [1, 0]], np.int32),
    ]
    return xs, topks


def test_tiny_dispatch_by_hand():
    xs, topks = _tiny()
    got = oracle.dispatch(xs, topks, num_experts=4, max_tokens=3)
    # (destination rank, local expert) -> [(source rank, token, k)], by source rank then token
    want = {
        (0, 0): [(0, 2, 0), (1, 0, 1), (1, 2, 1)],
        (0, 1): [(0, 0, 0), (1, 2, 0)],
        (1, 0): [(0, 0, 1), (0, 1, 0)],
        (1, 1): [(0, 2, 1), (1, 0, 0)],
    }
    want_ranges = {
        (0, 0): [(0, 1), (1, 2)],
        (0, 1): [(0, 1), (1, 1)],
        (1, 0): [(0, 2), (2, 0)],  # an empty range starts where the previous one ends
        (1, 1): [(0, 1), (1, 1)],
    }
    for (d, e), rows in want.items():
        res = got[d]
        assert res["recv_x"].shape == (2, 6, 8) and res["recv_x"].dtype == BF16
        assert res["recv_count"][e] == len(rows)
        assert res["layout_range"][e].tolist() == [list(p) for p in want_ranges[(d, e)]]
        for i, (r, t, k) in enumerate(rows):
            assert res["src_info"][e, i] == t and res["src_topk_pos"][e, i] == k
            np.testing.assert_array_equal(res["recv_x"][e, i], xs[r][t])
        assert not np.any(res["recv_x"][e, len(rows) :].astype(np.float32))  # rows past the count stay zero
        assert res["recv_scale"] is None


def test_tiny_combine_by_hand():
    xs, topks = _tiny()
    handles = oracle.dispatch(xs, topks, num_experts=4, max_tokens=3)
    # expert j multiplies by (j + 1): exact in bf16 for these values
    ys = []
    for d, h in enumerate(handles):
        factor = (d * 2 + np.arange(2) + 1).astype(np.float32)[:, None, None]
        ys.append((h["recv_x"].astype(np.float32) * factor).astype(BF16))
    weights = [np.array([[0.5, 0.25], [2.0, 7.0], [1.0, -1.0]], np.float32) for _ in range(2)]
    outs = oracle.combine(ys, topks, weights, handles, num_experts=4, max_tokens=3)
    for r in range(2):
        x = xs[r].astype(np.float32)
        want = np.zeros((3, 8), np.float32)
        for t in range(3):
            for k in range(2):
                e = topks[r][t, k]
                if e >= 0:
                    want[t] += weights[r][t, k] * (e + 1) * x[t]
        # the float32 sums are exact here; the result is their bf16 rounding
        assert oracle.bitwise_equal(outs[r], want.astype(BF16))


def test_identity_experts_and_unit_weights_give_back_x():
    rng = np.random.default_rng(1)
    num_ranks, num_experts, t_max, hidden, k = 4, 16, 8, 64, 4
    xs = [testing.random_tokens(rng, t_max, hidden) for _ in range(num_ranks)]
    topks = [testing.random_routing(rng, t_max, k, num_experts) for _ in range(num_ranks)]
    # powers of two summing to 1: every product and partial sum is exact in float32
    weights = [np.tile(np.array([0.5, 0.25, 0.125, 0.125], np.float32), (t_max, 1)) for _ in range(num_ranks)]
    handles = oracle.dispatch(xs, topks, num_experts, t_max)
    outs = oracle.combine([h["recv_x"] for h in handles], topks, weights, handles, num_experts, t_max)
    for r in range(num_ranks):
        assert oracle.bitwise_equal(outs[r], xs[r])


def test_layout_invariants_on_random_routing():
    rng = np.random.default_rng(2)
    num_ranks, num_experts, t_max, hidden, k = 4, 8, 16, 8, 3
    xs = [testing.self_describing_tokens(rng, r, t_max, hidden) for r in range(num_ranks)]
    topks = [testing.random_routing(rng, t_max, k, num_experts, drop_prob=0.3) for _ in range(num_ranks)]
    res = oracle.dispatch(xs, topks, num_experts, t_max)
    assert sum(int(h["recv_count"].sum()) for h in res) == sum(int((t >= 0).sum()) for t in topks)
    for d, h in enumerate(res):
        for e in range(num_experts // num_ranks):
            c = int(h["recv_count"][e])
            src_rank, src_token = testing.decode_source(h["recv_x"][e, :c])
            np.testing.assert_array_equal(src_token, h["src_info"][e, :c])
            order = list(zip(src_rank.tolist(), src_token.tolist(), strict=True))
            assert order == sorted(order) and len(set(order)) == c
            for r, t, kk in zip(src_rank, src_token, h["src_topk_pos"][e, :c], strict=True):
                assert topks[r][t, kk] == d * 2 + e


def test_sanitize_topk():
    topk = np.array([[3, 3, -1, 9], [-5, 2, 2, 0]], np.int32)
    np.testing.assert_array_equal(oracle.sanitize_topk(topk, 8), [[3, -1, -1, -1], [-1, 2, -1, 0]])


@pytest.mark.parametrize("scale_format", oracle.SCALE_FORMATS)
def test_fp8_closed_form(scale_format):
    x = np.zeros((3, 256), np.float32)
    x[1, :4] = [448.0, 1.0625, 1.1875, -3.0]  # amax 448: inv = 1 in every format
    x[1, 128:130] = [896.0, 1.0]  # amax 896: amax/448 = 2 exactly
    x[2, :2] = [464.0, -1.0]  # amax 464: pow2 rounds 464/448 up to 2; 464/2 = 232 ties to even (224)
    data, scale = oracle.quantize_fp8(x.astype(BF16), scale_format)
    assert data.dtype == ml_dtypes.float8_e4m3fn and data.shape == (3, 256)
    assert scale.shape == (3, 2)
    scale_f32 = scale.astype(np.float32)
    # an all-zero block: amax floored at 1e-4; data all zero
    floor_scale = np.float32(1e-4) / np.float32(448) if scale_format == "float" else np.float32(2.0**-22)
    assert scale_f32[0, 0] == floor_scale and not np.any(data[0].astype(np.float32))
    assert scale_f32[1, 0] == 1.0
    # round to nearest even at scale 1: 1.0625 -> 1.0, 1.1875 -> 1.25 (e4m3 spacing 0.125 in [1, 2))
    np.testing.assert_array_equal(data[1, :4].astype(np.float32), [448.0, 1.0, 1.25, -3.0])
    assert scale_f32[1, 1] == 2.0
    np.testing.assert_array_equal(data[1, 128:130].astype(np.float32), [448.0, 0.5])
    if scale_format == "float":
        assert scale_f32[2, 0] == np.float32(464.0) / np.float32(448.0)
    else:
        assert scale_f32[2, 0] == 2.0
        np.testing.assert_array_equal(data[2, :2].astype(np.float32), [224.0, -0.5])
    if scale_format == "ue8m0":
        assert scale.dtype == ml_dtypes.float8_e8m0fnu
        assert scale.view(np.uint8)[1, 1] == 128  # 2**1 -> byte 1 + 127
    else:
        assert scale.dtype == np.float32


@pytest.mark.parametrize("scale_format", oracle.SCALE_FORMATS)
def test_fp8_dequantization_error_is_bounded(scale_format):
    rng = np.random.default_rng(3)
    x = testing.random_tokens(rng, 32, 512)
    data, scale = oracle.quantize_fp8(x, scale_format)
    x32 = x.astype(np.float32)
    err = np.abs(oracle.dequantize_fp8(data, scale) - x32)
    amax = np.repeat(np.abs(x32).reshape(32, 4, 128).max(-1), 128, axis=1)
    # e4m3 keeps 3 mantissa bits: half an ulp is at most 1/16 of the value, and pow2 scales waste at most 1 bit
    assert np.all(err <= np.abs(x32) / 16 + amax * 2.0**-8)


def test_comparison_helpers_look_at_valid_rows_only():
    a = np.zeros((2, 4, 3), BF16)
    b = a.copy()
    b[0, 3] = np.nan  # past the count
    count = np.array([2, 4], np.int32)
    assert oracle.valid_rows_equal(a, b, count)
    b[1, 3] = 1.0  # a valid row
    assert not oracle.valid_rows_equal(a, b, count)
    neg = a.copy()
    neg[0, 0, 0] = -0.0
    assert not oracle.bitwise_equal(a, neg)  # bitwise: -0.0 differs from 0.0
