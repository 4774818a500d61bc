"""One rank of the GPU benchmark (started by benchmarks/run.py): ``gpu_worker.py CONFIG RANK NRANKS PORT OUT_DIR``.

Timing method (device timestamps, no host clock): every measured program is ONE jitted shard_map holding a
Python-unrolled sequence of calls, with a timestamp (the CUDA module's ``jax_ll_ep_timestamp`` target: one thread
writes %globaltimer) before the first call and after every call. XLA captures the program into a CUDA graph
(--xla_gpu_graph_min_graph_size=1), as it does for a model's step, and a graph orders its nodes only by the buffers
they share. So every stamp is ordered by real buffer dependencies:
  - the native ops and the stamps around them sit on the buffer's effect token (custom calls, kept in program order);
  - around XLA-only code (the baselines) a stamp reads a scalar computed from one element of every output of the call
    before it, and the next call's small inputs pass through ``where(stamp == SENTINEL, a + 1, a)`` (never true in
    practice), which XLA fuses into their first consumers, so no kernel of the next call starts before the stamp.
Inputs rotate among several sets generated on the device (separate arrays, so no slicing), so consecutive calls never
read the same memory; the first calls of every execution and the whole first execution are warm-up and excluded.
The overhead of the timing itself (back-to-back stamps, resp. stamps with the tie and the dependency kernel and no
op between them) is measured in the same process and subtracted by run.py.

Loop mode (methods ``cuda_loop`` and ``jax_packed_loop``, 1 rank only): the pair as a model calls it, a jitted
``lax.fori_loop`` of dependent bf16 dispatch+combine pairs (each consumes the previous pair's output), timed by the
host wall clock around whole loops and divided by their length (``pair_ns``). No stamps: the loop is what users feel,
launch gaps, XLA's own kernels between the ops and instruction fetch after the other op's kernel included.

Writes OUT_DIR/rank<RANK>.json: raw stamp differences (ns) per method, T and op, the loop mode's ns per pair, the
stamp-to-stamp overhead, and (rank 0 of the 1-rank run) the device-copy bandwidth.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback

CONFIG, RANK, NRANKS, PORT, OUT_DIR = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402

if NRANKS > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{PORT}", num_processes=NRANKS, process_id=RANK, local_device_ids=[0]
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

with open(CONFIG) as f:
    CFG = json.load(f)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if CFG.get("package_root"):  # run.py --package-root: another build's package first
    sys.path.insert(0, CFG["package_root"])
import loop_pairs  # noqa: E402  (beside this script, on sys.path as its directory)
from loop_pairs import jax_packed_pair, native_pair, weighted_sum  # noqa: E402

import jax_ll_ep as ep  # noqa: E402
from jax_ll_ep import _extension  # noqa: E402
from jax_ll_ep._jax_internals import aval, native_call  # noqa: E402

AXIS = "ep"
STAMP_ORDER_ID = 1 << 40  # effect id of the stamps around XLA-only baselines (no buffer of ours is involved)
# JAX_LL_EP_BENCH_DRY_RUN=1: on CPU devices, with the cpu backend for "cuda" and zeros for stamps (checks the
# programs' structure on a machine without a GPU; the numbers mean nothing).
DRY_RUN = os.environ.get("JAX_LL_EP_BENCH_DRY_RUN", "") == "1"


def log(msg: str) -> None:
    print(f"[rank {RANK}] {msg}", flush=True)


def barrier(name: str) -> None:
    if NRANKS > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(f"bench/{name}", 600_000)


# ---------------------------------------------------------------------------------------------------------------
# Stamps and ordering
# ---------------------------------------------------------------------------------------------------------------
def stamp(dep: jax.Array, like: jax.Array, order_id: int) -> jax.Array:
    """int32[2] (low, high words of %globaltimer in ns), taken when the stream reaches this point."""
    if DRY_RUN:
        return (like.reshape(-1)[:2] * 0).astype(jnp.int32) + dep
    (s,) = native_call("jax_ll_ep_timestamp", [dep], [aval(like, (2,), jnp.int32)], buffer_id=order_id)
    return s


def after(values, token):
    """`values`, scheduled after `token` (an optimization barrier; orders XLA's schedule, not a graph's edges)."""
    return jax.lax.optimization_barrier((values, token))[0]


SENTINEL = -1_234_567  # a stamp's low word equals it once in 2^32 calls: the tie below never changes a value


def tie(values, s: jax.Array):
    """`values` (integer, bfloat16 and float32 arrays) made to depend on stamp `s` by a buffer the graph sees."""
    flag = s[0] == SENTINEL

    def one(a):
        if a is None or not (jnp.issubdtype(a.dtype, jnp.integer) or a.dtype in (jnp.bfloat16, jnp.float32)):
            return a
        return jnp.where(flag, a + jnp.ones((), a.dtype), a)

    return jax.tree.map(one, values)


def dep_of(values) -> jax.Array:
    """An int32 scalar read from every array of `values` once each is complete. The optimization barrier keeps XLA
    from narrowing the producers to the one element read (it would push the slice through them)."""
    leaves = jax.lax.optimization_barrier(tuple(jax.tree.leaves(values)))
    firsts = [leaf.reshape(-1)[0].astype(jnp.float32).astype(jnp.int32) for leaf in leaves]
    return functools.reduce(jnp.add, firsts)


def first_dep(like: jax.Array) -> jax.Array:
    """The first stamp's operand: a scalar read from an input (no constant operands on the custom call)."""
    return like.reshape(-1)[0].astype(jnp.float32).astype(jnp.int32)


def stamps_to_ns(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s).astype(np.int64)
    return (s[..., 0] & 0xFFFFFFFF) | (s[..., 1] << 32)


# ---------------------------------------------------------------------------------------------------------------
# Inputs, generated on the device (per rank) from a fixed seed
# ---------------------------------------------------------------------------------------------------------------
def mesh() -> Mesh:
    return Mesh(np.array(sorted(jax.devices(), key=lambda d: d.process_index)), (AXIS,))


def make_inputs(m: Mesh, *, sets, n, t_max, hidden, topk, experts, want_packed):
    """Per rank, `sets` input sets, each its own array: x [n, H] bf16, topk [n, K], weights [n, K], y [E_l, R*T, H]
    and (packed baselines) y_packed [n*K, H]. Generated on the device; nothing crosses processes."""
    ranks = m.shape[AXIS]
    e_local = experts // ranks
    fields = ("x", "t", "w", "y", "yp") if want_packed else ("x", "t", "w", "y")

    def gen():
        key = jax.random.fold_in(jax.random.PRNGKey(CFG["seed"]), jax.lax.axis_index(AXIS))
        out = {f: [] for f in fields}
        for j in range(sets):
            k1, k2, k3, k4, k5 = jax.random.split(jax.random.fold_in(key, j), 5)
            blocks = hidden // 128 if hidden % 128 == 0 else 1
            mag = jnp.exp2(jax.random.randint(k1, (n, blocks), -6, 7).astype(jnp.float32))
            mag = jnp.repeat(mag, hidden // blocks, axis=1)
            out["x"].append((jax.random.normal(k2, (n, hidden), jnp.float32) * mag).astype(jnp.bfloat16))
            logits = jax.random.normal(k3, (n, experts), jnp.float32)
            w, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), topk)
            out["t"].append(idx.astype(jnp.int32))
            out["w"].append((w / jnp.sum(w, axis=-1, keepdims=True)).astype(jnp.float32))
            out["y"].append(jax.random.normal(k4, (e_local, ranks * t_max, hidden), jnp.bfloat16))
            if want_packed:
                out["yp"].append(jax.random.normal(k5, (n * topk, hidden), jnp.bfloat16))
        return {f: tuple(v) for f, v in out.items()}

    fn = jax.jit(jax.shard_map(gen, mesh=m, in_specs=(), out_specs=P(AXIS)))
    return fn()


# ---------------------------------------------------------------------------------------------------------------
# Methods: (dispatch(x, t) -> carry, combine(y, y_packed, t, w, carry) -> out); all produce the contract's results
# ---------------------------------------------------------------------------------------------------------------
FP8 = ep.Fp8Options(scale_format="float")


def quantize_fp8(x):
    """float scale per 128 channels (the float mode of the contract)."""
    m, h = x.shape
    xb = x.astype(jnp.float32).reshape(m, h // 128, 128)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), 1e-4)
    q = jnp.clip(xb * (448.0 / amax)[..., None], -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q.reshape(m, h), amax / 448.0


def native_method(buf):
    def dispatch(x, t, s):
        return ep.dispatch(buf, x, t, fp8=FP8)

    def combine(y, yp, t, w, carry, s):
        return ep.combine(buf, y, t, w, carry[2])

    return dispatch, combine


def jax_packed_method(experts):
    """What a JAX user writes for one rank: sort the (token, expert) pairs by expert, gather (packed [n*K, H]
    layout, fp8 quantized once per token), and back: inverse permutation, weighted sum."""

    def dispatch(x, t, s):
        n, k = t.shape
        flat = t.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        counts = jnp.bincount(flat, length=experts)
        q, scale = quantize_fp8(x)
        src = order // k
        return q[src], scale[src], counts, order

    def combine(y, yp, t, w, carry, s):
        n, k = t.shape
        order = carry[3]
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        return weighted_sum(yp[inv].reshape(n, k, -1), w)

    return dispatch, combine


def jax_padded_method(experts, t_max):
    """The same through the contract's [E, T, H] layout (scatter into a padded buffer), as the xla backend's
    outputs but without collectives."""

    def dispatch(x, t, s):
        n, k = t.shape
        flat = t.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        counts = jnp.bincount(flat, length=experts)
        starts = jnp.cumsum(counts) - counts
        sorted_e = flat[order]
        pos = jnp.arange(n * k) - starts[sorted_e]
        q, scale = quantize_fp8(x)
        src = order // k
        data = jnp.zeros((experts, t_max, x.shape[1]), q.dtype).at[sorted_e, pos].set(q[src])
        scales = jnp.zeros((experts, t_max, scale.shape[1]), scale.dtype).at[sorted_e, pos].set(scale[src])
        slot = jnp.zeros((n * k,), jnp.int32).at[order].set(pos.astype(jnp.int32)).reshape(n, k)
        return data, scales, counts, slot

    def combine(y, yp, t, w, carry, s):
        return weighted_sum(y[t, carry[3]], w)

    return dispatch, combine


def ragged_method(experts):
    """The packed path with the exchange done by jax.lax.ragged_all_to_all (one group of this rank's rows)."""

    def exchange(rows, s):
        m = rows.shape[0]
        zero = tie(jnp.zeros((1,), jnp.int32), s)  # the exchange reads a buffer written after the stamp
        size = jnp.full((1,), m, jnp.int32)
        return jax.lax.ragged_all_to_all(rows, jnp.zeros_like(rows), zero, size, zero, size, axis_name=AXIS)

    packed_d, _ = jax_packed_method(experts)

    def dispatch(x, t, s):
        data, scale, counts, order = packed_d(x, t, s)
        data = jax.lax.bitcast_convert_type(exchange(jax.lax.bitcast_convert_type(data, jnp.uint8), s), data.dtype)
        return data, exchange(scale, s), counts, order

    def combine(y, yp, t, w, carry, s):
        n, k = t.shape
        order = carry[3]
        back = exchange(yp, s)
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        return weighted_sum(back[inv].reshape(n, k, -1), w)

    return dispatch, combine


# ---------------------------------------------------------------------------------------------------------------
# The measured program
# ---------------------------------------------------------------------------------------------------------------
def program(m: Mesh, method, order_id: int, calls: int, sets: int, fields, native: bool, sequence: str = "pair"):
    """Stamps around `calls` dispatch+combine pairs; returns [1, 2*calls+1, 2] stamps per device. With sequence
    "dispatch" only the dispatches are issued (and stamped); with "combine" one dispatch precedes the first stamp
    and its handle serves 2*calls combines: the same op back to back, e.g. to see what the other op's kernel costs
    the next one (instruction cache, TLB)."""
    dispatch, combine = method

    def body(inp):
        like = inp["x"][0]  # varying over the axis: gives the stamps' type
        carry0 = dispatch(inp["x"][0], inp["t"][0], None) if sequence == "combine" else None
        s = stamp(first_dep(like) if carry0 is None else dep_of(carry0[:1]), like, order_id)
        stamps = [s]
        for i in range(2 * calls if sequence != "pair" else calls):
            j = i % sets
            x, t = inp["x"][j], inp["t"][j]
            if sequence != "combine":
                x, t = after((x, t), s) if native else tie((x, t), s)
                carry = dispatch(x, t, s)
                s = stamp(s if native else dep_of(carry), like, order_id)
                stamps.append(s)
                if sequence == "dispatch":
                    continue
            else:
                j, carry = 0, carry0
            y, yp, t, w = inp["y"][j], inp["yp"][j] if "yp" in inp else None, inp["t"][j], inp["w"][j]
            y, yp, t, w, carry = after((y, yp, t, w, carry), s) if native else (y, yp, *tie((t, w, carry), s))
            out = combine(y, yp, t, w, carry, s)
            s = stamp(s if native else dep_of(out), like, order_id)
            stamps.append(s)
        return jnp.stack(stamps)[None]

    return jax.jit(jax.shard_map(body, mesh=m, in_specs=({f: P(AXIS) for f in fields},), out_specs=P(AXIS)))


# ---------------------------------------------------------------------------------------------------------------
# Loop mode: the pair as a model calls it (a jitted lax.fori_loop of dependent bf16 dispatch+combine pairs, host wall
# clock per loop divided by its length), for jax_ll_ep and for the JAX-native packed pair in the same process
# ---------------------------------------------------------------------------------------------------------------
def loop_program(m: Mesh, pair, iters: int):
    # run.py --loop-unroll: one straight program of `iters` pairs, no loop counter (what the loop machinery costs)
    return loop_pairs.loop_program(m, AXIS, pair, iters, unroll=bool(CFG.get("loop_unroll")))


def measure_loop(fn, args, *, iters: int, repeats: int) -> dict:
    """Host wall clock of whole loops (the first, with compilation, excluded), per pair in ns."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - t0) * 1e9 / iters)
    return {"pair_ns": samples, "iterations": iters, "unrolled": bool(CFG.get("loop_unroll"))}


def overhead_program(m: Mesh, order_id: int, count: int, native: bool):
    """Stamps with nothing between them (native: on the token; else with the tie and the dependency kernel that
    surround an XLA-only call): the overhead each measured interval carries."""

    def body(xs, ts):
        s = stamp(first_dep(xs), xs, order_id)
        stamps = [s]
        for _ in range(count):
            dep = s if native else dep_of(tie((xs, ts), s))
            s = stamp(dep, xs, order_id)
            stamps.append(s)
        return jnp.stack(stamps)[None]

    return jax.jit(jax.shard_map(body, mesh=m, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS)))


def process_local(m: Mesh, local: np.ndarray) -> jax.Array:
    """A global array from this process's shard (no cross-process check: XLA collectives fail under MPS)."""
    shape = (m.size * local.shape[0], *local.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(m, P(AXIS)), local, shape)


def local_stamps(arr) -> np.ndarray:
    return stamps_to_ns(np.asarray(arr.addressable_shards[0].data)[0])


def measure(fn, args, *, executions: int, warmup_calls: int, sequence: str = "pair") -> dict:
    """Runs the program; returns per-op samples (ns) from executions 2.. and calls past warm-up, and the last
    execution's stamps."""
    d, c = [], []
    ns = np.zeros((0,), np.int64)
    for e in range(executions + 1):
        ns = local_stamps(jax.block_until_ready(fn(*args)))
        if e == 0:
            continue  # compile + first-touch execution
        diffs = np.diff(ns)
        if sequence == "pair":
            d += diffs[0::2][warmup_calls:].tolist()
            c += diffs[1::2][warmup_calls:].tolist()
        else:
            (d if sequence == "dispatch" else c).extend(diffs[2 * warmup_calls :].tolist())
    return {"dispatch_ns": d, "combine_ns": c, "last_stamps_ns": ns}


TRACE_MARKS = ("entry", "tables", "sent", "arrived", "received", "exit")


def phase_trace(buf, stamps_ns: np.ndarray, warmup_calls: int) -> dict:
    """With JAX_LL_EP_TRACE=1: where the time of each op of the last execution went (median us per phase). The
    kernels' rows (xla_ffi/cuda/launch.h) give block 0's phase boundaries and the last block's exit; the stamps
    around the op give the launch gap before entry and the gap after exit."""
    rows, marks = _extension.cuda_module().trace_shape()
    raw, last_seq = buf.backend.trace()
    trace = np.frombuffer(raw, np.uint64).reshape(rows, marks).astype(np.int64)
    ops = len(stamps_ns) - 1
    out: dict = {}
    for i in range(2 * warmup_calls, ops):
        seq = last_seq - ops + 1 + i
        row = trace[seq % rows]
        if row[0] >> 8 != seq:
            continue
        kind = "dispatch" if row[0] & 0xFF == 1 else "combine"
        points = [("stamp", int(stamps_ns[i]))] + [
            (name, int(row[j + 1])) for j, name in enumerate(TRACE_MARKS) if row[j + 1] != 0
        ]
        points.append(("next stamp", int(stamps_ns[i + 1])))
        phases = out.setdefault(kind, {})
        for (a, ta), (b, tb) in zip(points, points[1:], strict=False):
            phases.setdefault(f"{a} -> {b}", []).append((tb - ta) / 1e3)
        if row[7] != 0 and row[1] != 0:  # the last warp out of the send loop (kMarkAllSent), from block 0's entry
            phases.setdefault("entry -> all sent", []).append((int(row[7]) - int(row[1])) / 1e3)
    return {k: {name: float(np.median(v)) for name, v in ph.items()} for k, ph in out.items()}


def copy_bandwidth(m: Mesh) -> dict:
    """Device copy (x + 1 over 512 MiB of float32, read + write counted), timed with the same stamps."""
    n = (512 << 20) // 4
    reps = 6

    def body(a, b):
        s = stamp(first_dep(a), a, STAMP_ORDER_ID)
        stamps = [s]
        for i in range(reps):
            out = tie(a if i % 2 == 0 else b, s) + 1.0  # one fused read + write pass, after the stamp
            s = stamp(dep_of(out), a, STAMP_ORDER_ID)
            stamps.append(s)
        return jnp.stack(stamps)[None]

    fn = jax.jit(jax.shard_map(body, mesh=m, in_specs=P(AXIS), out_specs=P(AXIS)))
    a = process_local(m, np.ones((n,), np.float32))
    b = process_local(m, np.full((n,), 2.0, np.float32))
    times = []
    for e in range(3):
        ns = local_stamps(jax.block_until_ready(fn(a, b)))
        if e:
            times += np.diff(ns).tolist()
    t = float(np.median(times)) * 1e-9
    return {"bytes": 2 * 4 * n, "median_ns": float(np.median(times)), "gbps": 2 * 4 * n / t / 1e9 if t > 0 else 0.0}


LOOP_METHODS = ("cuda_loop", "jax_packed_loop")


def loop_trace(buf) -> dict:
    """With JAX_LL_EP_TRACE=1: the device's view of the last calls of a loop (median and mean us over the trace's
    rows): each op from block 0's entry (after the call state is read) to the last block's exit, the gap from one
    op's exit to the next op's entry (the kernel boundary, the loop's own work and the next op's entry), and the
    span from the first entry to the last per pair (against the host's wall clock per pair)."""
    rows, marks = _extension.cuda_module().trace_shape()
    raw, last_seq = buf.backend.trace()
    trace = np.frombuffer(raw, np.uint64).reshape(rows, marks).astype(np.int64)
    calls = []
    for seq in range(max(1, last_seq - rows + 1), last_seq + 1):
        row = trace[seq % rows]
        if row[0] >> 8 == seq and row[1] != 0 and row[6] != 0:
            calls.append(("dispatch" if row[0] & 0xFF == 1 else "combine", int(row[1]), int(row[6])))
    out: dict = {}
    for (kind, entry, exit_), nxt in zip(calls, calls[1:] + [None], strict=True):
        out.setdefault(f"{kind} entry -> exit", []).append((exit_ - entry) / 1e3)
        if nxt is not None:
            out.setdefault(f"{kind} exit -> {nxt[0]} entry", []).append((nxt[1] - exit_) / 1e3)
    summary = {name: float(np.median(v)) for name, v in out.items()}
    summary.update({f"{name} (mean)": float(np.mean(v)) for name, v in out.items()})
    if len(calls) >= 3:  # every gap counted, the idle ones a median hides included
        summary["span per pair"] = (calls[-1][1] - calls[0][1]) / 1e3 / ((len(calls) - 1) / 2)
    return summary


def make_buffer(m: Mesh, backend: str, experts: int, t_max: int, hidden: int) -> ep.Buffer:
    """A buffer of the run's configuration (the dry run swaps the cpu backend in for cuda)."""
    backend = "cpu" if DRY_RUN and backend == "cuda" else backend
    return ep.Buffer(
        m,
        AXIS,
        num_experts=experts,
        max_tokens_per_rank=t_max,
        hidden=hidden,
        backend=backend,
        timeout_s=CFG["timeout_s"],
    )


def run_loop(m: Mesh, name: str, t_max: int, hidden: int, topk: int, experts: int) -> dict:
    """One loop-mode row (1 rank): ``pair_ns`` per pair, or the error."""
    entry = {"method": name, "tokens": t_max}
    t0 = time.time()
    buf = None
    try:
        inputs = make_inputs(
            m, sets=1, n=t_max, t_max=t_max, hidden=hidden, topk=topk, experts=experts, want_packed=False
        )
        if name == "cuda_loop":
            buf = make_buffer(m, "cuda", experts, t_max, hidden)
            pair = native_pair(buf)
        else:
            pair = jax_packed_pair(experts)
        iters = CFG.get("loop_iterations", 200)
        fn = loop_program(m, pair, iters)
        entry.update(
            measure_loop(
                fn, (inputs["x"][0], inputs["t"][0], inputs["w"][0]), iters=iters, repeats=CFG.get("loop_repeats", 5)
            )
        )
        if buf is not None:
            buf.check()
            if buf.backend.name == "cuda" and ep.CudaOptions().trace:
                entry["trace_us"] = loop_trace(buf)
                log(f"loop trace T={t_max}: {json.dumps(entry['trace_us'])}")
        entry["seconds"] = round(time.time() - t0, 1)
        log(f"{name} T={t_max}: pair {np.median(entry['pair_ns']) / 1e3:.1f} us ({entry['seconds']} s)")
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        log(f"{name} T={t_max}: FAILED {entry['error'][:300]}")
    finally:
        if buf is not None:
            buf.close()
    return entry


def main() -> None:
    m = mesh()
    if not DRY_RUN:
        _extension.cuda_module()  # registers jax_ll_ep_timestamp (and the ops) for CUDA
    result = {
        "rank": RANK,
        "ranks": NRANKS,
        "device": jax.devices()[0].device_kind,
        "multiprocessors_reported": None if DRY_RUN else int(_extension.cuda_module().multiprocessor_count(0)),
        "mps_active_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
        "jax": jax.__version__,
        "package": os.path.dirname(os.path.abspath(ep.__file__)),  # (run.py --package-root: which build ran)
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "runs": [],
        "errors": [],
    }
    path = os.path.join(OUT_DIR, f"rank{RANK}.json")

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)

    if CFG.get("copy_bandwidth") and NRANKS == 1:
        result["copy"] = copy_bandwidth(m)
        log(f"copy bandwidth {result['copy']['gbps']:.0f} GB/s")
    xs0 = process_local(m, np.zeros((1, 8), np.float32))
    ts0 = process_local(m, np.zeros((1, 8), np.int32))
    for key, native in (("stamp_overhead_ns", True), ("tied_overhead_ns", False)):
        ov = overhead_program(m, STAMP_ORDER_ID, 64, native)
        samples = []
        for e in range(4):
            ns = local_stamps(jax.block_until_ready(ov(xs0, ts0)))
            if e:
                samples += np.diff(ns)[8:].tolist()
        result[key] = samples
        positive = [v for v in samples if v > 0]
        log(f"{key}: median {np.median(samples):.0f} ns (smallest step {min(positive) if positive else 0} ns)")
    save()

    H, K, E = CFG["hidden"], CFG["topk"], CFG["experts"]
    for t_max in CFG["tokens"]:
        for name in CFG["methods"]:
            if name in LOOP_METHODS:
                if NRANKS == 1 and t_max in CFG.get("loop_tokens", ()):
                    result["runs"].append(run_loop(m, name, t_max, H, K, E))
                    save()
                continue
            if name != "cuda" and NRANKS > 1:
                continue  # XLA collectives do not run with several processes on one GPU (see run.py)
            if name != "cuda" and t_max not in CFG.get("baseline_tokens", CFG["tokens"]):
                continue
            barrier(f"{name}/{t_max}/start")
            t0 = time.time()
            packed = name in ("jax_packed", "ragged_a2a")
            entry = {
                "method": name,
                "tokens": t_max,
                "overhead": "stamp_overhead_ns" if name == "cuda" else "tied_overhead_ns",
            }
            buf = None
            try:
                if name in ("cuda", "xla"):
                    buf = make_buffer(m, name, E, t_max, H)
                    meth, order_id = native_method(buf), buf.handle if name == "cuda" else STAMP_ORDER_ID
                elif name == "jax_packed":
                    meth, order_id = jax_packed_method(E), STAMP_ORDER_ID
                elif name == "jax_padded":
                    meth, order_id = jax_padded_method(E, t_max), STAMP_ORDER_ID
                elif name == "ragged_a2a":
                    meth, order_id = ragged_method(E), STAMP_ORDER_ID
                else:
                    raise ValueError(f"unknown method {name}")
                inputs = make_inputs(
                    m, sets=CFG["sets"], n=t_max, t_max=t_max, hidden=H, topk=K, experts=E, want_packed=packed
                )
                fields = tuple(inputs)
                sequence = CFG.get("sequence", "pair")
                fn = program(m, meth, order_id, CFG["calls"], CFG["sets"], fields, name == "cuda", sequence)
                timed = measure(
                    fn, (inputs,), executions=CFG["executions"], warmup_calls=CFG["warmup_calls"], sequence=sequence
                )
                last_stamps = timed.pop("last_stamps_ns")
                entry.update(timed)
                if name == "cuda" and os.environ.get("JAX_LL_EP_TRACE") == "1" and not DRY_RUN:
                    entry["trace_us"] = phase_trace(buf, last_stamps, CFG["warmup_calls"])
                    log(f"trace T={t_max}: {json.dumps(entry['trace_us'])}")
                if buf is not None:
                    buf.check()
                del inputs
                entry["seconds"] = round(time.time() - t0, 1)
                log(
                    f"{name} T={t_max}: dispatch {np.median(entry['dispatch_ns']) / 1e3:.1f} us, "
                    f"combine {np.median(entry['combine_ns']) / 1e3:.1f} us ({entry['seconds']} s)"
                )
            except Exception as exc:  # noqa: BLE001 - recorded (e.g. ragged_all_to_all refused), the run goes on
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
                result["errors"].append(traceback.format_exc()[-3000:])
                log(f"{name} T={t_max}: FAILED {entry['error'][:300]}")
            finally:
                if buf is not None:
                    buf.close()
            result["runs"].append(entry)
            save()
    barrier("end")
    log("done")


if __name__ == "__main__":
    main()
