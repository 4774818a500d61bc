"""Masking (``Buffer.mask_ranks``, ``Buffer(on_timeout="mask")``) on 8 simulated CPU devices.

Every live rank's outputs are checked bit for bit against the oracle run on the masked routing
(``oracle.mask_routing``: ids routed to a masked rank's experts become -1, a masked rank sends nothing); a masked
rank's own outputs are unspecified and not compared. The xla backend implements only the dropped-pair rule and is
checked against the same oracle. Timeouts are forced with the cpu test hook that makes a rank behave as one that
never calls. The soak runs 2,000 back-to-back calls with a random rank masked and unmasked every 100 calls, all
through one compiled program (the mask is device state: no recompilation).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
import test_reference as ref

import jax_ll_ep as ep
from jax_ll_ep import testing
from jax_ll_ep.testing import cpu_hooks

CASE = ref.Case(num_experts=16, max_tokens=4, hidden=128, topk=3)  # 8 ranks, 2 local experts each


def _buffer(case=CASE, *, backend="cpu", timeout_s=30.0, on_timeout="raise", mesh=None) -> ep.Buffer:
    return ep.Buffer(
        mesh if mesh is not None else testing.ep_mesh(case.num_ranks),
        "ep",
        num_experts=case.num_experts,
        max_tokens_per_rank=case.max_tokens,
        hidden=case.hidden,
        backend=backend,
        timeout_s=timeout_s,
        on_timeout=on_timeout,
    )


@pytest.fixture(scope="module", params=["cpu", "xla"])
def buf(request):
    b = _buffer(backend=request.param)
    yield b
    b.close()


def check_masked_roundtrip(buf, case, masked, seed, *, fp8=None, split=False, inputs=None) -> list[np.ndarray]:
    """dispatch -> identity (dequantized for fp8) -> combine; every live rank against the masked oracle. Returns
    the routing used."""
    xs, topks, weights = inputs if inputs is not None else ref._inputs(case, seed)
    options = None if fp8 is None else ep.Fp8Options(fp8)
    outs, got = testing.run_roundtrip(buf, xs, topks, weights, fp8=options, split=split)
    live = oracle.mask_routing(topks, masked, case.num_experts)
    want = oracle.dispatch(xs, live, case.num_experts, case.max_tokens, fp8)
    if fp8 is None:
        ys = [w["recv_x"] for w in want]
    else:
        ys = [oracle.dequantize_fp8(w["recv_x"], w["recv_scale"]).astype(oracle.BF16) for w in want]
    want_out = oracle.combine(ys, live, weights, want, case.num_experts, case.max_tokens)
    for r in range(case.num_ranks):
        if r in masked:
            continue
        oracle.assert_dispatch_equal(got[r], want[r], where=f"masked {masked}: rank {r}")
        oracle.assert_bitwise_equal(outs[r], want_out[r], what=f"masked {masked}: combine rank {r}")
    return topks


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("masked", [(), (3,), (0, 7), (1, 2, 5)], ids=str)
def test_masked_ranks_are_left_out_exactly(buf, masked, split):
    buf.mask_ranks(masked)
    assert buf.masked_ranks == masked
    check_masked_roundtrip(buf, CASE, masked, seed=10 + len(masked), split=split)
    buf.mask_ranks([])  # restores every rank
    assert buf.masked_ranks == ()
    check_masked_roundtrip(buf, CASE, (), seed=20 + len(masked), split=split)
    buf.check()


def test_masked_fp8_dispatch(buf):
    buf.mask_ranks([6])
    check_masked_roundtrip(buf, CASE, (6,), seed=30, fp8="ue8m0")
    buf.mask_ranks([])
    buf.check()


def test_dropped_pairs_are_counted():
    case = CASE
    with _buffer() as b:
        assert b.dropped_pairs() == {(0, r): ep.DroppedPairs(0, 0) for r in range(case.num_ranks)}
        b.mask_ranks([2, 4])
        topks = check_masked_roundtrip(b, case, (2, 4), seed=40)
        dropped = b.dropped_pairs()
        for r in range(case.num_ranks):
            if r in (2, 4):
                continue
            n = oracle.count_dropped(topks[r], (2, 4), case.num_experts, case.num_ranks)
            # the dispatch and the combine of the round trip each dropped the same pairs
            assert dropped[(0, r)] == ep.DroppedPairs(n, 2 * n), (r, dropped[(0, r)], n)
        assert sum(d.total for d in dropped.values()) > 0
        b.mask_ranks([])
        assert all(d.last_call == 0 for d in b.dropped_pairs().values())
        check_masked_roundtrip(b, case, (), seed=41)
        assert all(d.last_call == 0 for d in b.dropped_pairs().values())


def test_mask_applies_to_every_group_of_a_2d_mesh(make_mesh):
    case = ref.Case(num_ranks=4, num_experts=8, max_tokens=4, hidden=128, topk=2)
    with _buffer(case, mesh=make_mesh((2, 4), ("dp", "ep"))) as b:
        b.mask_ranks([1])
        xs, topks, weights = ref._inputs(case, seed=50, devices=8)
        outs, got = testing.run_roundtrip(b, xs, topks, weights)
        for g, sl in enumerate(testing.group_slices(b)):
            live = oracle.mask_routing(topks[sl], (1,), case.num_experts)
            want = oracle.dispatch(xs[sl], live, case.num_experts, case.max_tokens)
            want_out = oracle.combine([w["recv_x"] for w in want], live, weights[sl], want, 8, 4)
            for r in (0, 2, 3):
                oracle.assert_dispatch_equal(got[sl][r], want[r], where=f"group {g} rank {r}")
                oracle.assert_bitwise_equal(outs[sl][r], want_out[r], what=f"group {g} combine rank {r}")
        assert set(b.dropped_pairs()) == {(g, r) for g in range(2) for r in range(4)}


def test_mask_ranks_arguments():
    with _buffer() as b:
        with pytest.raises(ValueError, match=r"ranks \[8\] are outside \[0, 8\)"):
            b.mask_ranks([8])
        with pytest.raises(ValueError, match="would mask every rank"):
            b.mask_ranks(range(8))
        with pytest.raises(TypeError, match="iterable of ints"):
            b.mask_ranks("3")
        with pytest.raises(TypeError, match="must be ints"):
            b.mask_ranks([1.5])
        with pytest.raises(ValueError, match="on_timeout='later' is not one of"):
            _buffer(on_timeout="later")
        b.mask_ranks([3, 3, 1])  # duplicates are one
        assert b.masked_ranks == (1, 3)


def test_mask_ranks_refuses_while_a_split_call_is_open():
    with _buffer() as b:
        xs, topks, _ = ref._inputs(CASE, seed=60)
        send = testing.per_device_shard_map(b, lambda x, t: ep.dispatch_send(b, x, t).ticket)
        jax.block_until_ready(send(testing.shard_per_device(b, xs), testing.shard_per_device(b, topks)))
        with pytest.raises(RuntimeError, match="split call open"):
            b.mask_ranks([2])


def test_a_masked_rank_returns_at_once():
    """Rank 5 is masked and every other rank never makes its calls: rank 5 neither sends nor waits, so the call
    ends long before timeout_s."""
    with _buffer(timeout_s=20.0) as b:
        b.mask_ranks([5])
        xs, topks, weights = ref._inputs(CASE, seed=70)
        testing.run_roundtrip(b, xs, topks, weights)  # compiles
        cpu_hooks.set_test_delays(b, {}, skip_ranks=[r for r in range(8) if r != 5])
        start = time.monotonic()
        outs, got = testing.run_roundtrip(b, xs, topks, weights)
        assert time.monotonic() - start < 10.0
        assert not np.any(got[5]["recv_count"]), "a masked rank receives nothing"
        b.check()


# ---------------------------------------------------------------------------------------------------------------
# A rank that stops calling: on_timeout="mask" goes on without it; on_timeout="raise" stops, and mask_ranks resumes
# ---------------------------------------------------------------------------------------------------------------
def test_on_timeout_mask_completes_without_the_silent_rank():
    case, timeout_s, gone = CASE, 2.0, 3
    with _buffer(timeout_s=timeout_s, on_timeout="mask") as b:
        check_masked_roundtrip(b, case, (), seed=80)  # compiles; everyone takes part
        cpu_hooks.set_test_delays(b, {}, skip_ranks=[gone])
        start = time.monotonic()
        check_masked_roundtrip(b, case, (gone,), seed=81)  # the survivors time out, mask rank 3 and complete
        elapsed = time.monotonic() - start
        assert timeout_s <= elapsed <= timeout_s + 5.0, elapsed
        assert b.masked_ranks == (gone,)
        with pytest.raises(ep.RanksMaskedError, match="on_timeout='mask': rank\\(s\\) 3 are masked") as info:
            b.check()
        assert info.value.masked == (gone,) and info.value.op == "dispatch"
        assert set(info.value.missing) == {(gone, e) for e in range(2)}
        assert isinstance(info.value, ep.ProtocolTimeoutError)
        b.check()  # reported once
        start = time.monotonic()
        for i in range(5):  # no rank waits on it again
            check_masked_roundtrip(b, case, (gone,), seed=82 + i)
        assert time.monotonic() - start < timeout_s * 5, "later calls must not wait for the masked rank"
        b.check()
        # It comes back: every process (here: the one) restores it; the calls line up again.
        cpu_hooks.clear_test_hooks(b)
        b.mask_ranks([])
        for i in range(3):
            check_masked_roundtrip(b, case, (), seed=90 + i)
        b.check()


def test_on_timeout_raise_then_mask_ranks_lets_the_survivors_go_on():
    case, timeout_s, gone = CASE, 2.0, 6
    with _buffer(timeout_s=timeout_s) as b:
        xs, topks, weights = ref._inputs(case, seed=100)
        testing.run_roundtrip(b, xs, topks, weights)
        cpu_hooks.set_test_delays(b, {}, skip_ranks=[gone])
        with pytest.raises(jax.errors.JaxRuntimeError, match="timed out"):
            jax.block_until_ready(testing.run_roundtrip(b, xs, topks, weights))
        with pytest.raises(ep.ProtocolTimeoutError):
            b.check()
        with pytest.raises(jax.errors.JaxRuntimeError, match="refused, nothing sent"):  # unusable, as before
            jax.block_until_ready(testing.run_roundtrip(b, xs, topks, weights))
        with pytest.raises(ep.JaxLlEpError, match="buf.mask_ranks"):
            b.check()
        b.mask_ranks([gone])  # the survivors agree: calls line up again, and rank 6 is left out
        for i in range(20):
            check_masked_roundtrip(b, case, (gone,), seed=110 + i)
        cpu_hooks.clear_test_hooks(b)
        b.mask_ranks([])
        check_masked_roundtrip(b, case, (), seed=130)
        b.check()


# ---------------------------------------------------------------------------------------------------------------
# Soak: 2,000 calls, a random rank masked and unmasked every 100 calls, one compiled program
# ---------------------------------------------------------------------------------------------------------------
SOAK_CALLS, SOAK_PERIOD = 2000, 100


@functools.cache
def _soak_fn(b: ep.Buffer):
    def body(xs, topks, weights):
        def step(carry, args):
            x, topk_idx, w = args
            recv_x, recv_count, handle = ep.dispatch(b, x, topk_idx)
            out = ep.combine(b, recv_x, topk_idx, w, handle)  # identity experts
            return carry, (recv_count, handle.layout_range, out)

        return jax.lax.scan(step, None, (xs, topks, weights))[1]

    return testing.per_device_shard_map(b, body)


@pytest.mark.slow
def test_soak_with_a_rank_masked_and_unmasked_every_100_calls():
    case = CASE
    rng = np.random.default_rng(140)
    steps = SOAK_PERIOD // 2  # dispatch + combine per step
    with _buffer() as b:
        fn = _soak_fn(b)
        masks = []
        for segment in range(SOAK_CALLS // SOAK_PERIOD):
            masked = (int(rng.integers(case.num_ranks)),) if segment % 2 == 0 else ()
            masks.append(masked)
            b.mask_ranks(masked)
            data = [ref._inputs(case, seed=int(rng.integers(1 << 30))) for _ in range(steps)]
            args = [[np.stack([data[s][j][d] for s in range(steps)]) for d in range(case.num_ranks)] for j in range(3)]
            counts, ranges, outs = (
                testing.unshard_per_device(b, a) for a in fn(*(testing.shard_per_device(b, a) for a in args))
            )
            for s in range(steps):
                xs, topks, weights = data[s]
                live = oracle.mask_routing(topks, masked, case.num_experts)
                want = oracle.dispatch(xs, live, case.num_experts, case.max_tokens)
                want_out = oracle.combine([w["recv_x"] for w in want], live, weights, want, 16, 4)
                for r in range(case.num_ranks):
                    if r in masked:
                        continue
                    where = f"segment {segment} (masked {masked}) step {s} rank {r}"
                    np.testing.assert_array_equal(counts[r][s], want[r]["recv_count"], err_msg=where)
                    np.testing.assert_array_equal(ranges[r][s], want[r]["layout_range"], err_msg=where)
                    oracle.assert_bitwise_equal(outs[r][s], want_out[r], what=where)
        b.check()
        assert fn._cache_size() == 1, "a mask change must not recompile"
        seqs = cpu_hooks.sequence_numbers(b)
        assert all(seq == (SOAK_CALLS, 0) for seq in seqs.values()), seqs
        assert sum(1 for m in masks if m) == SOAK_CALLS // SOAK_PERIOD // 2


# ---------------------------------------------------------------------------------------------------------------
# Autodiff under a mask: the backward ops are calls on the same buffer, under the same mask
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_grad_with_a_masked_rank_matches_the_dense_reference_of_the_masked_routing(make_mesh, backend):
    import test_autodiff as ad
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    masked = (2,)
    mesh = make_mesh((ad.R,), ("ep",))
    x, idx, w, scale, bias = ad._inputs(mesh, seed=23)
    live_idx = np.concatenate(
        oracle.mask_routing(np.split(idx, ad.R), masked, ad.E)
    )  # the routing a masked exchange runs
    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.device_put(a, sharding) for a in (x, idx, w)]
    with ep.Buffer(mesh, "ep", num_experts=ad.E, max_tokens_per_rank=ad.T, hidden=ad.H, backend=backend) as b:
        b.mask_ranks(masked)
        dx, dw = (np.asarray(g) for g in ad._loss_fn(b, mesh, jnp.asarray(scale), jnp.asarray(bias))(*args))
    ref_dx, ref_dw = (np.asarray(g) for g in ad._dense_grads(x, live_idx, w, scale, bias))
    live = np.concatenate([np.full(ad.T, r not in masked) for r in range(ad.R)])  # tokens of live ranks
    assert ad._rel_err(dx[live], ref_dx[live]) < 2e-2, ad._rel_err(dx[live], ref_dx[live])
    assert ad._rel_err(dw[live], ref_dw[live]) < 2e-2, ad._rel_err(dw[live], ref_dw[live])
    # a choice of a masked rank's expert is dropped: no gradient flows to its weight
    dropped = live[:, None] & (idx >= 0) & (live_idx < 0)
    assert dropped.any() and np.all(dw[dropped] == 0.0)
