"""The ``xla`` backend against the NumPy oracle, bit for bit, on 8 simulated CPU devices.

Each case runs dispatch -> identity experts -> combine in one jitted shard_map and compares every valid row of
every dispatch result and every combine output with tests/oracle.py. Shapes are small and shared between cases so
that compiled functions are reused (jax_ll_ep.testing caches them per buffer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from jax.sharding import PartitionSpec as P

import jax_ll_ep as ep
from jax_ll_ep import testing

BACKEND = "xla"
BF16 = ml_dtypes.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    num_ranks: int = 8
    num_experts: int = 32
    max_tokens: int = 16
    hidden: int = 256
    topk: int = 4
    num_tokens: int | None = None  # tokens passed per rank (default: max_tokens)

    @property
    def n(self) -> int:
        return self.max_tokens if self.num_tokens is None else self.num_tokens


BASE = Case()


def _buffer(make_buffer, make_mesh, case: Case, *, dp: int = 0):
    mesh = make_mesh((dp, case.num_ranks), ("dp", "ep")) if dp else make_mesh((case.num_ranks,), ("ep",))
    return make_buffer(
        mesh,
        backend=BACKEND,
        num_experts=case.num_experts,
        max_tokens_per_rank=case.max_tokens,
        hidden=case.hidden,
    )


def _inputs(case: Case, seed: int, routing: str = "random", *, devices: int | None = None, drop_prob=0.25):
    rng = np.random.default_rng(seed)
    devices = devices or case.num_ranks
    xs = [testing.self_describing_tokens(rng, i, case.n, case.hidden) for i in range(devices)]
    if routing == "random":
        topks = [testing.random_routing(rng, case.n, case.topk, case.num_experts, drop_prob=drop_prob) for _ in xs]
    elif routing == "skewed":
        topks = [testing.skewed_routing(rng, case.n, case.topk, case.num_experts, expert=3) for _ in xs]
    else:
        raise ValueError(routing)
    weights = [testing.random_weights(rng, t) for t in topks]
    return xs, topks, weights


def _check_against_oracle(buf, case: Case, xs, topks, weights, *, fp8: str | None = None, split: bool = False):
    """Runs dispatch -> identity (dequantized for fp8) -> combine (with ``split``: through the split forms);
    compares everything with the oracle."""
    options = None if fp8 is None else ep.Fp8Options(fp8)
    outs, got = testing.run_roundtrip(buf, xs, topks, weights, fp8=options, split=split)
    for g, sl in enumerate(testing.group_slices(buf)):
        want = oracle.dispatch(xs[sl], topks[sl], case.num_experts, case.max_tokens, fp8)
        for r, (gd, wd) in enumerate(zip(got[sl], want, strict=True)):
            oracle.assert_dispatch_equal(gd, wd, where=f"group {g} rank {r}")
        if fp8 is None:
            ys = [w["recv_x"] for w in want]
        else:
            ys = [oracle.dequantize_fp8(w["recv_x"], w["recv_scale"]).astype(BF16) for w in want]
        want_out = oracle.combine(ys, topks[sl], weights[sl], want, case.num_experts, case.max_tokens)
        for r, (o, w) in enumerate(zip(outs[sl], want_out, strict=True)):
            oracle.assert_bitwise_equal(o, w, what=f"combine group {g} rank {r}")
    return outs, got


# ---------------------------------------------------------------------------------------------------------------
# Routing patterns on the base configuration (one compiled function)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_random_routing(make_buffer, make_mesh, drop_prob):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=10, drop_prob=drop_prob)
    _, got = _check_against_oracle(buf, BASE, xs, topks, weights)
    # Independently of the oracle: every valid row says where it came from (self-describing payload).
    for d, res in enumerate(got):
        e_l = BASE.num_experts // BASE.num_ranks
        for e in range(e_l):
            c = int(res["recv_count"][e])
            src_rank, src_token = testing.decode_source(res["recv_x"][e, :c])
            np.testing.assert_array_equal(src_token, res["src_info"][e, :c])
            for r, t, k in zip(src_rank, src_token, res["src_topk_pos"][e, :c], strict=True):
                assert topks[r][t, k] == d * e_l + e
    total = sum(int(res["recv_count"].sum()) for res in got)
    assert total == sum(int((t >= 0).sum()) for t in topks)


def test_skewed_routing_fills_one_expert(make_buffer, make_mesh):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=11, routing="skewed")
    _, got = _check_against_oracle(buf, BASE, xs, topks, weights)
    assert got[0]["recv_count"][3] == BASE.num_ranks * BASE.max_tokens  # the layout's full capacity


@pytest.mark.parametrize("empty", ["some", "all"])
def test_ranks_with_no_tokens(make_buffer, make_mesh, empty):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=12)
    silent = [1, 2, 6] if empty == "some" else range(BASE.num_ranks)
    for r in silent:
        topks[r][:] = -1
        weights[r][:] = np.nan
    outs, got = _check_against_oracle(buf, BASE, xs, topks, weights)
    for r in silent:
        assert not np.any(outs[r].astype(np.float32)), "a token with no expert combines to zero"
    if empty == "all":
        assert all(not res["recv_count"].any() for res in got)


def test_invalid_ids_are_treated_as_no_expert(make_buffer, make_mesh):
    """Out-of-range ids and repeated experts never write out of bounds: they are dropped like -1 (the first
    occurrence of a repeated expert is kept), the same way the oracle defines it."""
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=13, drop_prob=0.0)
    topks[0][0] = [BASE.num_experts, 5, -7, 5]
    topks[3][2] = [9, 9, 9, 1000]
    topks[5][:, 1] = topks[5][:, 0]
    _check_against_oracle(buf, BASE, xs, topks, weights)


def test_routing_errors_are_reported_at_check(make_mesh):
    """The first bad entry of each rank's call reaches the host (only when there is one), and buf.check() raises
    them all in the words the native backends use (xla_ffi/include/jax_ll_ep/errors.h)."""
    mesh = make_mesh((BASE.num_ranks,), ("ep",))
    # A buffer of its own: the shared ones carry the reports of other tests' bad ids, never checked.
    with ep.Buffer(
        mesh, "ep", num_experts=32, max_tokens_per_rank=BASE.max_tokens, hidden=BASE.hidden, backend=BACKEND
    ) as buf:
        fn = testing.dispatch_fn(buf, None)
        xs, topks, _ = _inputs(BASE, seed=14)
        jax.block_until_ready(fn(*(testing.shard_per_device(buf, a) for a in (xs, topks))))
        buf.check()  # a clean call reports nothing
        topks[2][3] = [7, 7, -1, 0]  # a repeat
        topks[6][1] = [1, -2, 2, 99]  # invalid ids: -2 comes first
        jax.block_until_ready(fn(*(testing.shard_per_device(buf, a) for a in (xs, topks))))
        with pytest.raises(ep.RoutingError) as raised:
            buf.check()
        message = str(raised.value)
        assert "rank 2 of group 0, dispatch call: topk_idx[3, 1] = 7 repeats an earlier expert" in message, message
        assert "rank 6 of group 0, dispatch call: topk_idx[1, 1] = -2 is outside [-1, 32)" in message, message
        buf.check()  # cleared


# ---------------------------------------------------------------------------------------------------------------
# Split forms: the send half exchanges, the receive half builds the layout (dispatch) or reduces (combine)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [None, "pow2"])
def test_split_forms_match_oracle(make_buffer, make_mesh, fp8):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=16)
    _check_against_oracle(buf, BASE, xs, topks, weights, fp8=fp8, split=True)


def test_split_forms_on_a_two_dimensional_mesh(make_buffer, make_mesh):
    case = Case(num_ranks=4, num_experts=16)
    buf = _buffer(make_buffer, make_mesh, case, dp=2)
    xs, topks, weights = _inputs(case, seed=17, devices=8)
    _check_against_oracle(buf, case, xs, topks, weights, split=True)


def test_split_forms_overlap_other_work_and_interleave_layers(make_buffer, make_mesh):
    """Two layers with work between each send and its receive, and the second layer's dispatch sent while the
    first layer's results are still being reduced: every result equals the fused ops' (the same program runs on
    the native backends, which check the ordering rules)."""
    case = Case(num_ranks=4, num_experts=16, max_tokens=8, hidden=128)
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=18)

    def layer(x, topk_idx, w, split):
        if split:
            pending = ep.dispatch_send(buf, x, topk_idx)
            busy = jnp.tanh(x.astype(jnp.float32))  # work placed between the halves
            recv_x, _, handle = ep.dispatch_recv(buf, pending)
            y = (recv_x.astype(jnp.float32) * 0.5).astype(jnp.bfloat16)
            out = ep.combine_recv(buf, ep.combine_send(buf, y, topk_idx, w, handle))
        else:
            busy = jnp.tanh(x.astype(jnp.float32))
            recv_x, _, handle = ep.dispatch(buf, x, topk_idx)
            y = (recv_x.astype(jnp.float32) * 0.5).astype(jnp.bfloat16)
            out = ep.combine(buf, y, topk_idx, w, handle)
        return (out.astype(jnp.float32) + busy).astype(jnp.bfloat16)

    def two_layers(split):
        return testing.per_device_shard_map(buf, lambda x, t, w: layer(layer(x, t, w, split), t, w, split))

    args = [testing.shard_per_device(buf, a) for a in (xs, topks, weights)]
    fused, split = (testing.unshard_per_device(buf, two_layers(s)(*args)) for s in (False, True))
    for r in range(case.num_ranks):
        oracle.assert_bitwise_equal(split[r], fused[r], what=f"rank {r}")
    assert any(np.any(f.astype(np.float32) != 0) for f in fused)


def test_split_forms_grad(make_buffer, make_mesh):
    """bf16 split forms differentiate like the fused ops (JAX's own AD); an fp8 send refuses."""
    case = Case(num_ranks=4, num_experts=16, max_tokens=8, hidden=128)
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=19)
    x, t, w = (testing.shard_per_device(buf, a) for a in ([x.astype(np.float32) for x in xs], topks, weights))

    def loss(split, fp8=None):
        def body(x, t, w):
            if split:
                recv_x, _, handle = ep.dispatch_recv(buf, ep.dispatch_send(buf, x, t, fp8=fp8))
                y = testing.dequantize(recv_x)
                out = ep.combine_recv(buf, ep.combine_send(buf, y, t, w, handle))
            else:
                recv_x, _, handle = ep.dispatch(buf, x, t)
                out = ep.combine(buf, recv_x, t, w, handle)
            return jnp.sum(out.astype(jnp.float32) ** 2)[None]

        fn = jax.shard_map(body, mesh=buf.mesh, in_specs=P("ep"), out_specs=P("ep"))
        return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, t, w)), argnums=(0, 1)))

    (dx_fused, dw_fused), (dx_split, dw_split) = loss(False)(x, w), loss(True)(x, w)
    np.testing.assert_array_equal(np.asarray(dx_split), np.asarray(dx_fused))
    np.testing.assert_array_equal(np.asarray(dw_split), np.asarray(dw_fused))
    with pytest.raises(NotImplementedError, match="forward-only"):
        loss(True, ep.Fp8Options("pow2"))(x, w)


# ---------------------------------------------------------------------------------------------------------------
# Shapes: vary one dimension at a time
# ---------------------------------------------------------------------------------------------------------------
SHAPES = {
    "n<T": Case(num_tokens=5),
    "T=1": Case(max_tokens=1),
    "K=1": Case(topk=1),
    "K=2": Case(topk=2),
    "K=8": Case(topk=8),
    "K=16": Case(topk=16),
    "E/R=1": Case(num_experts=8),
    "E/R=2": Case(num_experts=16),
    "E/R=32": Case(num_experts=256),
    "R=1": Case(num_ranks=1, num_experts=4),
    "R=2": Case(num_ranks=2, num_experts=8),
    "R=4": Case(num_ranks=4, num_experts=16),
    "H=128": Case(hidden=128, max_tokens=4, topk=2, num_experts=16),
    "H=7168": Case(hidden=7168, max_tokens=4, topk=2, num_experts=16),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(make_buffer, make_mesh, name):
    case = SHAPES[name]
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=20 + list(SHAPES).index(name))
    _check_against_oracle(buf, case, xs, topks, weights)


@pytest.mark.parametrize("scale_format", ["float", "pow2", "ue8m0"])
def test_fp8(make_buffer, make_mesh, scale_format):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=30)
    _, got = _check_against_oracle(buf, BASE, xs, topks, weights, fp8=scale_format)
    want_dtype = ml_dtypes.float8_e8m0fnu if scale_format == "ue8m0" else np.float32
    assert got[0]["recv_x"].dtype == ml_dtypes.float8_e4m3fn and got[0]["recv_scale"].dtype == want_dtype


def test_fp8_large_hidden(make_buffer, make_mesh):
    case = SHAPES["H=7168"]
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=31)
    _check_against_oracle(buf, case, xs, topks, weights, fp8="ue8m0")


def test_quantize_fp8_matches_oracle_on_edge_values():
    """The JAX quantizer alone, on many blocks (including all-zero and tiny ones and exact-tie values)."""
    from jax_ll_ep import fp8

    rng = np.random.default_rng(32)
    x = testing.random_tokens(rng, 64, 512).astype(np.float32)
    x[0] = 0.0
    x[1, :128] = 1e-6
    x[2, :128] = 448.0 * np.sign(rng.standard_normal(128))
    x[3, :4] = [448.0, 1.0625, 1.1875, -2.0625]
    x = x.astype(BF16)
    for fmt in ("float", "pow2", "ue8m0"):
        data, scale = jax.jit(fp8.quantize_fp8, static_argnums=1)(x, fmt)
        want_data, want_scale = oracle.quantize_fp8(x, fmt)
        oracle.assert_bitwise_equal(np.asarray(data), want_data, what=f"{fmt} data")
        oracle.assert_bitwise_equal(np.asarray(scale), want_scale, what=f"{fmt} scale")


def test_division_is_correctly_rounded():
    """fp8 quantization's two divisions (amax / 448 and 448 / amax) against IEEE float32 division in NumPy."""
    from jax_ll_ep.fp8 import _divide_rn

    rng = np.random.default_rng(33)
    n = 200_000
    a = np.abs(rng.standard_normal(n).astype(np.float32) * np.exp2(rng.integers(-14, 120, n)).astype(np.float32))
    a = np.maximum(a, np.float32(1e-4)).astype(np.float32)
    a[:256] = np.float32(448) * np.exp2(np.arange(-128, 128) / 8).astype(np.float32)  # quotients near powers of 2
    c = np.full(n, 448, np.float32)
    d = (np.abs(rng.standard_normal(n)) + 0.01).astype(np.float32)  # general quotients
    fn = jax.jit(_divide_rn)
    for num, den in ((a, c), (c, a), (a, d)):
        oracle.assert_bitwise_equal(np.asarray(fn(num, den)), (num / den).astype(np.float32), what="a / b")


# ---------------------------------------------------------------------------------------------------------------
# Combine: rows past recv_count are never read; results are bitwise repeatable
# ---------------------------------------------------------------------------------------------------------------
def test_combine_random_outputs_poisoned_rows(make_buffer, make_mesh):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=40)
    handles = testing.run_dispatch(buf, xs, topks)
    rng = np.random.default_rng(41)
    e_l, rows = BASE.num_experts // BASE.num_ranks, BASE.num_ranks * BASE.max_tokens
    ys = [
        testing.poison_invalid_rows(testing.random_tokens(rng, e_l * rows, BASE.hidden).reshape(e_l, rows, -1), h)
        for h in (h["recv_count"] for h in handles)
    ]
    # Signed zeros: IEEE says +0 + (-0) = +0, so a first product of -0.0 must not survive as -0.0.
    for y in ys:
        y[:, :, :16] = -0.0
    weights[1][:, 0] = np.where(topks[1][:, 0] >= 0, -0.0, np.nan)
    got = testing.run_combine(buf, ys, topks, weights, handles)
    want_handles = oracle.dispatch(xs, topks, BASE.num_experts, BASE.max_tokens)
    want = oracle.combine(ys, topks, weights, want_handles, BASE.num_experts, BASE.max_tokens)
    for r in range(BASE.num_ranks):
        oracle.assert_bitwise_equal(got[r], want[r], what=f"combine rank {r}")
        assert np.all(np.isfinite(got[r].astype(np.float32)))
    # Repeatable: the same call again, and the same inputs through a freshly traced function, give the same bits.
    again = testing.run_combine(buf, ys, topks, weights, handles)
    fresh = testing.per_device_shard_map(
        buf,
        lambda y, t, w, s, lr, p: ep.combine(buf, y, t, w, ep.DispatchHandle(s, lr, p)),
    )
    args = [ys, topks, weights] + [[h[k] for h in handles] for k in ("src_info", "layout_range", "src_topk_pos")]
    fresh_out = testing.unshard_per_device(buf, fresh(*(testing.shard_per_device(buf, a) for a in args)))
    for r in range(BASE.num_ranks):
        oracle.assert_bitwise_equal(again[r], got[r], what="repeat")
        oracle.assert_bitwise_equal(fresh_out[r], got[r], what="fresh trace")


# ---------------------------------------------------------------------------------------------------------------
# Program structure: jit cache and HLO, lax.scan, 2-D mesh
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_program_is_all_to_all_and_cached(make_buffer, make_mesh):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, weights = _inputs(BASE, seed=50)
    fn = testing.roundtrip_fn(buf, None, None)
    args = [testing.shard_per_device(buf, a) for a in (xs, topks, weights)]
    hlo = fn.lower(*args).compile().as_text()
    assert "all-to-all" in hlo and "all-gather" not in hlo
    fn(*args)
    size = fn._cache_size()
    fn(*args)
    assert fn._cache_size() == size, "a second call with the same shapes must hit the jit cache"


def test_inside_lax_scan(make_buffer, make_mesh):
    """Three MoE layers in a lax.scan, each with its own routing; identity experts."""
    case, layers = BASE, 3
    buf = _buffer(make_buffer, make_mesh, case)
    rng = np.random.default_rng(60)
    xs = [testing.random_tokens(rng, case.n, case.hidden) for _ in range(case.num_ranks)]
    per_layer = [_inputs(case, seed=61 + layer)[1:] for layer in range(layers)]
    topks = [np.stack([per_layer[layer][0][r] for layer in range(layers)], axis=1) for r in range(case.num_ranks)]
    weights = [np.stack([per_layer[layer][1][r] for layer in range(layers)], axis=1) for r in range(case.num_ranks)]

    def body(x, topk_all, weights_all):
        def layer(x, routing):
            topk_idx, w = routing
            recv_x, _, handle = ep.dispatch(buf, x, topk_idx)
            return ep.combine(buf, recv_x, topk_idx, w, handle), None

        # per-device inputs are [n, L, K]: scan over the layer axis
        x, _ = jax.lax.scan(layer, x, (jnp.swapaxes(topk_all, 0, 1), jnp.swapaxes(weights_all, 0, 1)))
        return x

    fn = testing.per_device_shard_map(buf, body)
    got = testing.unshard_per_device(buf, fn(*(testing.shard_per_device(buf, a) for a in (xs, topks, weights))))
    want = xs
    for layer in range(layers):
        lt, lw = [t[:, layer] for t in topks], [w[:, layer] for w in weights]
        handles = oracle.dispatch(want, lt, case.num_experts, case.max_tokens)
        want = oracle.combine([h["recv_x"] for h in handles], lt, lw, handles, case.num_experts, case.max_tokens)
    for r in range(case.num_ranks):
        oracle.assert_bitwise_equal(got[r], want[r], what=f"scan rank {r}")


def test_2d_mesh_groups_are_independent(make_buffer, make_mesh):
    """(dp=2, ep=4): two 4-rank exchanges side by side; each group matches the oracle run on its own ranks."""
    case = Case(num_ranks=4, num_experts=16)
    buf = _buffer(make_buffer, make_mesh, case, dp=2)
    assert testing.device_axes(buf) == ("dp", "ep") and len(testing.group_slices(buf)) == 2
    xs, topks, weights = _inputs(case, seed=70, devices=8)  # rows encode the flat device index
    _, got = _check_against_oracle(buf, case, xs, topks, weights)
    for i, res in enumerate(got):
        c = res["recv_count"]
        for e in range(4):
            src, _ = testing.decode_source(res["recv_x"][e, : c[e]])
            assert np.all(src // 4 == i // 4), "rows crossed between dp groups"


# ---------------------------------------------------------------------------------------------------------------
# Autodiff
# ---------------------------------------------------------------------------------------------------------------
def _valid_mask(recv_count, rows):
    return (jnp.arange(rows)[None, :] < recv_count[:, None])[..., None]


def test_grad_dispatch(make_buffer, make_mesh):
    """d/dx sum(recv_x * G) = sum of G over the rows that copy x[t]. G holds small integers, so the bf16 sums of
    the gradient are exact and the comparison is exact. Also checks float32 x is accepted (cast to bf16)."""
    case = BASE
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, _ = _inputs(case, seed=80)
    rng = np.random.default_rng(81)
    e_l, rows = case.num_experts // case.num_ranks, case.num_ranks * case.max_tokens
    gs = [rng.integers(-4, 5, size=(e_l, rows, case.hidden)).astype(np.float32) for _ in xs]

    def body(x, topk_idx, g):
        recv_x, recv_count, _ = ep.dispatch(buf, x, topk_idx)
        return jnp.sum(jnp.where(_valid_mask(recv_count, rows), recv_x.astype(jnp.float32) * g, 0.0))[None]

    fn = jax.jit(jax.shard_map(body, mesh=buf.mesh, in_specs=P("ep"), out_specs=P("ep")))
    x32, t, g = (testing.shard_per_device(buf, a) for a in ([x.astype(np.float32) for x in xs], topks, gs))
    dx = testing.unshard_per_device(buf, jax.grad(lambda x: jnp.sum(fn(x, t, g)))(x32))

    handles = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
    want = [np.zeros((case.n, case.hidden), np.float32) for _ in xs]
    for d, h in enumerate(handles):
        for e in range(e_l):
            for row in range(int(h["recv_count"][e])):
                r = int(np.searchsorted(np.cumsum(h["layout_range"][e, :, 1]), row, side="right"))
                want[r][h["src_info"][e, row]] += gs[d][e, row]
    for r in range(case.num_ranks):
        assert dx[r].dtype == np.float32
        np.testing.assert_array_equal(dx[r], want[r])


def test_grad_combine(make_buffer, make_mesh):
    """dy[slot(t,k)] = w[t,k] * G[t] and dw[t,k] = <G[t], y[slot(t,k)]>; rows past recv_count and weights of
    -1 choices (NaN here) get zero gradient."""
    case = BASE
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=90)
    handles = testing.run_dispatch(buf, xs, topks)
    rng = np.random.default_rng(91)
    e_l, rows = case.num_experts // case.num_ranks, case.num_ranks * case.max_tokens
    ys = [testing.random_tokens(rng, e_l * rows, case.hidden).reshape(e_l, rows, -1) for _ in xs]
    # bf16-exact cotangents: the cotangent of combine's bf16 output is rounded to bf16 on its way back
    gs = [rng.standard_normal((case.n, case.hidden)).astype(BF16).astype(np.float32) for _ in xs]

    def body(y, topk_idx, w, g, s, lr, p):
        out = ep.combine(buf, y, topk_idx, w, ep.DispatchHandle(s, lr, p))
        return jnp.sum(out.astype(jnp.float32) * g)[None]

    fn = jax.jit(jax.shard_map(body, mesh=buf.mesh, in_specs=P("ep"), out_specs=P("ep")))
    hs = [[h[k] for h in handles] for k in ("src_info", "layout_range", "src_topk_pos")]
    y, t, w, g, *h = (testing.shard_per_device(buf, a) for a in (ys, topks, weights, gs, *hs))
    dy, dw = jax.grad(lambda y, w: jnp.sum(fn(y, t, w, g, *h)), argnums=(0, 1))(y, w)
    dy, dw = testing.unshard_per_device(buf, dy), testing.unshard_per_device(buf, dw)

    tables = [oracle.slot_table(hd) for hd in handles]
    want_dy = [np.zeros((e_l, rows, case.hidden), np.float32) for _ in xs]
    want_dw = [np.zeros_like(wt) for wt in weights]
    for r in range(case.num_ranks):
        for t_, k in zip(*np.nonzero(topks[r] >= 0), strict=True):
            d, e = divmod(int(topks[r][t_, k]), e_l)
            row, _ = tables[d][(e, r, int(t_))]
            want_dy[d][e, row] = weights[r][t_, k] * gs[r][t_]
            want_dw[r][t_, k] = np.dot(gs[r][t_].astype(np.float64), ys[d][e, row].astype(np.float64))
    for r in range(case.num_ranks):
        np.testing.assert_allclose(dy[r].astype(np.float32), want_dy[r], rtol=1e-2, atol=1e-6)
        np.testing.assert_allclose(dw[r], want_dw[r], rtol=1e-4, atol=1e-3)


def test_grad_roundtrip_matches_dense_moe(make_buffer, make_mesh):
    """Identity experts: out[t] = sum_k w[t,k] x[t], so dx[t] = (sum_k w[t,k]) G[t] and dw[t,k] = <G[t], x[t]>."""
    case = BASE
    buf = _buffer(make_buffer, make_mesh, case)
    xs, topks, weights = _inputs(case, seed=100)
    rng = np.random.default_rng(101)
    # bf16-exact cotangents: the cotangent of combine's bf16 output is rounded to bf16 on its way back
    gs = [rng.standard_normal((case.n, case.hidden)).astype(BF16).astype(np.float32) for _ in xs]

    def body(x, topk_idx, w, g):
        recv_x, _, handle = ep.dispatch(buf, x, topk_idx)
        out = ep.combine(buf, recv_x, topk_idx, w, handle)
        return jnp.sum(out.astype(jnp.float32) * g)[None]

    fn = jax.jit(jax.shard_map(body, mesh=buf.mesh, in_specs=P("ep"), out_specs=P("ep")))
    x, t, w, g = (testing.shard_per_device(buf, a) for a in (xs, topks, weights, gs))
    dx, dw = jax.grad(lambda x, w: jnp.sum(fn(x, t, w, g)), argnums=(0, 1))(x, w)
    dx, dw = testing.unshard_per_device(buf, dx), testing.unshard_per_device(buf, dw)
    for r in range(case.num_ranks):
        valid = topks[r] >= 0
        wsum = np.where(valid, weights[r], 0.0).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(dx[r].astype(np.float32), wsum * gs[r], rtol=2e-2, atol=1e-2)
        dots = np.einsum("th,th->t", gs[r], xs[r].astype(np.float32))[:, None]
        np.testing.assert_allclose(dw[r], np.where(valid, dots, 0.0), rtol=1e-3, atol=1e-3)


def test_grad_through_fp8_dispatch_raises(make_buffer, make_mesh):
    buf = _buffer(make_buffer, make_mesh, BASE)
    xs, topks, _ = _inputs(BASE, seed=110)

    def body(x, topk_idx):
        recv_x, _, _ = ep.dispatch(buf, x, topk_idx, fp8=ep.Fp8Options("pow2"))
        return jnp.sum(recv_x.data.astype(jnp.float32))[None]

    fn = jax.jit(jax.shard_map(body, mesh=buf.mesh, in_specs=P("ep"), out_specs=P("ep")))
    x, t = testing.shard_per_device(buf, [x.astype(np.float32) for x in xs]), testing.shard_per_device(buf, topks)
    assert np.isfinite(np.asarray(fn(x, t))).all()  # the forward pass works
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda x: jnp.sum(fn(x, t)))(x)


# ---------------------------------------------------------------------------------------------------------------
# The same contract on GPU: XLA:GPU's simplifier and LLVM's NVPTX contraction must not change a bit either
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [None, "float", "pow2", "ue8m0"])
def test_on_gpu_matches_oracle(fp8):
    gpus = jax.devices("gpu")
    case = Case(num_ranks=len(gpus), num_experts=4 * len(gpus), max_tokens=64, hidden=512, topk=4)
    mesh = testing.ep_mesh(case.num_ranks, devices=gpus)
    with ep.Buffer(
        mesh,
        "ep",
        num_experts=case.num_experts,
        max_tokens_per_rank=case.max_tokens,
        hidden=case.hidden,
        backend=BACKEND,
    ) as buf:
        xs, topks, weights = _inputs(case, seed=120)
        for y in xs:  # signed zeros in every block: combine's first product is then -0.0 for these channels
            y[:, 3:8] = -0.0
        _check_against_oracle(buf, case, xs, topks, weights, fp8=fp8)
