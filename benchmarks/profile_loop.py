"""Where a jitted loop of dispatch+combine pairs spends its time, seen by JAX's profiler (host and device).

    python benchmarks/profile_loop.py --out DIR [--tokens 1 128] [--iterations 50] [--executions 3]
    python benchmarks/profile_loop.py --summarize DIR/.../perfetto_trace.json.gz

The first form runs, on one GPU and one rank, the loop mode of ``benchmarks/run.py`` (a jitted ``lax.fori_loop`` of
dependent bf16 dispatch+combine pairs) for jax_ll_ep and for the JAX-native packed pair, and records a few
executions of each under ``jax.profiler.trace`` (a Perfetto trace: host threads, CUDA API calls and kernels with
their device times). The second form reads such a trace and prints, per program execution: its host span, the
device span from the first to the last kernel, the device events by name with their median durations, the median
and total device gap between consecutive kernels (what the loop machinery and the kernel boundaries cost), and
the host events that took most of the time. It runs anywhere (no GPU needed to summarize).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def record(args) -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from loop_pairs import jax_packed_pair, loop_program, native_pair  # the loop mode's own programs

    import jax_ll_ep as ep

    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    h, k, e = args.hidden, args.topk, args.experts
    rng = np.random.default_rng(0)
    programs = []
    buffers = []
    for t in args.tokens:
        x = jax.numpy.asarray(rng.standard_normal((t, h)), jax.numpy.bfloat16)
        idx = jax.numpy.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jax.numpy.int32)
        w = rng.random((t, k)).astype(np.float32)
        w = jax.numpy.asarray(w / w.sum(axis=1, keepdims=True))
        buf = ep.Buffer(mesh, "ep", num_experts=e, max_tokens_per_rank=t, hidden=h, backend="cuda")
        buffers.append(buf)
        for name, pair in (("jax_ll_ep", native_pair(buf)), ("jax_native", jax_packed_pair(e))):
            fn = loop_program(mesh, "ep", pair, args.iterations)
            for _ in range(3):  # compile, then warm
                jax.block_until_ready(fn(x, idx, w))
            programs.append((f"{name} T={t}", fn, (x, idx, w)))
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for label, fn, a in programs:
            for _ in range(args.executions):
                with jax.profiler.TraceAnnotation(f"execution {label}"):  # what execution_summaries looks for
                    jax.block_until_ready(fn(*a))
    for buf in buffers:
        buf.check()
        buf.close()
    print("profile_loop: trace in", args.out)


def execution_summaries(trace: dict) -> list[dict]:
    """Per ``execution ...`` annotation of a Perfetto trace (JAX's profiler): its host span, the device events inside
    it (first start and last end from the annotation's start, busy time, the gaps between consecutive events), the
    device events by name, and the host events that took most of the time. Times in us, as the trace has them."""
    events = [ev for ev in trace.get("traceEvents", []) if ev.get("ph") == "X"]
    process_names = {
        ev["pid"]: ev["args"]["name"]
        for ev in trace.get("traceEvents", [])
        if ev.get("ph") == "M" and ev.get("name") == "process_name"
    }
    device_pids = {pid for pid, name in process_names.items() if "/device:GPU" in name}
    kernels = sorted((ev for ev in events if ev["pid"] in device_pids), key=lambda ev: ev["ts"])
    host = [ev for ev in events if ev["pid"] not in device_pids]
    executions = sorted((ev for ev in host if ev["name"].startswith("execution ")), key=lambda ev: ev["ts"])
    out = []
    for ex in executions:
        t0, t1 = ex["ts"], ex["ts"] + ex["dur"]
        ks = [ev for ev in kernels if t0 <= ev["ts"] < t1]
        entry = {"name": ex["name"], "host_us": ex["dur"], "kernels": len(ks)}
        if ks:
            gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(ks, ks[1:], strict=False)]
            by_name = collections.defaultdict(list)
            for ev in ks:
                by_name[ev["name"][:60]].append(ev["dur"])
            entry.update(
                first_kernel_us=ks[0]["ts"] - t0,
                last_end_us=max(ev["ts"] + ev["dur"] for ev in ks) - t0,
                busy_us=sum(ev["dur"] for ev in ks),
                gap_median_us=statistics.median(gaps or [0]),
                gap_sum_us=sum(gaps),
                device={n: (len(ds), statistics.median(ds)) for n, ds in by_name.items()},
            )
        by_host = collections.defaultdict(list)
        for ev in host:
            if t0 <= ev["ts"] < t1 and ev is not ex:
                by_host[ev["name"][:70]].append(ev["dur"])
        entry["host"] = sorted(
            ((n, len(ds), sum(ds), statistics.median(ds)) for n, ds in by_host.items()), key=lambda row: -row[2]
        )
        out.append(entry)
    return out


def summarize(path: str) -> None:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        trace = json.load(f)
    for e in execution_summaries(trace):
        if not e["kernels"]:
            print(f"{e['name']}: host {e['host_us']:.0f} us, no device events")
            continue
        print(
            f"{e['name']}: host {e['host_us']:.0f} us; device first kernel at +{e['first_kernel_us']:.0f} us, last "
            f"ends at +{e['last_end_us']:.0f} us, {e['kernels']} kernels busy {e['busy_us']:.0f} us, gap median "
            f"{e['gap_median_us']:.2f} us, sum of gaps {e['gap_sum_us']:.0f} us"
        )
        for n, (count, median) in sorted(e["device"].items(), key=lambda kv: -kv[1][0])[:8]:
            print(f"    {count:5d} x {n}: median {median:.2f} us")
        for n, count, total, median in e["host"][:10]:
            print(f"    host {count:5d} x {n}: total {total:.0f} us, median {median:.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/profile_loop")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--executions", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--summarize", default="", help="a perfetto_trace.json.gz to summarize (no recording)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        record(args)


if __name__ == "__main__":
    main()
