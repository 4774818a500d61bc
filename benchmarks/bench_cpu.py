"""The ``cpu`` backend against the ``xla`` backend on the same simulated CPU devices (a benchmark, not a test).

For each T in --tokens (tokens per rank; every rank passes n = T), H, K, E as given, 8 devices on one axis:
  dispatch  median wall time of one jitted shard_map(dispatch) call from Python (block_until_ready), bf16
  combine   the same for combine (y = the received rows, the handle of a dispatch)
and for the cpu backend also the protocol time inside the handlers (from the native test stamps: the first rank
entering to the last rank returning, median over the same calls). Prints a Markdown table and writes
benchmarks/results/cpu-<date>.json.

    scripts/dev.sh python benchmarks/bench_cpu.py [--tokens 1 16 128] [--reps 50]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import jax_ll_ep as ep  # noqa: E402
from jax_ll_ep import testing  # noqa: E402
from jax_ll_ep.testing import cpu_hooks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _time_calls(fn, args, reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def _protocol_times(buf, fn, args, reps: int, kind: int) -> list[float]:
    """Per call: last rank's return minus first rank's entry, from the native stamps (cpu backend only)."""
    cpu_hooks.set_test_delays(buf, {}, seed=0)  # stamps only, no delays
    try:
        out = []
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
            s = cpu_hooks.test_stamps(buf)[0, :, kind]  # [R, (enter, signalled, returned)]
            out.append((s[:, 2].max() - s[:, 0].min()) * 1e-9)
        return out
    finally:
        cpu_hooks.clear_test_hooks(buf)


def bench(backend: str, ranks: int, tokens: int, hidden: int, topk: int, experts: int, reps: int) -> dict:
    mesh = testing.ep_mesh(ranks)
    with ep.Buffer(mesh, "ep", num_experts=experts, max_tokens_per_rank=tokens, hidden=hidden, backend=backend) as buf:
        rng = np.random.default_rng(tokens)
        xs = [testing.random_tokens(rng, tokens, hidden) for _ in range(ranks)]
        topks = [testing.random_routing(rng, tokens, topk, experts) for _ in range(ranks)]
        weights = [testing.random_weights(rng, t) for t in topks]
        dispatch_fn = testing.dispatch_fn(buf, None)
        dargs = [testing.shard_per_device(buf, a) for a in (xs, topks)]
        disp = dispatch_fn(*dargs)
        cargs = [disp["recv_x"], dargs[1], testing.shard_per_device(buf, weights)]
        cargs += [disp[k] for k in ("src_info", "layout_range", "src_topk_pos")]
        combine_fn = testing.combine_fn(buf)
        result = {
            "backend": backend,
            "tokens_per_rank": tokens,
            "dispatch_us": 1e6 * statistics.median(_time_calls(dispatch_fn, dargs, reps)),
            "combine_us": 1e6 * statistics.median(_time_calls(combine_fn, cargs, reps)),
            "bytes_per_rank": buf.nbytes_per_rank,
        }
        if backend == "cpu":
            result["dispatch_protocol_us"] = 1e6 * statistics.median(_protocol_times(buf, dispatch_fn, dargs, reps, 0))
            result["combine_protocol_us"] = 1e6 * statistics.median(_protocol_times(buf, combine_fn, cargs, reps, 1))
            buf.check()
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/cpu-<date>.json)")
    args = parser.parse_args()

    rows = []
    for tokens in args.tokens:
        for backend in ("cpu", "xla"):
            rows.append(bench(backend, args.ranks, tokens, args.hidden, args.topk, args.experts, args.reps))
            print(f"  measured {backend} T={tokens}", flush=True)

    print()
    print(
        f"{args.ranks} CPU devices ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
        f"H={args.hidden}, K={args.topk}, E={args.experts}, bf16, median of {args.reps} calls from Python"
    )
    print()
    print("| T | backend | dispatch (us) | combine (us) | protocol in handlers: dispatch / combine (us) |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        proto = (
            f"{r['dispatch_protocol_us']:.0f} / {r['combine_protocol_us']:.0f}" if "dispatch_protocol_us" in r else "-"
        )
        print(f"| {r['tokens_per_rank']} | {r['backend']} | {r['dispatch_us']:.0f} | {r['combine_us']:.0f} | {proto} |")

    out = args.out or RESULTS / f"cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "bench_cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "processor": platform.processor(), "platform": platform.platform()},
        "jax": jax.__version__,
        "config": {k: getattr(args, k) for k in ("ranks", "hidden", "topk", "experts", "reps")},
        "method": "median wall time per jitted call from Python (block_until_ready); protocol_us: first rank "
        "entering the handler to the last rank returning (native stamps)",
        "results": rows,
    }
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
