"""One process of the cpu backend's multi-process test (started by launch.py from test_cpu_multiprocess.py).

Every process joins one jax.distributed job on localhost with ``--devices`` CPU devices, builds the same global
data from fixed seeds, runs the scenarios in order, and checks the results of its own devices against the NumPy
oracle. Scenarios:
  exact      bf16 and fp8 round trips and split forms over all devices (one buffer in POSIX shared memory), a
             2-D (dp=2, ep) mesh whose groups span processes, 500 back-to-back calls inside lax.scan, and a slow
             rank (first and last) at the sending points, with timestamps from every process showing that no rank
             returned before the slow rank's signals were out
  mismatch   process 0 makes a dispatch while the others make a combine: every rank stops at once with a
             sequence-mismatch error (no waiting for the timeout)
  timeout    the last process never calls; the others raise within timeout_s + a margin, naming exactly its
             (rank, local expert) pairs; then a new buffer works everywhere
  killed     (run alone, --on-timeout raise|mask) the last process SIGKILLs itself at a random moment while every
             process runs back-to-back round trips; each survivor's next call ends within timeout_s (a timeout error,
             or the dead ranks masked), then the survivors mask the dead ranks together (buf.mask_ranks) and make 100
             further calls, each checked against the oracle for the live experts; they close the buffer and exit 0
  late       (run alone) on_timeout="mask", timeout_s = 2 s: the last process sleeps 4 s inside a call before sending
             anything (a test hook), so the others mask it and go on; it then wakes and writes that call's tokens
             and its next combine's rows into their regions while they run more calls, every one of which must
             still equal the oracle for the live experts; finally every process restores it (mask_ranks([])) and
             the calls are exact again with everyone
  fail       (for the launcher's own test) process 1 fails at once while the others hang
Prints "WORKER OK" at the end (the killed process prints nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


class Ctx:
    def __init__(self, args):
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
        if args.scenarios == "killed":
            # a process of the job will die: the others must keep going (jax.distributed's own fault tolerance)
            jax.config.update("jax_enable_recoverability", True)
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
        from jax_ll_ep._jax_internals import distributed_client

        self.jax = jax
        self.client = distributed_client()
        self.pid = args.process_id
        self.nproc = args.num_processes
        self.devices = args.devices
        self.ranks = self.nproc * self.devices
        assert jax.device_count() == self.ranks, (jax.device_count(), self.ranks)
        assert jax.local_device_count() == self.devices
        self._barriers = 0

    def barrier(self, name: str):
        self._barriers += 1
        self.client.wait_at_barrier(f"worker/{self._barriers}/{name}", 120_000)

    def gather(self, tag: str, value) -> list:
        """Every process's JSON-able value, by process index (through the distributed key-value store)."""
        self.client.key_value_set(f"worker/{tag}/{self.pid}", json.dumps(value))
        return [json.loads(self.client.blocking_key_value_get(f"worker/{tag}/{p}", 120_000)) for p in range(self.nproc)]


# ---------------------------------------------------------------------------------------------------------------
# Per-device data in a multi-process job (jax_ll_ep.testing's shard_per_device / unshard_per_device are single-process)
# ---------------------------------------------------------------------------------------------------------------
def shard(buf, arrays):
    import jax

    from jax_ll_ep import testing

    stacked = np.concatenate([np.asarray(a) for a in arrays])
    sharding = jax.sharding.NamedSharding(buf.mesh, testing.device_spec(buf))
    return jax.make_array_from_callback(stacked.shape, sharding, lambda index: stacked[index])


def local_blocks(buf, arr) -> dict[int, np.ndarray]:
    """{flat device index: block} of this process's devices."""
    from jax_ll_ep import testing

    rows = arr.shape[0] // testing.num_devices(buf)
    return {(s.index[0].start or 0) // rows: np.asarray(s.data) for s in arr.addressable_shards}


def local_dispatch(buf, disp: dict) -> dict[int, dict]:
    per_key = {k: local_blocks(buf, v) for k, v in disp.items() if v is not None}
    indices = next(iter(per_key.values())).keys()
    return {
        i: {k: v[i] for k, v in per_key.items()} | {"recv_scale": per_key.get("recv_scale", {}).get(i)} for i in indices
    }


def case_inputs(num_devices: int, num_experts: int, max_tokens: int, hidden: int, topk: int, seed: int):
    from jax_ll_ep import testing

    rng = np.random.default_rng(seed)
    xs = [testing.self_describing_tokens(rng, i, max_tokens, hidden) for i in range(num_devices)]
    topks = [testing.random_routing(rng, max_tokens, topk, num_experts, drop_prob=0.2) for _ in xs]
    weights = [testing.random_weights(rng, t) for t in topks]
    return xs, topks, weights


def check_roundtrip(buf, xs, topks, weights, *, fp8=None, split=False, where=""):
    """dispatch -> identity (dequantized for fp8) -> combine over the buffer's mesh; this process's devices checked
    against the oracle run of their group."""
    import ml_dtypes
    import oracle

    from jax_ll_ep import Fp8Options, testing

    options = None if fp8 is None else Fp8Options(fp8)
    args = [shard(buf, a) for a in (xs, topks, weights)]
    out, disp = testing.roundtrip_fn(buf, options, None, split)(*args)
    outs, got = local_blocks(buf, out), local_dispatch(buf, disp)
    r = buf.num_ranks
    for g in range(testing.num_devices(buf) // r):
        sl = slice(g * r, (g + 1) * r)
        if not any(sl.start <= i < sl.stop for i in got):
            continue
        want = oracle.dispatch(xs[sl], topks[sl], buf.num_experts, buf.max_tokens_per_rank, fp8)
        if fp8 is None:
            ys = [w["recv_x"] for w in want]
        else:
            ys = [oracle.dequantize_fp8(w["recv_x"], w["recv_scale"]).astype(ml_dtypes.bfloat16) for w in want]
        want_out = oracle.combine(ys, topks[sl], weights[sl], want, buf.num_experts, buf.max_tokens_per_rank)
        for i in range(sl.start, sl.stop):
            if i in got:
                oracle.assert_dispatch_equal(got[i], want[i - sl.start], where=f"{where} device {i}")
                oracle.assert_bitwise_equal(outs[i], want_out[i - sl.start], what=f"{where} combine device {i}")
    buf.check()


def make_buffer(ctx, *, dp=0, num_experts=None, max_tokens=8, hidden=128, timeout_s=60.0, on_timeout="raise"):
    import jax_ll_ep as ep
    from jax_ll_ep import testing

    ranks = ctx.ranks // dp if dp else ctx.ranks
    mesh = testing.ep_mesh(ranks, dp=dp)
    return ep.Buffer(
        mesh,
        "ep",
        num_experts=num_experts or 2 * ranks,
        max_tokens_per_rank=max_tokens,
        hidden=hidden,
        backend="cpu",
        timeout_s=timeout_s,
        on_timeout=on_timeout,
    )


# ---------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------
def scenario_exact(ctx: Ctx):
    import jax
    import oracle

    import jax_ll_ep as ep
    from jax_ll_ep import testing
    from jax_ll_ep.testing import cpu_hooks

    n = ctx.ranks
    with make_buffer(ctx) as buf:
        assert buf.backend.multiprocess == (ctx.nproc > 1)
        xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=1)
        check_roundtrip(buf, xs, topks, weights, where="bf16")
        xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=2)
        check_roundtrip(buf, xs, topks, weights, fp8="pow2", where="fp8")
        xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=3)
        check_roundtrip(buf, xs, topks, weights, split=True, where="split")
        log("exact: round trips ok")

        # A slow rank (first, then last) at the sending points: nobody returns before it began storing its signals.
        for slow in (0, n - 1):
            for point in ("before_send", "before_signal"):
                cpu_hooks.set_test_delays(buf, {(slow, point): (0.1, 0.15)}, seed=slow)
                xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=10 + slow)
                check_roundtrip(buf, xs, topks, weights, where=f"slow {slow} {point}")
                stamps = np.max(
                    np.array(ctx.gather(f"stamps/{slow}/{point}", cpu_hooks.test_stamps(buf).tolist())), axis=0
                )[0]  # [R, kind, (enter, signalling, returned)]
                cpu_hooks.clear_test_hooks(buf)
                for kind in (0, 1):
                    s = stamps[:, kind]
                    assert np.all(s > 0), s
                    assert s[slow, 1] - s[slow, 0] >= 0.1e9, "the delay did not happen"
                    early = [r for r in range(n) if s[r, 2] < s[slow, 1]]
                    assert not early, f"ranks {early} returned before slow rank {slow} signalled ({point}, {kind})"
        log("exact: slow ranks ok")

        # 500 back-to-back calls inside lax.scan: 250 x (dispatch, combine), fresh data every step.
        steps, e, t, h, k = 250, buf.num_experts, 8, 128, 3
        data = [case_inputs(n, e, t, h, k, seed=100 + s) for s in range(steps)]

        def body(x, topk_idx, w):
            def step(carry, args):
                recv_x, recv_count, handle = ep.dispatch(buf, args[0], args[1])
                out = ep.combine(buf, recv_x, args[1], args[2], handle)
                return carry, (recv_count, handle.layout_range, out)

            return jax.lax.scan(step, None, (x, topk_idx, w))[1]

        fn = testing.per_device_shard_map(buf, body)
        stacked = [[np.stack([data[s][j][d] for s in range(steps)]) for d in range(n)] for j in range(3)]
        counts, ranges, outs = (local_blocks(buf, a) for a in fn(*(shard(buf, a) for a in stacked)))
        for s in range(steps):
            xs, topks, weights = data[s]
            want = oracle.dispatch(xs, topks, e, t)
            want_out = oracle.combine([w["recv_x"] for w in want], topks, weights, want, e, t)
            for i in counts:
                np.testing.assert_array_equal(counts[i][s], want[i]["recv_count"], err_msg=f"step {s} device {i}")
                np.testing.assert_array_equal(ranges[i][s], want[i]["layout_range"], err_msg=f"step {s} device {i}")
                oracle.assert_bitwise_equal(outs[i][s], want_out[i], what=f"scan step {s} device {i}")
        seqs = cpu_hooks.sequence_numbers(buf)
        assert all(seq == (3 * 2 + 4 * 2 + 2 * steps, 0) for seq in seqs.values()), seqs
        log("exact: back-to-back ok")

    if n >= 4 and n % 2 == 0:  # groups of a (dp=2, ep) mesh; with several processes they span processes
        with make_buffer(ctx, dp=2) as buf:
            xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=4)
            check_roundtrip(buf, xs, topks, weights, where="dp=2")
        log("exact: 2-D mesh ok")


def scenario_mismatch(ctx: Ctx):
    import jax

    import jax_ll_ep as ep
    from jax_ll_ep import testing

    buf = make_buffer(ctx, timeout_s=30.0)
    n, e_l, rows = ctx.ranks, buf.num_local_experts, buf.config.recv_rows
    xs, topks, weights = case_inputs(n, buf.num_experts, 8, 128, 3, seed=20)
    ctx.barrier("mismatch")
    start = time.monotonic()
    try:
        if ctx.pid == 0:
            result = testing.dispatch_fn(buf, None)(shard(buf, xs), shard(buf, topks))
        else:
            none = [np.full_like(t, -1) for t in topks]
            zeros = [np.zeros((e_l, rows), np.int32)] * n
            args = (
                [np.zeros((e_l, rows, 128), testing.BF16)] * n,
                none,
                weights,
                zeros,
                [np.zeros((e_l, n, 2), np.int32)] * n,
                zeros,
            )
            result = testing.combine_fn(buf)(*(shard(buf, a) for a in args))
        jax.block_until_ready(result)
        raise AssertionError("diverging call sequences were not detected")
    except jax.errors.JaxRuntimeError as exc:
        assert "different sequences of calls" in str(exc), exc
    elapsed = time.monotonic() - start
    assert elapsed < 10.0, f"the mismatch took {elapsed:.1f} s to detect (timeout_s=30)"
    try:
        buf.check()
        raise AssertionError("check() did not raise")
    except ep.SequenceMismatchError as exc:
        log("mismatch detected:", str(exc)[:200])
    ctx.barrier("mismatch-done")
    buf.close()
    log(f"mismatch: ok ({elapsed:.2f} s)")


def scenario_timeout(ctx: Ctx):
    import jax

    import jax_ll_ep as ep
    from jax_ll_ep import testing

    timeout_s = 2.0
    absent = ctx.nproc - 1
    buf = make_buffer(ctx, timeout_s=timeout_s)
    xs, topks, weights = case_inputs(ctx.ranks, buf.num_experts, 8, 128, 3, seed=30)
    ctx.barrier("timeout")
    if ctx.pid != absent:
        start = time.monotonic()
        try:
            jax.block_until_ready(testing.dispatch_fn(buf, None)(shard(buf, xs), shard(buf, topks)))
            raise AssertionError("the call returned although a process never made it")
        except jax.errors.JaxRuntimeError as exc:
            assert "timed out" in str(exc), exc
        elapsed = time.monotonic() - start
        assert timeout_s <= elapsed <= timeout_s + 5.0, elapsed
        absent_ranks = {r for r in range(ctx.ranks) if r // ctx.devices == absent}
        try:
            buf.check()
            raise AssertionError("check() did not raise")
        except ep.ProtocolTimeoutError as exc:
            assert exc.op == "dispatch" and exc.seq == 1, (exc.op, exc.seq)
            assert set(exc.missing) == {(r, e) for r in absent_ranks for e in range(buf.num_local_experts)}, exc.missing
        log(f"timeout: raised after {elapsed:.2f} s naming ranks {sorted(absent_ranks)}")
    ctx.barrier("timeout-done")
    buf.close()
    with make_buffer(ctx) as again:  # every process is still usable
        xs, topks, weights = case_inputs(ctx.ranks, again.num_experts, 8, 128, 3, seed=31)
        check_roundtrip(again, xs, topks, weights, where="after timeout")
    log("timeout: new buffer ok")


def check_masked_roundtrip(inputs, outs, got, masked, e, t, where):
    """This process's devices' dispatch (`got`) and combine (`outs`) outputs of one round trip on `inputs` against
    the oracle with `masked` ranks left out (their pairs dropped)."""
    import oracle

    xs, topks, weights = inputs
    live = oracle.mask_routing(topks, masked, e)
    want = oracle.dispatch(xs, live, e, t)
    want_out = oracle.combine([w["recv_x"] for w in want], live, weights, want, e, t)
    for d in got:
        oracle.assert_dispatch_equal(got[d], want[d], where=f"{where} device {d}")
        oracle.assert_bitwise_equal(outs[d], want_out[d], what=f"{where} combine device {d}")


def scenario_killed(ctx: Ctx, on_timeout: str):
    import jax

    import jax_ll_ep as ep
    from jax_ll_ep import testing

    timeout_s, after = 2.0, 100  # calls after the fault: 50 round trips of dispatch + combine
    victim = ctx.nproc - 1  # (never process 0: it runs jax.distributed's coordination service)
    gone = tuple(r for r in range(ctx.ranks) if r // ctx.devices == victim)
    buf = make_buffer(ctx, timeout_s=timeout_s, on_timeout=on_timeout)
    fn = testing.roundtrip_fn(buf, None, None, False)
    e, t = buf.num_experts, buf.max_tokens_per_rank

    def run(i):
        xs, topks, weights = case_inputs(ctx.ranks, e, t, 128, 3, seed=5000 + i)
        out, disp = fn(*(shard(buf, a) for a in (xs, topks, weights)))
        return (xs, topks, weights), local_blocks(buf, out), local_dispatch(buf, disp)

    run(0)  # compile before anyone dies
    ctx.barrier("killed")
    if ctx.pid == victim:
        rng = np.random.default_rng(int(time.time() * 1e6) % (1 << 31))
        delay = float(rng.uniform(0.2, 1.5))
        log(f"killed: this process SIGKILLs itself in {delay:.2f} s")
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    calls, fault = 0, None
    for i in range(1, 100_000):
        start = time.monotonic()
        try:
            inputs, outs, got = run(i)
            buf.check()
        except (jax.errors.JaxRuntimeError, ep.JaxLlEpError) as exc:
            elapsed = time.monotonic() - start
            if isinstance(exc, jax.errors.JaxRuntimeError):  # on_timeout="raise": the call failed
                try:
                    buf.check()
                except ep.ProtocolTimeoutError as err:
                    exc = err
            assert isinstance(exc, ep.ProtocolTimeoutError), repr(exc)
            assert (on_timeout == "mask") == isinstance(exc, ep.RanksMaskedError), repr(exc)
            assert {rank for rank, _ in exc.missing} & set(gone), f"the dead ranks {gone} are not named: {exc}"
            assert elapsed <= timeout_s + 5.0, f"the call after the fault took {elapsed:.1f} s (timeout_s={timeout_s})"
            fault = (i, elapsed, type(exc).__name__)
            break
        check_masked_roundtrip(inputs, outs, got, (), e, t, f"before the fault, call {i}")
        calls += 2
    log(f"killed: fault seen in round trip {fault[0]} after {fault[1]:.2f} s ({fault[2]}); {calls} calls before it")
    buf.mask_ranks(gone)  # with the other survivors: the dead ranks are left out, the calls line up again
    assert buf.masked_ranks == gone, buf.masked_ranks
    for j in range(after // 2):
        inputs, outs, got = run(100_000 + j)
        check_masked_roundtrip(inputs, outs, got, gone, e, t, f"after the fault, round trip {j}")
    buf.check()
    dropped = buf.dropped_pairs()
    assert all(d.total > 0 for d in dropped.values()), dropped
    buf.close()
    log(f"killed: {after} calls after the fault matched the oracle for the live experts; dropped pairs {dropped}")
    # A clean exit with a task gone: the survivors meet, the others disconnect while process 0 (the coordination
    # service) is still up, and process 0 leaves last.
    survivors = [p for p in range(ctx.nproc) if p != victim]
    ctx.client.wait_at_barrier("worker/killed/end", 120_000, survivors)
    if ctx.pid != 0:
        jax.distributed.shutdown()
    else:
        deadline = time.monotonic() + 60.0
        while len(ctx.client.get_live_nodes(survivors)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)


def scenario_late(ctx: Ctx):
    import jax

    import jax_ll_ep as ep
    from jax_ll_ep import testing
    from jax_ll_ep.testing import cpu_hooks

    timeout_s, sleep_s, window_s = 2.0, 4.0, 8.0
    late = ctx.nproc - 1
    late_ranks = tuple(r for r in range(ctx.ranks) if r // ctx.devices == late)
    survivors = [p for p in range(ctx.nproc) if p != late]
    buf = make_buffer(ctx, timeout_s=timeout_s, on_timeout="mask")
    fn = testing.roundtrip_fn(buf, None, None, False)
    e, t = buf.num_experts, buf.max_tokens_per_rank

    def roundtrip(i, masked):
        xs, topks, weights = case_inputs(ctx.ranks, e, t, 128, 3, seed=7000 + i)
        out, disp = fn(*(shard(buf, a) for a in (xs, topks, weights)))
        outs, got = local_blocks(buf, out), local_dispatch(buf, disp)
        if masked is not None:
            check_masked_roundtrip((xs, topks, weights), outs, got, masked, e, t, f"round trip {i}")

    roundtrip(0, ())
    ctx.barrier("late")
    if ctx.pid == late:
        cpu_hooks.set_test_delays(buf, {(r, "before_send"): sleep_s for r in late_ranks})
        start = time.monotonic()
        # Round trip 1 as two programs (the same calls): its dispatch's messages and signals go out 4 s late, then
        # (the delay removed) its combine's rows at once.
        xs, topks, weights = case_inputs(ctx.ranks, e, t, 128, 3, seed=7001)
        disp = jax.block_until_ready(testing.dispatch_fn(buf, None)(shard(buf, xs), shard(buf, topks)))
        cpu_hooks.clear_test_hooks(buf)
        handle = (disp["src_info"], disp["layout_range"], disp["src_topk_pos"])
        jax.block_until_ready(testing.combine_fn(buf)(disp["recv_x"], shard(buf, topks), shard(buf, weights), *handle))
        roundtrip(2, None)  # nobody answers it any more: it masks them (another timeout) and goes on alone
        log(f"late: this process wrote its late calls between {sleep_s:.0f} and {time.monotonic() - start:.1f} s")
        try:
            buf.check()
        except ep.RanksMaskedError as exc:
            log(f"late: it masked {exc.masked} in turn")
        n = int(ctx.client.blocking_key_value_get("worker/late/rounds", 120_000))
        log(f"late: the others made {n} round trips without it")
    else:
        t0 = time.monotonic()
        roundtrip(1, None)  # the call it is late for: completes after timeout_s without it (outputs checked below)
        fault_s = time.monotonic() - t0
        try:
            buf.check()
            raise AssertionError("the late rank was not masked")
        except ep.RanksMaskedError as exc:
            assert set(exc.masked) == set(late_ranks), exc.masked
        assert timeout_s <= fault_s <= timeout_s + 5.0, fault_s
        # Round trips without it until well after it woke and wrote (lockstep in chunks: the first survivor decides).
        i, chunk = 3, 10
        while True:
            for _ in range(chunk):
                roundtrip(i, late_ranks)
                i += 1
            go = time.monotonic() - t0 < window_s
            if ctx.pid == survivors[0]:
                ctx.client.key_value_set(f"worker/late/go/{i}", "1" if go else "0")
            if ctx.client.blocking_key_value_get(f"worker/late/go/{i}", 120_000) == "0":
                break
        buf.check()  # nothing more was recorded: no timeout, no mismatch, no late write noticed
        if ctx.pid == survivors[0]:
            ctx.client.key_value_set("worker/late/rounds", str(i - 3))
        log(f"late: {2 * (i - 3)} calls without the late rank over {time.monotonic() - t0:.1f} s, all exact")
    ctx.barrier("late-back")
    buf.mask_ranks([])  # everyone is back (and idle): the calls line up again
    for j in range(10):
        roundtrip(100_000 + j, ())
    buf.check()
    buf.close()
    log("late: 20 calls with every rank exact after restoring it")


def scenario_fail(ctx: Ctx):
    if ctx.pid == 1:
        raise SystemExit("process 1 fails on purpose")
    time.sleep(600)  # the launcher must not wait for this


SCENARIOS = {
    "exact": scenario_exact,
    "mismatch": scenario_mismatch,
    "timeout": scenario_timeout,
    "fail": scenario_fail,
    "killed": scenario_killed,
    "late": scenario_late,
}


def main():
    try:
        run()
    except BaseException:  # noqa: BLE001 - fail loudly and at once
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the atexit handlers: jax.distributed's shutdown would wait for the other processes (for minutes) and
        # hide this failure from the launcher, whose shared fate then stops everyone.
        os._exit(1)


def run():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--scenarios", default="exact,mismatch,timeout")
    parser.add_argument("--on-timeout", default="raise", choices=("raise", "mask"))
    args = parser.parse_args()
    ctx = Ctx(args)
    log(f"process {ctx.pid}/{ctx.nproc}: {ctx.devices} devices, {ctx.ranks} ranks")
    for name in args.scenarios.split(","):
        start = time.monotonic()
        if name == "killed":
            scenario_killed(ctx, args.on_timeout)
        else:
            SCENARIOS[name](ctx)
        log(f"{name}: {time.monotonic() - start:.1f} s")
    if args.scenarios != "killed":  # (a barrier would wait for the dead process)
        ctx.barrier("end")
    log("WORKER OK")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
