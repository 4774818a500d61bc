"""The benchmarks in one command.

    python benchmarks/run.py --suite gpu     # one GPU: 1 rank, and 2/4/8 ranks as processes sharing it under MPS
    python benchmarks/run.py --suite cpu [bench_cpu.py options]   # cpu and xla backends, 8 simulated CPU devices

GPU suite (DESIGN.md section 7): the standard decode point (T=128 tokens per rank, H=7168, K=8, E=256, fp8 dispatch
with float scales, bf16 combine) is the T=128 row of a sweep over T in {1, 4, 16, 64, 128, 256}. Every rank count
runs in its own processes (benchmarks/gpu_worker.py, which describes the timing method: device timestamps around
every call of a Python-unrolled, graph-captured sequence, inputs rotated among several sets). For several ranks the
CUDA MPS daemon is started here (private pipe and log folders) and each process gets 100/R % of the SMs.

Baselines, same inputs, same run: the ``xla`` backend (all_to_all; capacity layout), a JAX-native local path
(argsort + gather into a packed [T*K, H] layout, inverse permutation + weighted sum back; ``jax_packed``), the same
into the contract's padded [E, T, H] layout (``jax_padded``), and ``jax.lax.ragged_all_to_all`` carrying the packed
rows (``ragged_a2a``). They run for 1 rank only: with several processes on one GPU XLA's collectives fail (NCCL
refuses two ranks on one device), and the local paths have no cross-rank exchange at all.

Loop mode (1 rank, T in --loop-tokens, default 1 16 128 256): rows with method ``cuda_loop`` (jax_ll_ep) and
``jax_packed_loop`` (the JAX-native packed pair, bf16) hold ``pair_us``: host wall clock per dependent bf16
dispatch+combine pair inside one jitted ``lax.fori_loop`` of --loop-iterations pairs (gpu_worker.py), the way a model
calls the ops. They are printed as a second table.

Reported per (ranks, T, method, op): median and p90 latency (the stamp-to-stamp overhead measured in the same
process subtracted), logical GB/s (per selected pair: H + H/32 + 16 bytes fp8 dispatch, 2H combine), the bytes the
op must move through device memory, the floor those bytes give at the device-copy bandwidth measured in the same
run, and time / floor. Bytes an op must move, per rank, with M = selected (token, expert) pairs and f = (R-1)/R the
share of pairs owned by other ranks:
  dispatch  read x (2H per token) + write the outputs (H e4m3 + H/128 float32 scales + 8 index bytes per row)
            + for remote pairs a message written into the owner's symmetric region and read back (2 x (H + H/32 + 16))
  combine   read the expert-output rows (2H each) + write out (2H per token)
            + for remote pairs a row written into the source's symmetric region and read back (2 x 2H)
(a peer's output buffers are XLA allocations of another process, so remote rows must cross through the symmetric
region; one rank's own rows need not). With R ranks on one GPU the floor is R times one rank's bytes.

Writes OUT_DIR/<card>-<date>[-label].json, the PNG plot beside it and a Markdown table (printed and written as .md).

Where the time goes: with JAX_LL_EP_TRACE=1 in the environment the cuda buffers record the kernels' phase trace
(xla_ffi/cuda/launch.h), and each cuda row of the JSON gets ``trace_us``: per op, the median time from the stamp
before the call to block 0's entry, between block 0's phase boundaries (routing tables built, send loop left, every
signal seen, its share of the outputs written), to the last block's exit and on to the next stamp; each
``cuda_loop`` row gets the device's view of the loop (gpu_worker.loop_trace).

Two builds on one machine (A/B: machine starts differ by more than some of the effects measured): copy the package
with the other build's native modules to DIR/jax_ll_ep and run once with ``--package-root DIR`` and once without;
each worker records the package it imported (``package`` in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from jax_ll_ep.testing import free_port, launch_ranks  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("cuda", "xla", "jax_packed", "jax_padded", "ragged_a2a", "cuda_loop", "jax_packed_loop")
LOOP_METHODS = ("cuda_loop", "jax_packed_loop")


# ---------------------------------------------------------------------------------------------------------------
# Byte model (see the module docstring)
# ---------------------------------------------------------------------------------------------------------------
def op_bytes(op: str, *, ranks: int, tokens: int, hidden: int, topk: int) -> dict:
    pairs = tokens * topk  # the benchmark's routing selects K distinct experts per token, none dropped
    remote = pairs * (ranks - 1) / ranks
    if op == "dispatch":
        logical = pairs * (hidden + hidden // 32 + 16)
        io = tokens * 2 * hidden + pairs * (hidden + hidden // 128 * 4 + 8)
        message = 16 + hidden + hidden // 128 * 4
    else:
        logical = pairs * 2 * hidden
        io = pairs * 2 * hidden + tokens * 2 * hidden
        message = 2 * hidden
    return {"logical": logical, "must_move": io + 2 * remote * message}


def stats_us(samples_ns: list[float], overhead_ns: float) -> dict:
    net = sorted(max(s - overhead_ns, 0.0) for s in samples_ns)
    if not net:
        return {}
    p90 = net[min(len(net) - 1, int(round(0.9 * (len(net) - 1))))]
    return {"median_us": statistics.median(net) / 1e3, "p90_us": p90 / 1e3, "samples": len(net)}


# ---------------------------------------------------------------------------------------------------------------
# Processes and MPS
# ---------------------------------------------------------------------------------------------------------------
class Mps:
    """The CUDA MPS control daemon with private pipe/log folders, so several rank processes share the GPU
    concurrently (their spin-waiting kernels need to run at the same time)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jax_ll_ep_mps_")
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": f"{self.dir}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{self.dir}/log"}
        for d in self.env.values():
            os.makedirs(d)
        try:
            self.on = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.env}).returncode == 0
        except OSError:
            self.on = False
        if not self.on:
            print("WARNING: MPS did not start; the ranks will time-slice the GPU", flush=True)

    def stop(self):
        if self.on:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **self.env})
            self.on = False
            time.sleep(1)


def run_workers(ranks: int, config: dict, out_dir: Path, extra_env: dict, timeout_s: float) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(config))
    env = {**os.environ, **extra_env}
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    # Capture whole programs into CUDA graphs, as a model step is.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1").strip()
    if ranks > 1:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(100 // ranks, 1))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    port = free_port()
    worker = [sys.executable, str(HERE / "gpu_worker.py"), str(cfg_path)]
    commands = [[*worker, str(r), str(ranks), str(port), str(out_dir)] for r in range(ranks)]
    # A failed rank leaves the others 20 s to write their own results before they are killed.
    run = launch_ranks(commands, log_dir=out_dir, deadline_s=timeout_s, env=env, grace_s=20.0)
    results = []
    for r in range(ranks):
        path = out_dir / f"rank{r}.json"
        res = json.loads(path.read_text()) if path.exists() else {"rank": r, "runs": [], "errors": []}
        res["exit_code"] = run.returncodes[r]
        if run.returncodes[r] != 0:
            res["log_tail"] = run.logs[r][-3000:]
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, table, plot
# ---------------------------------------------------------------------------------------------------------------
def aggregate(per_ranks: dict[int, list[dict]], args, copy_gbps: float) -> list[dict]:
    rows = []
    for ranks, workers in sorted(per_ranks.items()):
        overhead = {
            (w["rank"], key): statistics.median(w[key])
            for w in workers
            for key in ("stamp_overhead_ns", "tied_overhead_ns")
            if w.get(key)
        }
        keys = []
        for w in workers:
            for run in w["runs"]:
                if (run["method"], run["tokens"]) not in keys:
                    keys.append((run["method"], run["tokens"]))
        for method, tokens in keys:
            row = {"ranks": ranks, "tokens": tokens, "method": method}
            runs = [
                (w["rank"], run)
                for w in workers
                for run in w["runs"]
                if (run["method"], run["tokens"]) == (method, tokens)
            ]
            errors = [run["error"] for _, run in runs if "error" in run]
            if errors:
                row["error"] = errors[0]
            if method in LOOP_METHODS:
                row["pair_us"] = stats_us([s for _, run in runs for s in run.get("pair_ns", [])], 0.0)
                row["loop_iterations"] = next((run["iterations"] for _, run in runs if "iterations" in run), None)
                row["loop_unrolled"] = any(run.get("unrolled") for _, run in runs)
                rows.append(row)
                continue
            for op in ("dispatch", "combine"):
                samples = []
                for r, run in runs:
                    cost = overhead.get((r, run.get("overhead", "stamp_overhead_ns")), 0.0)
                    samples += [s - cost for s in run.get(f"{op}_ns", [])]
                st = stats_us(samples, 0.0)
                b = op_bytes(op, ranks=ranks, tokens=tokens, hidden=args.hidden, topk=args.topk)
                floor_us = ranks * b["must_move"] / (copy_gbps * 1e9) * 1e6 if copy_gbps else None
                row[op] = {**st, "logical_bytes": b["logical"], "must_move_bytes_per_rank": b["must_move"]}
                row[op]["floor_us"] = floor_us
                if st:
                    row[op]["logical_gbps"] = b["logical"] / (st["median_us"] * 1e-6) / 1e9 if st["median_us"] else None
                    row[op]["x_floor"] = st["median_us"] / floor_us if floor_us else None
            rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['card']}, {meta['date'][:10]}, jax {meta.get('jax', '?')}; H={meta['hidden']}, K={meta['topk']}, "
        f"E={meta['experts']}, fp8 dispatch (float scales), bf16 combine; device copy {meta['copy_gbps']:.0f} GB/s "
        f"(read + write); timing overhead subtracted: {meta['stamp_overhead_us']:.2f} us (cuda), "
        f"{meta.get('tied_overhead_us', 0.0):.2f} us (XLA-only baselines); {meta['label'] or ''}",
        "",
        "| ranks | T | method | dispatch us (p90) | combine us (p90) | dispatch GB/s | combine GB/s "
        "| floor us (d / c) | x floor (d / c) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    loop_rows = [r for r in rows if r["method"] in LOOP_METHODS]
    rows = [r for r in rows if r["method"] not in LOOP_METHODS]
    for r in rows:
        if "error" in r and not r["dispatch"].get("median_us"):
            lines.append(f"| {r['ranks']} | {r['tokens']} | {r['method']} | not run: {r['error'][:80]} | | | | | |")
            continue
        d, c = r["dispatch"], r["combine"]

        def f(x, fmt="{:.1f}"):
            return "-" if x is None else fmt.format(x)

        lines.append(
            f"| {r['ranks']} | {r['tokens']} | {r['method']} | {f(d.get('median_us'))} ({f(d.get('p90_us'))}) "
            f"| {f(c.get('median_us'))} ({f(c.get('p90_us'))}) | {f(d.get('logical_gbps'), '{:.0f}')} "
            f"| {f(c.get('logical_gbps'), '{:.0f}')} "
            f"| {f(d.get('floor_us'), '{:.2f}')} / {f(c.get('floor_us'), '{:.2f}')} "
            f"| {f(d.get('x_floor'), '{:.3g}')} / {f(c.get('x_floor'), '{:.3g}')} |"
        )
    if loop_rows:
        lines += ["", *loop_table(loop_rows)]
    return "\n".join(lines) + "\n"


def loop_table(rows: list[dict]) -> list[str]:
    """The loop mode: us per dependent bf16 pair (median, p90) for jax_ll_ep and the JAX-native packed pair."""
    by_t: dict[int, dict] = {}
    for r in rows:
        by_t.setdefault(r["tokens"], {})[r["method"]] = r

    def cell(r):
        if r is None:
            return "-"
        p = r.get("pair_us") or {}
        if not p.get("median_us"):
            return f"not run: {r.get('error', '?')[:60]}"
        return f"{p['median_us']:.1f} ({p['p90_us']:.1f})"

    iters = next((r.get("loop_iterations") for r in rows if r.get("loop_iterations")), "?")
    lines = [
        f"Loop mode, 1 rank: us per bf16 dispatch+combine pair inside a jitted lax.fori_loop of {iters} dependent "
        "pairs (host wall clock; median (p90))",
        "",
        "| T | jax_ll_ep pair us | JAX-native packed pair us | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for t, ms in sorted(by_t.items()):
        a, b = ms.get("cuda_loop"), ms.get("jax_packed_loop")
        ma = ((a or {}).get("pair_us") or {}).get("median_us")
        mb = ((b or {}).get("pair_us") or {}).get("median_us")
        ratio = f"{ma / mb:.2f}" if ma and mb else "-"
        lines.append(f"| {t} | {cell(a)} | {cell(b)} | {ratio} |")
    return lines


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, op in zip(axes, ("dispatch", "combine"), strict=True):
        series: dict[tuple, list] = {}
        floors: dict[int, list] = {}
        for r in rows:
            if r["method"] in LOOP_METHODS or r[op].get("median_us") is None:
                continue
            series.setdefault((r["method"], r["ranks"]), []).append((r["tokens"], r[op]["median_us"]))
            if r["method"] == "cuda" and r[op].get("floor_us"):
                floors.setdefault(r["ranks"], []).append((r["tokens"], r[op]["floor_us"]))
        for (method, ranks), pts in sorted(series.items()):
            pts.sort()
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{method}, {ranks} rank{'s' if ranks > 1 else ''}")
        for ranks, pts in sorted(floors.items()):
            pts.sort()
            style = {"linestyle": "--", "color": "gray", "alpha": min(0.3 + 0.08 * ranks, 1.0)}
            ax.plot(*zip(*pts, strict=True), **style, label=f"floor, {ranks} rank{'s' if ranks > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank T")
        ax.set_title(f"{op} ({'fp8' if op == 'dispatch' else 'bf16'})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median latency (us, device timestamps)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"jax_ll_ep on {meta['card']}: H={meta['hidden']}, K={meta['topk']}, E={meta['experts']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ---------------------------------------------------------------------------------------------------------------
def report(per_ranks: dict[int, list[dict]], config: dict, args, *, final: bool) -> None:
    """Aggregates what has been measured so far; writes the JSON, the table and (at the end) the plot."""
    first = next((w for ws in per_ranks.values() for w in ws if w.get("device")), {})
    copy = next((w["copy"] for ws in per_ranks.values() for w in ws if "copy" in w), None)
    overheads = [statistics.median(w["stamp_overhead_ns"]) for w in per_ranks.get(1, []) if w.get("stamp_overhead_ns")]
    tied = [statistics.median(w["tied_overhead_ns"]) for w in per_ranks.get(1, []) if w.get("tied_overhead_ns")]
    meta = {
        "card": first.get("device", "unknown GPU"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "label": args.label,
        "jax": first.get("jax"),
        "hidden": args.hidden,
        "topk": args.topk,
        "experts": args.experts,
        "copy_gbps": copy["gbps"] if copy else 0.0,
        "stamp_overhead_us": (statistics.median(overheads) / 1e3) if overheads else 0.0,
        "tied_overhead_us": (statistics.median(tied) / 1e3) if tied else 0.0,
        "multiprocessors_reported": {r: ws[0].get("multiprocessors_reported") for r, ws in per_ranks.items() if ws},
        "config": config,
        "method": "device timestamps (%globaltimer) around each call of a Python-unrolled, graph-captured sequence "
        "in one jit; median/p90 over calls past warm-up and executions past the first, inputs rotated among "
        f"{args.sets} sets; stamp-to-stamp overhead of the same process subtracted",
    }
    rows = aggregate(per_ranks, args, meta["copy_gbps"])
    table = markdown(rows, meta)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{card_slug(meta['card'])}-{meta['date'][:10]}" + (f"-{args.label}" if args.label else "")
    result = {"meta": meta, "rows": rows, "workers": {str(r): ws for r, ws in per_ranks.items()}}
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    print("\n" + table, flush=True)
    if final:
        plotted = plot(rows, meta, out_dir / f"{stem}.png")
        print(f"wrote {out_dir / stem}.json, .md{', .png' if plotted else ''}", flush=True)


def gpu_suite(args) -> int:
    config = {
        "seed": args.seed,
        "hidden": args.hidden,
        "topk": args.topk,
        "experts": args.experts,
        "tokens": args.tokens,
        "methods": args.methods,
        "baseline_tokens": args.baseline_tokens,
        "sets": args.sets,
        "calls": args.calls,
        "executions": args.executions,
        "warmup_calls": args.warmup_calls,
        "copy_bandwidth": True,
        "timeout_s": args.timeout_s,
        "sequence": args.sequence,
        "loop_tokens": args.loop_tokens,
        "loop_iterations": args.loop_iterations,
        "loop_repeats": args.loop_repeats,
        "loop_unroll": args.loop_unroll,
        "package_root": str(Path(args.package_root).resolve()) if args.package_root else "",
    }
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="jax_ll_ep_bench_"))
    per_ranks: dict[int, list[dict]] = {}
    mps = None
    try:
        for ranks in sorted(args.ranks):
            if ranks > 1 and mps is None and not args.no_mps:
                mps = Mps()
            extra = mps.env if (mps is not None and ranks > 1) else {}
            t0 = time.time()
            per_ranks[ranks] = run_workers(ranks, config, work / f"ranks{ranks}", extra, args.timeout)
            bad = [w for w in per_ranks[ranks] if w.get("exit_code")]
            failed = f", {len(bad)} rank(s) failed" if bad else ""
            print(f"ranks={ranks}: {time.time() - t0:.0f} s{failed}", flush=True)
            for w in bad[:1]:
                print(w.get("log_tail", ""), flush=True)
            report(per_ranks, config, args, final=ranks == max(args.ranks))  # partial results survive a kill
    finally:
        if mps is not None:
            mps.stop()
    if not args.keep_logs and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"worker logs in {work}", flush=True)
    failed = any(w.get("exit_code") for ws in per_ranks.values() for w in ws)
    return 1 if failed else 0


def merge(args) -> int:
    """Re-aggregates the workers of several result files (e.g. 1 rank and 2/4/8 ranks measured in separate device
    calls of the same session and card) into one result: floors use the copy bandwidth measured in them."""
    per_ranks: dict[int, list[dict]] = {}
    config: dict = {}
    for path in args.merge:
        result = json.loads(Path(path).read_text())
        cards = {result["meta"]["card"]}
        for ranks, workers in result["workers"].items():
            per_ranks[int(ranks)] = workers
        config = config or dict(result["meta"]["config"])
        config.setdefault("merged_from", []).append(Path(path).name)
    if len(cards) != 1:
        raise SystemExit("refusing to merge results from different cards")
    report(per_ranks, config, args, final=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--baseline-tokens", type=int, nargs="+", default=[1, 128], help="T values of the baselines (1 rank only)"
    )
    parser.add_argument(
        "--loop-tokens", type=int, nargs="+", default=[1, 16, 128, 256], help="T values of the loop mode (1 rank only)"
    )
    parser.add_argument("--loop-iterations", type=int, default=200, help="dependent pairs per loop (loop mode)")
    parser.add_argument("--loop-repeats", type=int, default=5, help="timed loops per row (loop mode)")
    parser.add_argument(
        "--loop-unroll", action="store_true", help="loop mode: fori_loop(..., unroll=True), one straight program"
    )
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--calls", type=int, default=12, help="dispatch+combine pairs per measured program")
    parser.add_argument("--sets", type=int, default=4, help="input sets rotated through")
    parser.add_argument("--executions", type=int, default=3, help="timed executions (after one warm-up)")
    parser.add_argument("--warmup-calls", type=int, default=3, help="calls of each execution not counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="suffix of the result files (e.g. a kernel version)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds for one rank count's processes")
    parser.add_argument("--no-mps", action="store_true", help="do not start the MPS daemon (it is already running)")
    parser.add_argument(
        "--package-root",
        default="",
        help="import jax_ll_ep from DIR/jax_ll_ep (e.g. a copy of the package holding the native modules of another "
        "commit): two builds timed on one machine, one run each",
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--work-dir", default="", help="folder for the workers' logs and raw results (kept)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="the buffers' timeout_s (bounded waits)")
    parser.add_argument(
        "--sequence",
        choices=("pair", "dispatch", "combine"),
        default="pair",
        help="what each measured program issues: dispatch+combine pairs (the default; the reported numbers), or one "
        "op back to back (diagnostics: what the other op's kernel costs the next one)",
    )
    argv = sys.argv[1:]
    if argv[:2] == ["--suite", "cpu"] or argv[:1] == ["--suite=cpu"]:
        # The cpu and xla backends on 8 simulated CPU devices: benchmarks/bench_cpu.py (every other option is its).
        rest = argv[2:] if argv[:2] == ["--suite", "cpu"] else argv[1:]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        return subprocess.call([sys.executable, str(HERE / "bench_cpu.py"), *rest], cwd=ROOT, env=env)
    parser.add_argument(
        "--merge", nargs="+", default=[], help="result JSON files to re-aggregate into one result (nothing is run)"
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.suite == "cpu":
        parser.error("--suite cpu must come first; its other options are those of benchmarks/bench_cpu.py")
    return gpu_suite(args)


if __name__ == "__main__":
    sys.exit(main())
