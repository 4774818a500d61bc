"""Expert matmuls on the dispatch layout, measured on one GPU: jax_ll_ep's masked grouped matmul against the ways a
JAX user can compute them today, at one rank's expert-parallel share of real decode layers.

    python benchmarks/grouped_matmul.py [--suite candidates|rows|models|all] [--out FILE.json]

Shapes (one rank's share at EP8; T=128 tokens per rank, so M = R*T = 1,024 rows of capacity per local expert):
  deepseek-v3  E_l=32, H=7168, F=2048, top-8 of 256 experts  (counts: a random top-8 routing of 8 x 128 tokens)
  qwen3-30b    E_l=16, H=2048, F=768,  top-8 of 128 experts
  mixtral      E_l=1,  H=4096, F=14336, top-2 of 8 experts

Methods (each the SwiGLU expert MLP: gate and up projections, silu(gate) * up, down projection):
  einsum        three dense einsums over the padded [E_l, M, H] layout (what a JAX user writes today)
  ragged_valid  jax.lax.ragged_dot over the valid rows packed by expert (M = the valid rows; the packing not timed)
  ragged_max    the same with M = the most rows a rank can receive (R*T*min(K, E_l)), as a static shape must be
  tokamax       tokamax.ragged_dot over the packed valid rows (when tokamax imports)
  jax_ll_ep     jax_ll_ep.swiglu_mlp: the masked grouped matmul, SwiGLU in the first kernel's epilogue

Timing: each measured program runs the method ``--unroll`` times on distinct count arrays (so XLA cannot merge the
calls) inside one jit; the median over ``--reps`` wall-clock runs of the program (after a warm-up), divided by the
unroll, is the time per MLP. Weights (GBs) are far larger than L2, so every call reads them from memory. The floor is
the bytes of the expert weights (read once) at the device-copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import jax_ll_ep as ep  # noqa: E402
from jax_ll_ep.experts import GroupedMatmulConfig, weights_nbytes  # noqa: E402
from jax_ll_ep.fp8 import quantize_fp8  # noqa: E402

MODELS = {  # name: (local experts, hidden, ffn width, top-k, total experts)
    "deepseek-v3": (32, 7168, 2048, 8, 256),
    "qwen3-30b": (16, 2048, 768, 8, 128),
    "mixtral": (1, 4096, 14336, 2, 8),
}
RANKS, TOKENS = 8, 128


def routed_counts(rng, num_local, topk, num_experts, ranks=RANKS, tokens=TOKENS) -> np.ndarray:
    """Rows each of rank 0's local experts receives from a uniform random top-k routing of every rank's tokens."""
    choice = np.argsort(rng.random((ranks * tokens, num_experts)), axis=1)[:, :topk]
    return np.bincount(choice.ravel(), minlength=num_experts)[:num_local].astype(np.int32)


def spread_counts(rng, total, num_local, capacity) -> np.ndarray:
    """``total`` valid rows spread at random over the experts, none over ``capacity``."""
    counts = np.zeros(num_local, np.int64)
    left = total
    while left:
        room = np.flatnonzero(counts < capacity)
        add = np.bincount(rng.choice(room, size=left), minlength=num_local)
        counts = np.minimum(counts + add, capacity)
        left = total - int(counts.sum())
    return counts.astype(np.int32)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write counted): copies of 1 GiB of float32, queued back to back."""
    arrays = [jnp.full((256 * 1024 * 1024,), i, jnp.float32) for i in range(2)]
    seconds = timed(lambda a: a + 1, [(a,) for a in arrays], reps=5, programs=10)
    return 2 * arrays[0].nbytes / seconds


def timed(fn, args_list, *, reps: int, programs: int = 10) -> float:
    """Seconds per call. One jit calls ``fn`` once per entry of args_list; ``programs`` such jits are queued back to
    back (no host sync between them, so the GPU never idles and its clocks stay up) and the whole queue is timed;
    the median over ``reps`` queues, divided by the calls in a queue."""
    prog = jax.jit(lambda all_args: [fn(*a) for a in all_args])
    for _ in range(3):  # compile, then warm the clocks
        jax.block_until_ready(prog(args_list))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [prog(args_list) for _ in range(programs)]
        jax.block_until_ready(outs)
        times.append(time.perf_counter() - t0)
        del outs
    return statistics.median(times) / (programs * len(args_list))


def silu_mul(g, u):
    g = g.astype(jnp.float32)
    return (jax.nn.silu(g) * u.astype(jnp.float32)).astype(jnp.bfloat16)


def einsum_mlp(x, counts, wg, wu, wd):
    h = silu_mul(jnp.einsum("emh,ehf->emf", x, wg), jnp.einsum("emh,ehf->emf", x, wu))
    y = jnp.einsum("emf,efh->emh", h, wd)
    rows = jnp.arange(y.shape[1])[None, :, None]
    return jnp.where(rows < counts[:, None, None], y, 0).astype(jnp.bfloat16)


def ragged_mlp(dot):
    def mlp(xp, counts, wg, wu, wd):
        h = silu_mul(dot(xp, wg, counts), dot(xp, wu, counts))
        return dot(h, wd, counts).astype(jnp.bfloat16)

    return mlp


def lax_ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.bfloat16)


def tokamax_ragged():
    try:
        import tokamax  # noqa: PLC0415
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        print(f"tokamax not available: {type(err).__name__}: {err}")
        return None

    def dot(lhs, rhs, group_sizes):
        return tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.bfloat16)

    return dot


def ours_mlp(config_up=None, config_down=None, w_layout="kn"):
    def mlp(x, counts, wg, wu, wd):
        h = ep.swiglu(x, wg, wu, counts, config=config_up, w_layout=w_layout)
        return ep.grouped_matmul(h, wd, counts, config=config_down, w_layout=w_layout)

    return mlp


def fp8_weights(w: jax.Array) -> ep.Fp8Array:
    """128x128-block fp8 quantization of [E, K, N] weights (the DeepSeek-V3 checkpoint format)."""
    e, k, n = w.shape
    blocks = w.astype(jnp.float32).reshape(e, k // 128, 128, n // 128, 128)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(2, 4)), 1e-4) / 448.0
    data = (blocks / scale[:, :, None, :, None]).reshape(e, k, n).astype(jnp.float8_e4m3fn)
    return ep.Fp8Array(data, scale)


def fp8_rows(x: jax.Array) -> ep.Fp8Array:
    e, m, k = x.shape
    data, scale = quantize_fp8(x.reshape(e * m, k), "float")
    return ep.Fp8Array(data.reshape(e, m, k), scale.reshape(e, m, k // 128))


class Case:
    """One model's share: weights, a capacity-sized input, and count arrays for ``unroll`` calls."""

    def __init__(self, model: str, rng, *, unroll: int, total_rows: int | None = None):
        self.model = model
        e, h, f, k, ne = MODELS[model]
        self.m = RANKS * TOKENS
        key = jax.random.key(int(rng.integers(1 << 31)))
        kx, kg, ku, kd = jax.random.split(key, 4)
        self.x = jax.random.normal(kx, (e, self.m, h), jnp.bfloat16)
        self.wg = (jax.random.normal(kg, (e, h, f), jnp.float32) * 0.02).astype(jnp.bfloat16)
        self.wu = (jax.random.normal(ku, (e, h, f), jnp.float32) * 0.02).astype(jnp.bfloat16)
        self.wd = (jax.random.normal(kd, (e, f, h), jnp.float32) * 0.02).astype(jnp.bfloat16)
        if total_rows is None:
            self.counts = [routed_counts(rng, e, k, ne) for _ in range(unroll)]
        else:
            self.counts = [spread_counts(rng, total_rows, e, self.m) for _ in range(unroll)]
        self.max_rows = RANKS * TOKENS * min(k, e)

    def valid_rows(self) -> float:
        return float(np.mean([c.sum() for c in self.counts]))

    def padded_args(self, x=None, weights=None):
        x = self.x if x is None else x
        wg, wu, wd = (self.wg, self.wu, self.wd) if weights is None else weights
        return [(x, jnp.asarray(c), wg, wu, wd) for c in self.counts]

    def packed_args(self, rows: int | None):
        """Packed valid rows [rows, H] (rows = the call's valid rows when None), one per count array."""
        out = []
        h = self.x.shape[2]
        for c in self.counts:
            n = int(c.sum()) if rows is None else rows
            n = -(-max(n, 1) // 256) * 256  # tokamax's kernels tile the rows by up to 256; rows past the groups idle
            xp = jax.random.normal(jax.random.key(n), (n, h), jnp.bfloat16)
            out.append((xp, jnp.asarray(c), self.wg, self.wu, self.wd))
        return out


def run(args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    bw = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s")
    rows: list[dict] = []

    def record(case: Case, method: str, fn, arg_list, *, weights=None, extra=None):
        w = (case.wg, case.wu, case.wd) if weights is None else weights
        floor_us = weights_nbytes(*w) / bw * 1e6
        try:
            t = timed(fn, arg_list, reps=args.reps) * 1e6
        except Exception as err:  # noqa: BLE001 - a failing candidate is a result, not the end of the run
            print(f"  {case.model:12s} {method:40s} FAILED: {type(err).__name__}: {str(err)[:300]}")
            rows.append({"model": case.model, "method": method, "error": f"{type(err).__name__}: {err}"[:2000]})
            return
        row = {
            "model": case.model,
            "method": method,
            "valid_rows": case.valid_rows(),
            "us": round(t, 1),
            "floor_us": round(floor_us, 1),
            "x_floor": round(t / floor_us, 2),
            **(extra or {}),
        }
        rows.append(row)
        print(f"  {case.model:12s} {method:40s} rows {row['valid_rows']:8.0f}  {t:9.1f} us  {t / floor_us:6.2f}x floor")

    if args.suite in ("candidates", "variants", "all"):
        case = Case("deepseek-v3", rng, unroll=args.unroll)
        if args.suite != "variants":  # the ways a JAX user computes the experts today
            record(case, "einsum", einsum_mlp, case.padded_args())
            record(case, "ragged_valid", ragged_mlp(lax_ragged), case.packed_args(None))
            record(case, "ragged_max", ragged_mlp(lax_ragged), case.packed_args(case.max_rows))
            tok = tokamax_ragged()
            if tok is not None:
                record(case, "tokamax", ragged_mlp(tok), case.packed_args(None))
        record(case, "jax_ll_ep", ours_mlp(), case.padded_args())
        for cfg in args.configs:
            record(case, f"jax_ll_ep {_label(cfg)}", ours_mlp(cfg, cfg), case.padded_args())
        # The two kernels apart (gate/up with SwiGLU, down).
        e, _, f = case.wg.shape
        h = (jax.random.normal(jax.random.key(1), (e, case.m, f), jnp.float32) * 0.1).astype(jnp.bfloat16)
        for cfg in [None, *args.up_configs]:
            up = lambda x, c, wg, wu, wd, cfg=cfg: ep.swiglu(x, wg, wu, c, config=cfg)  # noqa: E731
            name = "jax_ll_ep swiglu kernel" + (f" {_label(cfg)}" if cfg else "")
            record(case, name, up, case.padded_args(), weights=(case.wg, case.wu))
        for cfg in [None, *args.down_configs]:
            down = lambda x, c, wg, wu, wd, cfg=cfg: ep.grouped_matmul(h, wd, c, config=cfg)  # noqa: E731
            name = "jax_ll_ep down kernel" + (f" {_label(cfg)}" if cfg else "")
            record(case, name, down, case.padded_args(), weights=(case.wd,))
        # fp8: fp8 dispatch rows and 128x128-block fp8 weights (nk: the layout fp8 tensor cores read).
        w8nk = tuple(
            ep.Fp8Array(jnp.swapaxes(w.data, 1, 2), jnp.swapaxes(w.scale, 1, 2))
            for w in (fp8_weights(w) for w in (case.wg, case.wu, case.wd))
        )
        x8 = fp8_rows(case.x)
        for cfg in [None, *args.fp8_configs]:
            suffix = f" {_label(cfg)}" if cfg else ""
            mlp = ours_mlp(cfg, cfg, "nk")
            record(case, "jax_ll_ep fp8 x, fp8 w nk" + suffix, mlp, case.padded_args(x8, w8nk), weights=w8nk)
            record(case, "jax_ll_ep bf16 x, fp8 w nk" + suffix, mlp, case.padded_args(None, w8nk), weights=w8nk)
        record(case, "jax_ll_ep fp8 x, bf16 w", ours_mlp(), case.padded_args(x8))
        if args.suite != "variants":
            wnk = tuple(jnp.swapaxes(w, 1, 2) for w in (case.wg, case.wu, case.wd))
            record(case, "jax_ll_ep bf16 nk", ours_mlp(w_layout="nk"), case.padded_args(None, wnk))
        del case, w8nk, x8

    if args.suite in ("rows", "all"):
        for total in (0, 256, 1024, 4096, 32768):
            if total > MODELS["deepseek-v3"][0] * RANKS * TOKENS:
                continue
            case = Case("deepseek-v3", rng, unroll=args.unroll, total_rows=total)
            record(case, "jax_ll_ep", ours_mlp(), case.padded_args(), extra={"sweep": "rows"})
            for g in args.row_programs:
                cfg = GroupedMatmulConfig(row_programs=g)
                record(
                    case, f"jax_ll_ep row_programs={g}", ours_mlp(cfg, cfg), case.padded_args(), extra={"sweep": "rows"}
                )
            if total in (0, 32768):
                record(case, "einsum", einsum_mlp, case.padded_args(), extra={"sweep": "rows"})
            del case

    if args.suite in ("models", "all"):
        for model in ("qwen3-30b", "mixtral"):
            case = Case(model, rng, unroll=args.unroll)
            record(case, "einsum", einsum_mlp, case.padded_args())
            record(case, "ragged_valid", ragged_mlp(lax_ragged), case.packed_args(None))
            record(case, "jax_ll_ep", ours_mlp(), case.padded_args())
            w8 = tuple(fp8_weights(w) for w in (case.wg, case.wu, case.wd))
            w8 = tuple(ep.Fp8Array(jnp.swapaxes(w.data, 1, 2), jnp.swapaxes(w.scale, 1, 2)) for w in w8)
            x8 = fp8_rows(case.x)
            record(case, "jax_ll_ep fp8 x, fp8 w nk", ours_mlp(w_layout="nk"), case.padded_args(x8, w8), weights=w8)
            del case, w8
    return [{"device": jax.devices()[0].device_kind, "copy_GBps": round(bw / 1e9, 1)}] + rows


_CONFIG_KEYS = {
    "bm": "block_m",
    "bn": "block_n",
    "bk": "block_k",
    "rp": "row_programs",
    "w": "num_warps",
    "s": "num_stages",
    "swap": "swap_ab",
    "mma": "fp8_mma",
}


def _config(text: str) -> GroupedMatmulConfig:
    """'bm=64,bn=128,bk=64,w=8,s=4,swap=1,mma=0,rp=1' (any subset) -> GroupedMatmulConfig."""
    fields = {}
    for item in text.split(","):
        key, value = item.split("=")
        name = _CONFIG_KEYS[key]
        fields[name] = bool(int(value)) if name in ("swap_ab", "fp8_mma") else int(value)
    return GroupedMatmulConfig(**fields)


def _label(cfg: GroupedMatmulConfig) -> str:
    short = {v: k for k, v in _CONFIG_KEYS.items()}
    return ",".join(f"{short[k]}={int(v)}" for k, v in dataclasses.asdict(cfg).items() if v is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("candidates", "rows", "models", "all", "variants"), default="all")
    parser.add_argument("--unroll", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", type=_config, nargs="*", default=[], help="extra bf16 configs, e.g. bm=64,bn=128,bk=64,w=8,s=4"
    )
    parser.add_argument("--up-configs", type=_config, nargs="*", default=[], help="configs for the swiglu kernel alone")
    parser.add_argument("--down-configs", type=_config, nargs="*", default=[], help="configs for the down kernel alone")
    parser.add_argument("--row-programs", type=int, nargs="*", default=[], help="row_programs values to sweep")
    parser.add_argument("--fp8-configs", type=_config, nargs="*", default=[], help="extra fp8 configs, same form")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
