"""Fuzzing dispatch and combine with hypothesis (seeded: ``derandomize=True``; bounded: a fixed number of examples).

Each example draws a buffer shape (ranks, experts, max_tokens, hidden), the tokens per rank, top-k, routing with
out-of-range and repeated ids and -1, weights with NaN, +-Inf and 0 among them, an fp8 format (where hidden allows
one) and a set of masked ranks, then runs dispatch -> identity experts -> combine. Every example must either equal
the oracle on the masked routing (bit for bit; a NaN output only where the oracle has one: NaN payloads are not part
of the contract), or raise the documented error: a routing error fails the cpu backend's call (JaxRuntimeError naming
the entry) and ``buf.check()`` raises RoutingError; the xla backend returns the results (bad entries as -1) and
reports at ``check()``. Buffers are reused across examples, so every example also checks that the previous one left
its buffer intact (nothing written out of bounds, no call left half done).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import oracle
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jax_ll_ep as ep
from jax_ll_ep import testing

# NaN and Inf weights make the oracle's float32 arithmetic warn; the results are compared all the same.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@dataclasses.dataclass(frozen=True)
class Shape:
    num_ranks: int
    num_experts: int
    max_tokens: int
    hidden: int


SHAPES = (Shape(8, 16, 4, 128), Shape(4, 12, 8, 256), Shape(2, 6, 3, 136))
TOPK = (1, 2, 3, 5, 8)
FP8 = (None, "float", "pow2", "ue8m0")

_buffers: dict = {}


def _buffer(backend: str, shape: Shape) -> ep.Buffer:
    key = (backend, shape)
    if key not in _buffers or _buffers[key].closed:
        devices = jax.devices("cpu")[: shape.num_ranks]
        _buffers[key] = ep.Buffer(
            testing.ep_mesh(shape.num_ranks, devices=devices),
            "ep",
            num_experts=shape.num_experts,
            max_tokens_per_rank=shape.max_tokens,
            hidden=shape.hidden,
            backend=backend,
            timeout_s=30.0,
        )
    return _buffers[key]


@pytest.fixture(scope="module", autouse=True)
def _close_buffers():
    yield
    for buf in _buffers.values():
        buf.close()
    _buffers.clear()


@st.composite
def cases(draw):
    shape = draw(st.sampled_from(SHAPES))
    n = draw(st.sampled_from(sorted({1, max(1, shape.max_tokens // 2), shape.max_tokens})))
    k = draw(st.sampled_from(TOPK))
    fp8 = draw(st.sampled_from(FP8)) if shape.hidden % 128 == 0 else None
    masked = tuple(sorted(draw(st.sets(st.integers(0, shape.num_ranks - 1), max_size=shape.num_ranks - 1))))
    return dict(
        shape=shape,
        n=n,
        k=k,
        fp8=fp8,
        masked=masked,
        seed=draw(st.integers(0, 2**31 - 1)),
        p_none=draw(st.sampled_from((0.0, 0.2, 1.0))),  # -1 entries
        p_bad=draw(st.sampled_from((0.0, 0.0, 0.1))),  # ids outside [-1, E)
        p_repeat=draw(st.sampled_from((0.0, 0.0, 0.15))),  # an id repeated from earlier in its row
        p_odd_weight=draw(st.sampled_from((0.0, 0.2))),  # NaN, +-Inf or 0 instead of a softmax weight
    )


def make_inputs(c: dict):
    s: Shape = c["shape"]
    rng = np.random.default_rng(c["seed"])
    n, k, e = c["n"], c["k"], s.num_experts
    if s.hidden % 128 == 0:
        xs = [testing.random_tokens(rng, n, s.hidden) for _ in range(s.num_ranks)]
    else:  # (random_tokens scales whole 128-channel blocks)
        xs = [rng.standard_normal((n, s.hidden)).astype(testing.BF16) for _ in range(s.num_ranks)]
    topks, weights = [], []
    for _ in range(s.num_ranks):
        topk = np.where(rng.random((n, k)) < 0.5, rng.integers(0, e, (n, k)), -1)
        topk[:, : min(k, e)] = testing.random_routing(rng, n, min(k, e), e)
        topk[rng.random((n, k)) < c["p_none"]] = -1
        bad = rng.random((n, k)) < c["p_bad"]
        topk[bad] = rng.choice([-7, -2, e, e + 3, 2**31 - 1], size=int(bad.sum()))
        for t, j in zip(*np.nonzero(rng.random((n, k)) < c["p_repeat"]), strict=True):
            if j > 0:
                topk[t, j] = topk[t, rng.integers(0, j)]
        topk = topk.astype(np.int32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        odd = rng.random((n, k)) < c["p_odd_weight"]
        w[odd] = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32), size=int(odd.sum()))
        topks.append(topk)
        weights.append(w)
    return xs, topks, weights


def routing_errors(topk: np.ndarray, num_experts: int) -> bool:
    """Whether a row holds an id outside [-1, E) or repeats an expert (the errors the native backends report)."""
    for row in np.asarray(topk):
        seen = set()
        for idx in row.tolist():
            if idx < -1 or idx >= num_experts:
                return True
            if idx >= 0:
                if idx in seen:
                    return True
                seen.add(idx)
    return False


def assert_same_values(got, want, what: str) -> None:
    """Bitwise equal, except that a NaN only has to meet a NaN (its payload and sign are not part of the contract)."""
    g, w = np.asarray(got).astype(np.float32), np.asarray(want).astype(np.float32)
    nan = np.isnan(w)
    assert np.array_equal(np.isnan(g), nan), f"{what}: NaN in different places"
    g2, w2 = np.asarray(got).copy(), np.asarray(want).copy()
    g2[nan], w2[nan] = 0, 0
    oracle.assert_bitwise_equal(g2, w2, what=what)


def run_case(backend: str, c: dict) -> None:
    s: Shape = c["shape"]
    buf = _buffer(backend, s)
    buf.mask_ranks(c["masked"])
    xs, topks, weights = make_inputs(c)
    masked = c["masked"]
    live_topks = oracle.mask_routing(topks, masked, s.num_experts)
    want = oracle.dispatch(xs, live_topks, s.num_experts, s.max_tokens, c["fp8"])
    if c["fp8"] is None:
        want_ys = [w["recv_x"] for w in want]
    else:
        want_ys = [oracle.dequantize_fp8(w["recv_x"], w["recv_scale"]).astype(oracle.BF16) for w in want]
    options = None if c["fp8"] is None else ep.Fp8Options(c["fp8"])
    erroneous = any(routing_errors(t, s.num_experts) for r, t in enumerate(topks) if r not in masked)
    event("routing errors" if erroneous else "clean routing")
    event(f"{len(masked)} masked")
    event(f"fp8 {c['fp8']}")
    event(f"shape {s.num_ranks}x{s.num_experts}x{s.max_tokens}x{s.hidden}")
    if any(np.any(~np.isfinite(w) | (w == 0)) for w in weights):
        event("NaN/Inf/0 weights")
    if erroneous and backend == "cpu":
        # The call completes on every rank (nobody is left waiting), then fails and names the entry.
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"topk_idx\[\d+, \d+\] = -?\d+ (is outside|repeats)"):
            jax.block_until_ready(testing.run_dispatch(buf, xs, topks, fp8=options))
        with pytest.raises(ep.RoutingError):
            buf.check()
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"topk_idx\[\d+, \d+\] = -?\d+ (is outside|repeats)"):
            jax.block_until_ready(testing.run_combine(buf, want_ys, topks, weights, want))
        with pytest.raises(ep.RoutingError):
            buf.check()
        return
    got = testing.run_dispatch(buf, xs, topks, fp8=options)
    for r in range(s.num_ranks):
        if r not in masked:
            oracle.assert_dispatch_equal(got[r], want[r], where=f"{backend} {c} rank {r}")
    if c["fp8"] is None:
        ys = [g["recv_x"] for g in got]
    else:
        ys = [oracle.dequantize_fp8(g["recv_x"], g["recv_scale"]).astype(oracle.BF16) for g in got]
    outs = testing.run_combine(buf, ys, topks, weights, got)
    want_out = oracle.combine(want_ys, live_topks, weights, want, s.num_experts, s.max_tokens)
    for r in range(s.num_ranks):
        if r not in masked:
            assert_same_values(outs[r], want_out[r], f"{backend} {c} combine rank {r}")
    if erroneous:
        with pytest.raises(ep.RoutingError):
            buf.check()
    else:
        buf.check()
    if backend == "cpu":
        dropped = buf.dropped_pairs()
        for r in range(s.num_ranks):
            if r not in masked:
                n = oracle.count_dropped(topks[r], masked, s.num_experts, s.num_ranks)
                assert dropped[(0, r)].last_call == n, (r, dropped[(0, r)], n)


FUZZ = settings(
    derandomize=True,  # seeded: the same examples on every run
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(FUZZ, max_examples=200)
@given(cases())
def test_fuzz_cpu(case):
    run_case("cpu", case)


@settings(FUZZ, max_examples=15)
@given(cases())
def test_fuzz_xla(case):
    run_case("xla", case)
