"""The ``cpu`` backend (the protocol in C++ over host memory, xla_ffi/cpu/) on 8 simulated CPU devices.

Everything is checked bit for bit against the NumPy oracle (tests/oracle.py), on the routing and shape cases of
tests/test_reference.py, and under the conditions the protocol exists for: injected delays that force every arrival
order (with timestamps proving that no rank returns before a slow rank's tokens are out), thousands of back-to-back
calls with fresh data, split send/recv forms, misuse of the split forms, routing errors, a rank that never calls
(timeout naming the missing pairs, then a new buffer works), and diverging call sequences. Multi-process runs of
the same checks are in tests/multiprocess/.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import ml_dtypes
import numpy as np
import oracle
import pytest
import test_reference as ref  # the shared routing/shape cases and the oracle round-trip check

import jax_ll_ep as ep
from jax_ll_ep import _extension, _jax_internals, testing
from jax_ll_ep.testing import cpu_hooks

BF16 = ml_dtypes.bfloat16
ENTER, SIGNALLING, RETURNED = range(3)  # test_stamps columns
DISPATCH, COMBINE = 0, 1


def _cpu_buffer(make_buffer, make_mesh, case: ref.Case, *, dp: int = 0):
    mesh = make_mesh((dp, case.num_ranks), ("dp", "ep")) if dp else make_mesh((case.num_ranks,), ("ep",))
    return make_buffer(
        mesh, backend="cpu", num_experts=case.num_experts, max_tokens_per_rank=case.max_tokens, hidden=case.hidden
    )


def _fresh_buffer(case: ref.Case, *, timeout_s: float = 30.0, devices=None) -> ep.Buffer:
    mesh = testing.ep_mesh(case.num_ranks, devices=devices)
    return ep.Buffer(
        mesh,
        "ep",
        num_experts=case.num_experts,
        max_tokens_per_rank=case.max_tokens,
        hidden=case.hidden,
        backend="cpu",
        timeout_s=timeout_s,
    )


# ---------------------------------------------------------------------------------------------------------------
# Bit-exact against the oracle: the routing and shape cases of the reference backend's suite
# ---------------------------------------------------------------------------------------------------------------
def test_buffer_reports_its_region(make_buffer, make_mesh):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    assert buf.backend.name == "cpu"
    c = ref.BASE
    assert buf.nbytes_per_rank == _extension.cpu_module.region_bytes(c.num_ranks, c.num_experts, c.max_tokens, c.hidden)
    assert buf.nbytes_per_rank > 2 * (c.num_experts // c.num_ranks) * c.num_ranks * c.max_tokens * 2 * c.hidden


@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_random_routing(make_buffer, make_mesh, drop_prob):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=110, drop_prob=drop_prob)
    _, got = ref._check_against_oracle(buf, ref.BASE, xs, topks, weights)
    # Independently of the oracle: every valid row names its source, which chose this expert at src_topk_pos.
    e_l = ref.BASE.num_experts // ref.BASE.num_ranks
    for d, res in enumerate(got):
        for e in range(e_l):
            c = int(res["recv_count"][e])
            src_rank, src_token = testing.decode_source(res["recv_x"][e, :c])
            np.testing.assert_array_equal(src_token, res["src_info"][e, :c])
            for r, t, k in zip(src_rank, src_token, res["src_topk_pos"][e, :c], strict=True):
                assert topks[r][t, k] == d * e_l + e


def test_skewed_routing_fills_one_expert(make_buffer, make_mesh):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=111, routing="skewed")
    _, got = ref._check_against_oracle(buf, ref.BASE, xs, topks, weights)
    assert got[0]["recv_count"][3] == ref.BASE.num_ranks * ref.BASE.max_tokens


@pytest.mark.parametrize("empty", ["some", "all"])
def test_ranks_with_no_tokens(make_buffer, make_mesh, empty):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=112)
    silent = [1, 2, 6] if empty == "some" else range(ref.BASE.num_ranks)
    for r in silent:
        topks[r][:] = -1
        weights[r][:] = np.nan
    outs, got = ref._check_against_oracle(buf, ref.BASE, xs, topks, weights)
    for r in silent:
        assert not np.any(outs[r].astype(np.float32))
    if empty == "all":
        assert all(not res["recv_count"].any() for res in got)


@pytest.mark.parametrize("name", list(ref.SHAPES))
def test_shapes(make_buffer, make_mesh, name):
    case = ref.SHAPES[name]
    buf = _cpu_buffer(make_buffer, make_mesh, case)
    xs, topks, weights = ref._inputs(case, seed=120 + list(ref.SHAPES).index(name))
    ref._check_against_oracle(buf, case, xs, topks, weights)


@pytest.mark.parametrize("scale_format", ["float", "pow2", "ue8m0"])
def test_fp8(make_buffer, make_mesh, scale_format):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=130)
    _, got = ref._check_against_oracle(buf, ref.BASE, xs, topks, weights, fp8=scale_format)
    want_dtype = ml_dtypes.float8_e8m0fnu if scale_format == "ue8m0" else np.float32
    assert got[0]["recv_x"].dtype == ml_dtypes.float8_e4m3fn and got[0]["recv_scale"].dtype == want_dtype


def test_fp8_edge_values(make_buffer, make_mesh):
    """All-zero and tiny blocks (amax floor), exact ties of e4m3 rounding, subnormal codes, the clip at 448."""
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=131, drop_prob=0.0)
    rng = np.random.default_rng(131)
    x = xs[0].astype(np.float32)
    x[0, 3:] = 0.0
    x[1, 3:128] = 1e-6
    x[2, 3:128] = 448.0 * np.sign(rng.standard_normal(125))
    x[3, 3:11] = [448.0, 1.0625, 1.1875, -2.0625, 0.0009765625, -0.00146484375, 3e-5, 2.0**-10]
    x[4, 128:] = rng.standard_normal(128) * 2.0**-12  # subnormal e4m3 codes after scaling
    xs[0] = x.astype(BF16)
    for fmt in ("float", "pow2", "ue8m0"):
        ref._check_against_oracle(buf, ref.BASE, xs, topks, weights, fp8=fmt)


def test_fp8_large_hidden(make_buffer, make_mesh):
    case = ref.SHAPES["H=7168"]
    buf = _cpu_buffer(make_buffer, make_mesh, case)
    xs, topks, weights = ref._inputs(case, seed=132)
    ref._check_against_oracle(buf, case, xs, topks, weights, fp8="ue8m0")


def test_two_dimensional_mesh_runs_independent_groups(make_buffer, make_mesh):
    """(dp=2, ep=4): two 4-rank exchanges side by side, each checked against its own oracle run."""
    case = ref.Case(num_ranks=4, num_experts=16)
    buf = _cpu_buffer(make_buffer, make_mesh, case, dp=2)
    xs, topks, weights = ref._inputs(case, seed=140, devices=8)
    ref._check_against_oracle(buf, case, xs, topks, weights)


def test_results_are_bitwise_repeatable(make_buffer, make_mesh):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=141)
    first, _ = testing.run_roundtrip(buf, xs, topks, weights)
    for _ in range(3):
        again, _ = testing.run_roundtrip(buf, xs, topks, weights)
        for a, b in zip(first, again, strict=True):
            oracle.assert_bitwise_equal(b, a, what="repeated combine")


# ---------------------------------------------------------------------------------------------------------------
# Split forms
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [None, "pow2"])
def test_split_forms_match_oracle(make_buffer, make_mesh, fp8):
    buf = _cpu_buffer(make_buffer, make_mesh, ref.BASE)
    xs, topks, weights = ref._inputs(ref.BASE, seed=150)
    ref._check_against_oracle(buf, ref.BASE, xs, topks, weights, fp8=fp8, split=True)


SMALL = ref.Case(num_experts=16, max_tokens=4, hidden=128, topk=2)


def _send_fn(buf):
    return testing.per_device_shard_map(buf, lambda x, t: ep.dispatch_send(buf, x, t).ticket)


def _recv_fn(buf):
    def body(ticket):
        return testing.dispatch_outputs(ep.dispatch_recv(buf, ep.DispatchPending(ticket, None)))

    return testing.per_device_shard_map(buf, body)


def test_split_send_twice_is_refused_without_touching_peers():
    """A second send while a call is open fails on every rank and writes nothing; the open call's receive, run
    afterwards, still delivers exactly the first send's tokens."""
    buf = _fresh_buffer(SMALL)
    try:
        xs, topks, _ = ref._inputs(SMALL, seed=160)
        xs2, topks2, _ = ref._inputs(SMALL, seed=161)
        send = _send_fn(buf)
        tickets = testing.unshard_per_device(buf, send(*(testing.shard_per_device(buf, a) for a in (xs, topks))))
        assert all(int(t[0]) == 1 for t in tickets)  # the ticket is the call's sequence number
        with pytest.raises(jax.errors.JaxRuntimeError, match="still open"):
            jax.block_until_ready(send(*(testing.shard_per_device(buf, a) for a in (xs2, topks2))))
        with pytest.raises(ep.JaxLlEpError, match="split send/recv used out of order"):
            buf.check()
        out = _recv_fn(buf)(testing.shard_per_device(buf, tickets))
        got = testing.split_dispatch_outputs(buf, out)
        want = oracle.dispatch(xs, topks, SMALL.num_experts, SMALL.max_tokens)
        for r in range(SMALL.num_ranks):
            oracle.assert_dispatch_equal(got[r], want[r], where=f"rank {r}")
        buf.check()
    finally:
        buf.close()


def test_split_recv_without_send_is_refused():
    buf = _fresh_buffer(SMALL)
    try:
        tickets = [np.ones((1,), np.int32)] * SMALL.num_ranks
        with pytest.raises(jax.errors.JaxRuntimeError, match="no dispatch_send is open"):
            jax.block_until_ready(_recv_fn(buf)(testing.shard_per_device(buf, tickets)))
        with pytest.raises(ep.JaxLlEpError, match="out of order"):
            buf.check()
        # Nothing was opened or advanced: a normal call is call 1 and matches the oracle.
        xs, topks, weights = ref._inputs(SMALL, seed=162)
        _check_roundtrip(buf, SMALL, xs, topks, weights)
    finally:
        buf.close()


def _check_roundtrip(buf, case, xs, topks, weights):
    outs, got = testing.run_roundtrip(buf, xs, topks, weights)
    want = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
    for r in range(case.num_ranks):
        oracle.assert_dispatch_equal(got[r], want[r], where=f"rank {r}")
    want_out = oracle.combine([w["recv_x"] for w in want], topks, weights, want, case.num_experts, case.max_tokens)
    for r in range(case.num_ranks):
        oracle.assert_bitwise_equal(outs[r], want_out[r], what=f"combine rank {r}")


# ---------------------------------------------------------------------------------------------------------------
# Runtime routing errors: skipped (never an out-of-bounds write), the protocol completes, then the error is raised
# ---------------------------------------------------------------------------------------------------------------
def test_routing_errors_complete_the_call_then_raise():
    case = SMALL
    buf = _fresh_buffer(case)
    try:
        xs, topks, weights = ref._inputs(case, seed=170, drop_prob=0.0)
        topks[2][1, 1] = case.num_experts + 5  # out of range
        topks[5][3] = [7, 7]  # repeated expert
        # (XLA raises one failing device's error: either rank's)
        with pytest.raises(
            jax.errors.JaxRuntimeError, match=r"topk_idx\[(1, 1\] = 21 is outside|3, 1\] = 7 repeats)"
        ) as run:
            jax.block_until_ready(testing.run_dispatch(buf, xs, topks))
        with pytest.raises(ep.RoutingError) as info:
            buf.check()
        message = str(info.value)
        assert "rank 2 of group 0" in message and "rank 5 of group 0" in message and "repeats" in message
        # One wording (xla_ffi/include/jax_ll_ep/errors.h): the failed call said what check() says of that rank.
        said = re.search(r"(rank \d of group 0, dispatch call seq=1: topk_idx.*?treated as -1)", str(run.value))
        assert said is not None and said.group(1) in message, (str(run.value), message)
        buf.check()  # cleared
        # Every rank completed call 1 (no one is left waiting, nothing was written out of bounds): call 2 and 3 on
        # the same buffer are exact. A combine with a bad id also completes first, then raises.
        xs, topks, weights = ref._inputs(case, seed=171)
        _check_roundtrip(buf, case, xs, topks, weights)
        want = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
        bad = [t.copy() for t in topks]
        bad[6][0, 0] = -3
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"topk_idx\[0, 0\] = -3 is outside"):
            jax.block_until_ready(testing.run_combine(buf, [w["recv_x"] for w in want], bad, weights, want))
        with pytest.raises(ep.RoutingError, match="rank 6 of group 0, combine"):
            buf.check()
        xs, topks, weights = ref._inputs(case, seed=172)
        _check_roundtrip(buf, case, xs, topks, weights)
    finally:
        buf.close()


def test_combine_with_a_foreign_handle_is_reported():
    """topk_idx that does not match the handle's dispatch: rows are missing; the call completes and says so."""
    case = SMALL
    buf = _fresh_buffer(case)
    try:
        xs, topks, weights = ref._inputs(case, seed=175, drop_prob=0.0)
        want = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
        rng = np.random.default_rng(176)
        other = [testing.random_routing(rng, case.n, case.topk, case.num_experts) for _ in topks]
        with pytest.raises(jax.errors.JaxRuntimeError, match="must come from the same dispatch"):
            jax.block_until_ready(testing.run_combine(buf, [w["recv_x"] for w in want], other, weights, want))
        with pytest.raises(ep.JaxLlEpError, match="does not match"):
            buf.check()
    finally:
        buf.close()


# ---------------------------------------------------------------------------------------------------------------
# Adversarial timing: delays injected by the native test hook
# ---------------------------------------------------------------------------------------------------------------
DELAY = ref.Case(num_experts=16, max_tokens=8, hidden=128, topk=3)


@pytest.fixture(scope="module")
def delay_buffer():
    buf = _fresh_buffer(DELAY)
    yield buf
    buf.close()


@pytest.mark.parametrize("point", cpu_hooks.HOOK_POINTS)
def test_every_rank_slow_at_every_point(delay_buffer, point):
    """Rank `slow` is delayed 30-60 ms at `point` (the others by 0-3 ms at every point), for every rank in turn. The
    results stay exact, and no rank's dispatch or combine returns before the slow rank began storing its signals.

    The bound is the slow rank's stamp taken just before its first signal store: every peer needs the signal the slow
    rank addresses to it, and that store comes after the stamp. (A stamp taken after the last store bounds nothing:
    a peer may return as soon as its own signal is out, while the slow rank is still storing the others' or has
    lost its core; that made this test fail on a busy machine while the protocol was right.)"""
    buf, case = delay_buffer, DELAY
    jitter = {(r, p): (0.0, 0.003) for r in range(case.num_ranks) for p in cpu_hooks.HOOK_POINTS}
    for slow in range(case.num_ranks):
        delays = dict(jitter)
        delays[(slow, point)] = (0.03, 0.06)
        cpu_hooks.set_test_delays(buf, delays, seed=1000 * slow + cpu_hooks.HOOK_POINTS.index(point))
        try:
            xs, topks, weights = ref._inputs(case, seed=200 + slow, drop_prob=0.2)
            _check_roundtrip(buf, case, xs, topks, weights)
            stamps = cpu_hooks.test_stamps(buf)[0]  # [R, kind, (enter, signalling, returned)]
        finally:
            cpu_hooks.clear_test_hooks(buf)
        for kind in (DISPATCH, COMBINE):
            s = stamps[:, kind]
            assert np.all(s > 0), f"a rank did not record its call: {s}"
            if point == "before_recv":
                assert s[slow, RETURNED] - s[slow, ENTER] >= 0.03e9
                continue
            assert s[slow, SIGNALLING] - s[slow, ENTER] >= 0.03e9, "the delay did not happen"
            early = [r for r in range(case.num_ranks) if s[r, RETURNED] < s[slow, SIGNALLING]]
            assert not early, f"ranks {early} returned before slow rank {slow} began storing its signals ({point})"


def test_random_delays_everywhere(delay_buffer):
    """Every rank delayed at every point by random amounts (0-8 ms), a different schedule each round."""
    buf, case = delay_buffer, DELAY
    delays = {(r, p): (0.0, 0.008) for r in range(case.num_ranks) for p in cpu_hooks.HOOK_POINTS}
    for round_ in range(8):
        cpu_hooks.set_test_delays(buf, delays, seed=round_)
        try:
            xs, topks, weights = ref._inputs(case, seed=300 + round_, drop_prob=0.2)
            _check_roundtrip(buf, case, xs, topks, weights)
        finally:
            cpu_hooks.clear_test_hooks(buf)


# ---------------------------------------------------------------------------------------------------------------
# Back-to-back: 2,000 calls with fresh data, from Python and inside lax.scan, every result checked
# ---------------------------------------------------------------------------------------------------------------
B2B = ref.Case(num_experts=16, max_tokens=4, hidden=16, topk=2)
CALLS = 2000


def _b2b_step(rng, case=B2B):
    xs = [testing.random_tokens(rng, case.n, case.hidden) for _ in range(case.num_ranks)]
    topks = [testing.random_routing(rng, case.n, case.topk, case.num_experts, drop_prob=0.2) for _ in xs]
    weights = [testing.random_weights(rng, t) for t in topks]
    return xs, topks, weights


def _fresh_ys(rng, want, case=B2B):
    e_l, rows = case.num_experts // case.num_ranks, case.num_ranks * case.max_tokens
    return [testing.random_tokens(rng, e_l * rows, case.hidden).reshape(e_l, rows, case.hidden) for _ in want]


def _same_valid_rows(got: dict, want: dict) -> bool:
    """Fast bitwise check of one rank's dispatch result on its valid rows (the oracle's helper explains failures)."""
    count = want["recv_count"]
    if not (np.array_equal(got["recv_count"], count) and np.array_equal(got["layout_range"], want["layout_range"])):
        return False
    valid = np.arange(got["src_info"].shape[1])[None, :] < count[:, None]
    return all(
        np.array_equal(oracle.bits(got[k])[valid], oracle.bits(want[k])[valid])
        for k in ("recv_x", "src_info", "src_topk_pos")
    )


def _assert_dispatch(got: list[dict], want: list[dict], where: str):
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        if not _same_valid_rows(g, w):
            oracle.assert_dispatch_equal(g, w, where=f"{where} rank {r}")
            raise AssertionError(f"{where} rank {r}: dispatch differs")


def _assert_outs(got, want, where: str):
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        oracle.assert_bitwise_equal(g, w, what=f"{where} rank {r}")


@pytest.fixture(scope="module")
def b2b_buffer():
    buf = _fresh_buffer(B2B)
    yield buf
    buf.close()


@pytest.mark.slow
@pytest.mark.parametrize("sequence", ["dispatch", "combine", "interleaved"])
def test_back_to_back_from_python(b2b_buffer, sequence):
    buf, case, rng = b2b_buffer, B2B, np.random.default_rng(400 + len(sequence))
    calls = 0
    while calls < CALLS:
        xs, topks, weights = _b2b_step(rng)
        want = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
        if sequence in ("dispatch", "interleaved"):
            got = testing.run_dispatch(buf, xs, topks)
            _assert_dispatch(got, want, f"call {calls}")
            calls += 1
            handles = got
        else:
            handles = want
        if sequence in ("combine", "interleaved"):
            ys = _fresh_ys(rng, want)
            outs = testing.run_combine(buf, ys, topks, weights, handles)
            _assert_outs(
                outs, oracle.combine(ys, topks, weights, want, case.num_experts, case.max_tokens), f"call {calls}"
            )
            calls += 1
    buf.check()


@functools.cache
def _scan_fn(buf: ep.Buffer, sequence: str):
    def body(xs, topks, weights, ys, src_info, layout_range, src_topk_pos):
        def step(carry, args):
            x, topk_idx, w, y, si, lr, sp = args
            if sequence == "dispatch":
                return carry, testing.dispatch_outputs(ep.dispatch(buf, x, topk_idx))
            if sequence == "combine":
                return carry, ep.combine(buf, y, topk_idx, w, ep.DispatchHandle(si, lr, sp))
            recv_x, recv_count, handle = ep.dispatch(buf, x, topk_idx)
            out = ep.combine(buf, recv_x, topk_idx, w, handle)  # identity experts: y = recv_x
            return carry, (testing.dispatch_outputs((recv_x, recv_count, handle)), out)

        return jax.lax.scan(step, None, (xs, topks, weights, ys, src_info, layout_range, src_topk_pos))[1]

    return testing.per_device_shard_map(buf, body)


@pytest.mark.slow
@pytest.mark.parametrize("sequence", ["dispatch", "combine", "interleaved"])
def test_back_to_back_in_scan(b2b_buffer, sequence):
    """One jitted program whose lax.scan makes 2,000 calls (1,000 dispatch + combine pairs when interleaved)."""
    buf, case, rng = b2b_buffer, B2B, np.random.default_rng(500 + len(sequence))
    steps = CALLS // 2 if sequence == "interleaved" else CALLS
    before = cpu_hooks.sequence_numbers(buf)
    data = [_b2b_step(rng) for _ in range(steps)]
    wants = [oracle.dispatch(xs, topks, case.num_experts, case.max_tokens) for xs, topks, _ in data]
    ys = [_fresh_ys(rng, w) for w in wants]

    def per_device(pick):  # [device][step, ...]: one array per device holding every step
        return [np.stack([pick(s, d) for s in range(steps)]) for d in range(case.num_ranks)]

    args = [
        per_device(lambda s, d: data[s][0][d]),
        per_device(lambda s, d: data[s][1][d]),
        per_device(lambda s, d: data[s][2][d]),
        per_device(lambda s, d: ys[s][d]),
        *(per_device(lambda s, d, k=k: wants[s][d][k]) for k in ("src_info", "layout_range", "src_topk_pos")),
    ]
    result = _scan_fn(buf, sequence)(*(testing.shard_per_device(buf, a) for a in args))
    if sequence == "dispatch":
        disp, out = result, None
    elif sequence == "combine":
        disp, out = None, result
    else:
        disp, out = result
    disp = None if disp is None else {k: testing.unshard_per_device(buf, v) for k, v in disp.items() if v is not None}
    out = None if out is None else testing.unshard_per_device(buf, out)
    for s in range(steps):
        xs, topks, weights = data[s]
        if disp is not None:
            got = [{k: v[d][s] for k, v in disp.items()} for d in range(case.num_ranks)]
            _assert_dispatch(got, wants[s], f"step {s}")
        if out is not None:
            y = ys[s] if sequence == "combine" else [w["recv_x"] for w in wants[s]]
            want_out = oracle.combine(y, topks, weights, wants[s], case.num_experts, case.max_tokens)
            _assert_outs([o[s] for o in out], want_out, f"step {s}")
    buf.check()
    after = cpu_hooks.sequence_numbers(buf)
    assert all(after[key] == (before[key][0] + CALLS, 0) for key in before), "every step made its protocol calls"


# ---------------------------------------------------------------------------------------------------------------
# Bounded waiting: a rank that never calls; diverging call sequences
# ---------------------------------------------------------------------------------------------------------------
def test_timeout_names_the_missing_rank_and_a_new_buffer_works():
    case, timeout_s = SMALL, 1.0
    e_l = case.num_experts // case.num_ranks
    buf = _fresh_buffer(case, timeout_s=timeout_s)
    try:
        xs, topks, weights = ref._inputs(case, seed=600)
        testing.run_dispatch(buf, xs, topks)  # compiles (call 1)
        cpu_hooks.set_test_delays(buf, {}, skip_ranks=[3])  # rank 3 never makes call 2
        start = time.monotonic()
        with pytest.raises(jax.errors.JaxRuntimeError) as info:
            jax.block_until_ready(testing.run_dispatch(buf, xs, topks))
        elapsed = time.monotonic() - start
        assert timeout_s <= elapsed <= timeout_s + 3.0, elapsed
        message = str(info.value)
        assert "dispatch call seq=2: timed out" in message
        assert all(f"(rank 3, local expert {e})" in message for e in range(e_l))
        with pytest.raises(ep.ProtocolTimeoutError) as err:
            buf.check()
        assert err.value.op == "dispatch" and err.value.seq == 2
        assert set(err.value.missing) == {(3, e) for e in range(e_l)}
        buf.check()  # the record was cleared
        # ...but the buffer stays unusable: ranks 0-2 are a call ahead of rank 3, and a further send could land in a
        # region rank 3 still reads as its own (verification/: limit-retry-silent). Every rank refuses at once.
        cpu_hooks.clear_test_hooks(buf)
        start = time.monotonic()
        with pytest.raises(jax.errors.JaxRuntimeError, match="close the buffer and create a new one|nothing was sent"):
            jax.block_until_ready(testing.run_dispatch(buf, xs, topks))
        assert time.monotonic() - start < timeout_s, "the refusal must not wait for peers"
        with pytest.raises(ep.JaxLlEpError, match="refused, nothing sent: an earlier call on this buffer timed out"):
            buf.check()
    finally:
        buf.close()
    with _fresh_buffer(case, timeout_s=timeout_s) as again:  # the process is still usable
        xs, topks, weights = ref._inputs(case, seed=601)
        _check_roundtrip(again, case, xs, topks, weights)
        again.check()


def test_diverging_call_sequences_are_detected():
    """Rank 3 misses a dispatch (the others time out on it); in the next program rank 3's call 2 is a combine while
    its peers' call 2 was that dispatch: rank 3 sees their signals carry another op kind and stops at once."""
    case = SMALL
    buf = _fresh_buffer(case, timeout_s=0.5)
    try:
        xs, topks, weights = ref._inputs(case, seed=610)
        handles = oracle.dispatch(xs, topks, case.num_experts, case.max_tokens)
        testing.run_dispatch(buf, xs, topks)  # call 1 everywhere
        cpu_hooks.set_test_delays(buf, {}, skip_ranks=[3])
        with pytest.raises(jax.errors.JaxRuntimeError, match="timed out"):
            jax.block_until_ready(testing.run_dispatch(buf, xs, topks))  # call 2 everywhere but rank 3
        with pytest.raises(ep.ProtocolTimeoutError):
            buf.check()
        cpu_hooks.set_test_delays(buf, {}, seed=0)  # stamps only: rank 3 takes part again
        # (XLA reports one failing device's error: rank 3's mismatch or a peer's timeout; check() ranks them)
        with pytest.raises(jax.errors.JaxRuntimeError, match="jax_ll_ep"):
            jax.block_until_ready(testing.run_combine(buf, [h["recv_x"] for h in handles], topks, weights, handles))
        with pytest.raises(ep.SequenceMismatchError, match="rank 3 of group 0, combine call seq=2"):
            buf.check()
        stamps = cpu_hooks.test_stamps(buf)[0, :, COMBINE]
        assert stamps[3, RETURNED] == 0, "rank 3 stopped before producing a result"
    finally:
        buf.close()


# ---------------------------------------------------------------------------------------------------------------
# The registry's guards in the handlers themselves (compiled code that outlives its buffer, foreign devices)
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_call_after_close_is_refused():
    buf = _fresh_buffer(SMALL)
    xs, topks, _ = ref._inputs(SMALL, seed=620)
    testing.run_dispatch(buf, xs, topks)
    buf.close()
    buf.close()  # idempotent
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"buffer handle {buf.handle} is not open"):
        # the jitted function is cached, so this runs the compiled custom call without tracing the op again
        jax.block_until_ready(testing.dispatch_fn(buf, None)(*(testing.shard_per_device(buf, a) for a in (xs, topks))))
    with pytest.raises(ep.BufferClosedError):
        buf.check()
    _jax_internals.settle_order_token(buf.handle)  # forget the failed program's token (else JAX re-raises at exit)


def test_buffer_used_on_devices_outside_its_mesh_is_refused(cpu_devices):
    case = ref.Case(num_ranks=4, num_experts=8, max_tokens=4, hidden=128, topk=2)
    buf = _fresh_buffer(case, devices=cpu_devices[:4])
    try:
        other = testing.ep_mesh(4, devices=cpu_devices[4:8])
        spec = jax.sharding.PartitionSpec("ep")
        fn = jax.jit(jax.shard_map(lambda x, t: ep.dispatch(buf, x, t)[1], mesh=other, in_specs=spec, out_specs=spec))
        xs, topks, _ = ref._inputs(case, seed=630)
        sharding = jax.sharding.NamedSharding(other, spec)
        args = [jax.device_put(np.concatenate(a), sharding) for a in (xs, topks)]
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"device \d+ is not a device of buffer"):
            jax.block_until_ready(fn(*args))
    finally:
        buf.close()
