"""The decode MoE layer end to end on one GPU: router -> dispatch -> SwiGLU experts -> combine, DeepSeek-V3 shapes.

    python benchmarks/layer.py [--ranks 1 8] [--variants bf16 fp8] [--out-dir benchmarks/results]

Standard point: T=128 tokens per rank, H=7168, F=2048, top-8 of E=256 experts. One rank holds all 256 experts
(the whole model's layer on one GPU); 8 ranks are 8 processes sharing the GPU under MPS, 32 experts each (each
process gets 100/8 % of the SMs). Variants: ``bf16`` (bf16 dispatch, bf16 weights) and ``fp8`` (fp8 dispatch with
float scales, fp8 weights with 128x128 block scales in the [E, N, K] layout, as DeepSeek-V3 ships them).

Methods, per rank, same inputs and weights:
  jax_ll_ep    dispatch, jax_ll_ep.swiglu_mlp (the masked grouped matmul), combine
  einsum       dispatch, three dense einsums over the padded [E_l, R*T, H] layout, combine (what the README showed)
  ragged       (1 rank) the MaxText-style layer: sort by expert, ragged_all_to_all, jax.lax.ragged_dot, back
  exchange     dispatch and combine alone (the experts replaced by a fixed array): the exchange's share of the floor
The floor of the layer is the weights of the experts that get rows (as counted in the ``exchange`` run, whose
routing no expert kernel can change), read once at the device-copy bandwidth measured in the same run (for 8 ranks:
all ranks' weights, since they share one GPU's memory), plus the ``exchange`` time.

Checks (a time is only compared with the floor when they pass): every timed program also returns, per layer, the
local experts that got rows and the tokens whose output is finite (a NaN output routes all tokens of the next layers
to the same few experts, which read a few experts' weights: a time below the floor, not a fast layer); for
``jax_ll_ep``, one untimed call compares the first and the last local expert that get rows with
``implementation="reference"``.

Timing: one jitted program runs ``--layers`` layers one after the other (each layer's input is a fresh random input
set plus a small share of the previous layer's normalized output, so the layers run in sequence as in a model's step
while the routing stays that of random tokens: 248 to 254 of the 256 experts get tokens, depending on the set), and
``--programs`` such programs are queued back to back before the host waits, so neither the host's per-call work nor
clock ramps show; time per layer = wall time / (programs x layers), the median over ``--reps`` queues. Every rank
runs the same sequence (the exchange keeps them in step); the table reports the slowest rank's median.

Writes OUT_DIR/<card>-<date>-layer.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

AXIS = "ep"
METHODS = ("jax_ll_ep", "einsum", "ragged", "exchange")
CHECK_TOL = 2e-2  # relative error of an expert's valid rows against the reference (bf16 outputs on both sides)


# ---------------------------------------------------------------------------------------------------------------
# Worker: one rank
# ---------------------------------------------------------------------------------------------------------------
def worker(rank: int, ranks: int, port: int, cfg: dict, out_path: Path) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax  # noqa: PLC0415

    if ranks > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=ranks, process_id=rank, local_device_ids=[0]
        )
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    import jax_ll_ep as ep  # noqa: PLC0415
    from jax_ll_ep.experts import weights_nbytes  # noqa: PLC0415

    mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: d.process_index)), (AXIS,))
    H, F, E, K, T = (cfg[k] for k in ("hidden", "ffn", "experts", "topk", "tokens"))  # noqa: N806
    e_local, rows = E // ranks, ranks * T
    sets, programs, reps = cfg["sets"], cfg["programs"], cfg["reps"]
    result = {"rank": rank, "ranks": ranks, "device": jax.devices()[0].device_kind, "runs": []}

    def on_ranks(fn, n_out):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(), out_specs=(P(AXIS),) * n_out))

    def random_bf16(key, shape):
        # Random sign and mantissa at a fixed small exponent: random data without a float32 copy of GBs of weights.
        bits = jax.random.bits(key, shape, jnp.uint16)
        return jax.lax.bitcast_convert_type((bits & 0x807F) | 0x3C00, jnp.bfloat16)  # |v| in [2^-7, 2^-6)

    def random_fp8(key, shape):
        bits = jax.random.bits(key, shape, jnp.uint8)
        return jax.lax.bitcast_convert_type((bits & 0xB7) | 0x20, jnp.float8_e4m3fn)  # finite, never zero

    def gen_weights():
        key = jax.random.fold_in(jax.random.key(1), jax.lax.axis_index(AXIS))
        kg, ku, kd = jax.random.split(key, 3)
        return (
            random_bf16(kg, (e_local, H, F)),
            random_bf16(ku, (e_local, H, F)),
            random_bf16(kd, (e_local, F, H)),
        )

    def gen_weights_fp8():  # [E, N, K] data, [E, N/128, K/128] scales
        key = jax.random.fold_in(jax.random.key(2), jax.lax.axis_index(AXIS))
        ks = jax.random.split(key, 6)
        out = []
        for i, (n, k) in enumerate(((F, H), (F, H), (H, F))):
            data = random_fp8(ks[2 * i], (e_local, n, k))
            scale = jax.random.uniform(ks[2 * i + 1], (e_local, n // 128, k // 128), jnp.float32, 1e-3, 2e-3)
            out += [data, scale]
        return tuple(out)

    def gen_inputs():
        key = jax.random.fold_in(jax.random.key(3), jax.lax.axis_index(AXIS))
        xs = [random_bf16(jax.random.fold_in(key, s), (T, H)) * 64 for s in range(sets)]
        return tuple(xs)

    def gen_fixed():
        key = jax.random.fold_in(jax.random.key(4), jax.lax.axis_index(AXIS))
        router = random_bf16(jax.random.key(5), (H, E)).astype(jnp.float32) * 64  # the same on every rank
        return random_bf16(key, (e_local, rows, H)), router

    weights = on_ranks(gen_weights, 3)()
    w_bytes_bf16 = weights_nbytes(*weights) // ranks  # the global arrays hold every rank's share
    xs = on_ranks(gen_inputs, sets)()
    y_fixed, router_w = on_ranks(gen_fixed, 2)()
    variants = cfg["variants"]
    weights8 = None
    if "fp8" in variants:
        w8 = on_ranks(gen_weights_fp8, 6)()
        weights8 = tuple(ep.Fp8Array(w8[2 * i], w8[2 * i + 1]) for i in range(3))
        w_bytes_fp8 = weights_nbytes(*weights8) // ranks

    def route(x, router):
        logits = x.astype(jnp.float32) @ router
        top, idx = jax.lax.top_k(logits, K)
        return idx.astype(jnp.int32), jax.nn.softmax(top, axis=-1)

    def silu_mul(g, u):
        return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(jnp.bfloat16)

    def einsum_experts(recv_x, wg, wu, wd):  # bf16 [E, K, N] weights: an einsum cannot consume fp8 ones
        if isinstance(recv_x, ep.Fp8Array):  # dequantize (what a user of einsum must do)
            data, scale = recv_x
            recv_x = (data.astype(jnp.float32) * jnp.repeat(scale, 128, axis=-1)).astype(jnp.bfloat16)
        h = silu_mul(jnp.einsum("emh,ehf->emf", recv_x, wg), jnp.einsum("emh,ehf->emf", recv_x, wu))
        return jnp.einsum("emf,efh->emh", h, wd).astype(jnp.bfloat16)

    def ragged_layer(x, router, wg, wu, wd):  # returns the output and the rows per expert
        idx, w = route(x, router)
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        rows_in = x[order // K]
        m = rows_in.shape[0]
        zero, size = jnp.zeros((1,), jnp.int32), jnp.full((1,), m, jnp.int32)

        def a2a(v):
            return jax.lax.ragged_all_to_all(v, jnp.zeros_like(v), zero, size, zero, size, axis_name=AXIS)

        rows_in = a2a(rows_in)

        def dot(a, b):
            return jax.lax.ragged_dot(a, b, group_sizes, preferred_element_type=jnp.bfloat16)

        out = a2a(dot(silu_mul(dot(rows_in, wg), dot(rows_in, wu)), wd))
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(m, dtype=order.dtype))
        back = out[inv].reshape(T, K, H).astype(jnp.float32)
        return jnp.einsum("tk,tkh->th", w, back).astype(jnp.bfloat16), group_sizes

    def make_layers(buf, method, fp8, w_layout):
        def layer(x, router, y_fix, wg, wu, wd, *bf16_weights):  # returns the output and the rows per local expert
            if method == "ragged":
                return ragged_layer(x, router, *bf16_weights)
            idx, w = route(x, router)
            recv_x, count, handle = ep.dispatch(buf, x, idx, fp8=fp8)
            if method == "jax_ll_ep":
                y = ep.swiglu_mlp(recv_x, count, wg, wu, wd, w_layout=w_layout)
            elif method == "einsum":
                y = einsum_experts(recv_x, *bf16_weights)
            else:  # exchange alone
                y = y_fix
            return ep.combine(buf, y, idx, w, handle), count

        def layers(xs, *args):
            # Layer l reads input set l plus a small share of layer l-1's normalized output: each layer waits for
            # the previous one, as in a model, while the routing stays that of fresh random tokens (a chain of
            # normalized outputs alone drifts towards a few experts and would leave most weights unread).
            # The program also returns, per layer, the local experts that got rows and the tokens whose output is
            # finite: a NaN output routes every token of the next layers to the same few experts, which then read
            # a few experts' weights instead of all of them (a time below the floor, not a fast layer).
            x, stats = xs[0], []
            for layer_index in range(cfg["layers"]):
                out, count = layer(x, *args)
                out = out.astype(jnp.float32)
                finite = jnp.sum(jnp.all(jnp.isfinite(out), axis=-1))
                stats.append(jnp.stack([jnp.sum(count > 0), finite]).astype(jnp.int32))
                out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + 1e-6)
                x = (xs[(layer_index + 1) % len(xs)].astype(jnp.float32) + out / 64).astype(jnp.bfloat16)
            return x, jnp.stack(stats)[None]

        spec = P(AXIS)
        return jax.jit(jax.shard_map(layers, mesh=mesh, in_specs=(spec,) * 9, out_specs=(spec, spec)))

    def make_expert_check(buf, fp8, w_layout):
        """The experts of the first layer (the timed program's kernels) against ``implementation="reference"`` on
        the first and the last local expert that get rows: the relative error of each (the last expert's weights
        lie farthest into the weight arrays, where an addressing overflow shows)."""

        def check(xs, router, wg, wu, wd):
            x = xs[0]
            idx, _ = route(x, router)
            recv_x, count, _ = ep.dispatch(buf, x, idx, fp8=fp8)
            y = ep.swiglu_mlp(recv_x, count, wg, wu, wd, w_layout=w_layout)
            has_rows = count > 0
            errors = []
            for e in (jnp.argmax(has_rows), e_local - 1 - jnp.argmax(has_rows[::-1])):
                one = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=e, slice_size=1)
                want = ep.swiglu_mlp(
                    jax.tree.map(one, recv_x),
                    one(count),
                    *(jax.tree.map(one, w) for w in (wg, wu, wd)),
                    w_layout=w_layout,
                    implementation="reference",
                )[0].astype(jnp.float32)
                valid = (jnp.arange(rows) < count[e])[:, None]
                got = jnp.where(valid, one(y)[0].astype(jnp.float32), 0.0)
                err = jnp.linalg.norm(got - jnp.where(valid, want, 0.0)) / jnp.linalg.norm(jnp.where(valid, want, 0.0))
                errors.append(jnp.stack([e.astype(jnp.float32), err]))
            return jnp.stack(errors)[None]

        spec = P(AXIS)
        return jax.jit(jax.shard_map(check, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))

    def local(array):  # this process's shard of a per-rank result
        return np.asarray(array.addressable_shards[0].data)[0]

    with ep.Buffer(mesh, AXIS, num_experts=E, max_tokens_per_rank=T, hidden=H, backend=cfg["backend"]) as buf:
        for variant in variants:
            fp8 = ep.Fp8Options("float") if variant == "fp8" else None
            ws, w_layout = (weights8, "nk") if variant == "fp8" else (weights, "kn")
            for method in cfg["methods"]:
                if method == "ragged" and (ranks > 1 or variant == "fp8"):
                    continue  # XLA collectives fail with several processes on one GPU; ragged_dot has no fp8 weights
                entry = {"variant": variant, "method": method}
                try:
                    fn = make_layers(buf, method, fp8, w_layout)
                    args = (router_w, y_fixed, *ws, *weights)
                    for _ in range(2):  # compile, then warm the clocks
                        jax.block_until_ready(fn(xs, *args))
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        outs = [fn(xs, *args) for _ in range(programs)]
                        jax.block_until_ready(outs)
                        times.append((time.perf_counter() - t0) / (programs * cfg["layers"]) * 1e6)
                        stats = local(outs[-1][1])  # [layers, 2]: local experts with rows, finite tokens
                        del outs
                    buf.check()
                    entry.update(us=statistics.median(times), us_all=times)
                    entry.update(experts_with_rows=stats[:, 0].tolist(), finite_tokens=stats[:, 1].tolist())
                    bad = [i for i, f in enumerate(stats[:, 1]) if f < T]
                    problems = (
                        [f"output not finite in layers {bad} ({T - min(stats[:, 1])} of {T} tokens)"] if bad else []
                    )
                    if method == "jax_ll_ep":
                        errs = local(make_expert_check(buf, fp8, w_layout)(xs, router_w, *ws))
                        entry["expert_check"] = [{"expert": int(e), "rel_err": float(err)} for e, err in errs]
                        problems += [
                            f"expert {int(e)}: relative error {err:.2g} against the reference"
                            for e, err in errs
                            if not err <= CHECK_TOL  # NaN fails too
                        ]
                    if problems:
                        entry["invalid"] = "; ".join(problems)
                    print(
                        f"rank {rank}: {variant} {method}: {entry['us']:.1f} us; experts with rows per layer "
                        f"{entry['experts_with_rows']}{'; INVALID: ' + entry['invalid'] if problems else ''}",
                        flush=True,
                    )
                except Exception as err:  # noqa: BLE001 - a failing method is a result; the others still run
                    entry["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
                    print(f"rank {rank}: {variant} {method}: FAILED {entry['error'][:300]}", flush=True)
                result["runs"].append(entry)
                out_path.write_text(json.dumps(result))
    result["weights_bytes"] = {"bf16": w_bytes_bf16, **({"fp8": w_bytes_fp8} if weights8 is not None else {})}
    if rank == 0:
        result["copy_GBps"] = copy_bandwidth(jax, jnp) / 1e9
    out_path.write_text(json.dumps(result))


def copy_bandwidth(jax, jnp) -> float:
    """Device copy bandwidth in bytes/s (read + write counted): copies of 1 GiB of float32 queued back to back (64 MiB
    on a CPU dry run, whose host memory would not hold the 10 queued copies)."""
    size = 16 if jax.devices()[0].platform == "cpu" else 256
    arrays = [jnp.full((size * 1024 * 1024,), i, jnp.float32) for i in range(2)]
    f = jax.jit(lambda xs: [a + 1 for a in xs])
    for _ in range(3):
        jax.block_until_ready(f(arrays))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        outs = [f(arrays) for _ in range(10)]
        jax.block_until_ready(outs)
        times.append(time.perf_counter() - t0)
        del outs
    return 2 * sum(a.nbytes for a in arrays) * 10 / statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def run_ranks(ranks: int, cfg: dict, work: Path, timeout_s: float) -> list[dict]:
    from run import Mps  # noqa: PLC0415 - benchmarks/run.py, beside this file

    from jax_ll_ep.testing import free_port, launch_ranks  # noqa: PLC0415

    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg))
    mps = Mps() if ranks > 1 else None
    env = {**os.environ, **(mps.env if mps else {})}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if ranks > 1:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(100 // ranks, 1))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    commands = [[*cmd, str(r), str(ranks), str(port), str(work)] for r in range(ranks)]
    try:
        run = launch_ranks(commands, log_dir=work, deadline_s=timeout_s, env=env, grace_s=20.0)
    finally:
        if mps:
            mps.stop()
    results = []
    for r in range(ranks):
        path = work / f"rank{r}.json"
        res = json.loads(path.read_text()) if path.exists() else {"rank": r, "runs": []}
        res["exit_code"] = run.returncodes[r]
        if run.returncodes[r] != 0:
            res["log_tail"] = run.logs[r][-3000:]
            print(f"ranks={ranks} rank {r} exit {run.returncodes[r]}:\n{run.logs[r][-2000:]}", flush=True)
        results.append(res)
    return results


def summarize(all_results: dict[int, list[dict]], experts: int) -> tuple[list[dict], dict]:
    rows = []
    bw = next((r[0].get("copy_GBps") for r in all_results.values() if r and r[0].get("copy_GBps")), None)
    for ranks, results in sorted(all_results.items()):
        per_key: dict[tuple, list[float]] = {}
        errors: dict[tuple, str] = {}
        invalid: dict[tuple, str] = {}
        active: dict[tuple, float] = {}  # experts with rows, summed over ranks, mean over layers
        for res in results:
            for run in res.get("runs", []):
                key = (run["variant"], run["method"])
                if "us" in run:
                    per_key.setdefault(key, []).append(run["us"])
                    with_rows = run.get("experts_with_rows") or [0]
                    active[key] = active.get(key, 0.0) + sum(with_rows) / len(with_rows)
                else:
                    errors[key] = run.get("error", "")
                if run.get("invalid"):
                    invalid.setdefault(key, f"rank {res['rank']}: {run['invalid']}")
        w_bytes = results[0].get("weights_bytes", {}) if results else {}
        for variant in ("bf16", "fp8"):
            exch = per_key.get((variant, "exchange"))
            # The weights the layers must read: those of the experts that get rows. The exchange alone has the
            # routing of the same random inputs, and no expert kernel that could change it.
            share = active.get((variant, "exchange"), experts) / experts  # of all E experts
            weights_us = w_bytes.get(variant, 0) * ranks * share / (bw * 1e9) * 1e6 if bw else None
            floor = max(exch) + weights_us if exch and weights_us else None
            for method in METHODS:
                key = (variant, method)
                if key not in per_key and key not in errors:
                    continue
                row = {"ranks": ranks, "variant": variant, "method": method}
                if key in per_key:
                    row["us"] = round(max(per_key[key]), 1)  # the slowest rank
                    row["experts_with_rows"] = round(active[key] / ranks, 1)  # per rank, mean over layers
                    if key in invalid:
                        row["invalid"] = invalid[key][:300]
                    elif floor:
                        row["x_floor"] = round(row["us"] / floor, 2)
                else:
                    row["error"] = errors[key][:300]
                row["floor_us"] = round(floor, 1) if floor else None
                row["weights_us"] = round(weights_us, 1) if weights_us else None
                rows.append(row)
    return rows, {"copy_GBps": bw}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Decode MoE layer, {meta['device']}, {meta['date']}: T={meta['tokens']} tokens per rank, "
        f"H={meta['hidden']}, F={meta['ffn']}, top-{meta['topk']} of E={meta['experts']}; device copy "
        f"{meta['copy_GBps']:.0f} GB/s. Floor = the weights of the experts that get rows, read once (all ranks' "
        "weights: they share one GPU) + the exchange alone. Experts with rows: per rank, mean over the layers. "
        "Invalid: a layer output was not finite or the experts disagreed with the reference (the time is shown, "
        "not compared).",
        "",
        "| ranks | variant | method | layer µs | × floor | experts with rows | floor µs (weights + exchange) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        us = f"{r['us']:.1f}" if "us" in r else f"failed: {r.get('error', '')[:60]}"
        xf = f"{r['x_floor']:.2f}" if r.get("x_floor") else (f"invalid: {r['invalid'][:100]}" if "invalid" in r else "")
        fl = f"{r['floor_us']:.1f} ({r['weights_us']:.1f} + exch.)" if r.get("floor_us") else ""
        active = f"{r['experts_with_rows']:.1f}" if "experts_with_rows" in r else ""
        lines.append(f"| {r['ranks']} | {r['variant']} | {r['method']} | {us} | {xf} | {active} | {fl} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return
    groups = sorted({(r["ranks"], r["variant"]) for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        vals = [
            next((r.get("us", 0) for r in rows if (r["ranks"], r["variant"], r["method"]) == (*g, method)), 0)
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], [v / 1e3 for v in vals], width, label=method)
    floors = [
        next((r["floor_us"] for r in rows if (r["ranks"], r["variant"]) == g and r.get("floor_us")), 0) for g in groups
    ]
    ax.scatter(
        [j + 0.4 - width / 2 for j in range(len(groups))],
        [f / 1e3 for f in floors],
        marker="_",
        s=900,
        color="black",
        label="floor",
        zorder=3,
    )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{r} rank(s), {v}" for r, v in groups])
    ax.set_ylabel("layer time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Decode MoE layer, DeepSeek-V3 shapes, {meta['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, ranks, port, work = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
        cfg = json.loads((work / "config.json").read_text())
        worker(rank, ranks, port, cfg, work / f"rank{rank}.json")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8, help="layers one after the other in one program")
    parser.add_argument("--programs", type=int, default=5, help="programs queued before the host waits")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds for one rank count's processes")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    keys = (
        "variants",
        "methods",
        "backend",
        "sets",
        "layers",
        "programs",
        "reps",
        "hidden",
        "ffn",
        "experts",
        "topk",
        "tokens",
    )
    cfg = {k: getattr(args, k) for k in keys}
    work_root = Path(args.work_dir or (ROOT / "build" / "layer-bench"))
    all_results = {r: run_ranks(r, cfg, work_root / f"ranks{r}", args.timeout) for r in args.ranks}
    rows, meta = summarize(all_results, cfg["experts"])
    device = next((res[0].get("device") for res in all_results.values() if res and res[0].get("device")), "unknown")
    meta.update(device=device, date=datetime.date.today().isoformat(), **{k: cfg[k] for k in keys[7:]})
    meta["copy_GBps"] = meta["copy_GBps"] or 0.0
    stem = f"{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{meta['date']}-layer{args.label}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "config": cfg, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    (out_dir / f"{stem}.md").write_text(md)
    plot(rows, out_dir / f"{stem}.png", meta)
    print(md)


if __name__ == "__main__":
    main()
