"""A complete expert-parallel MoE layer with jax_ll_ep, checked against a dense single-device computation.

    python examples/moe_layer.py                       # 8 simulated CPU devices, backend "auto"
    python examples/moe_layer.py --backend xla --fp8 ue8m0
    python examples/moe_layer.py --platform gpu --backend cuda --ranks 1

The layer, per rank, inside ``jax.jit`` + ``jax.shard_map`` over the expert-parallel axis "ep":
  router logits -> top-k experts, softmax weights over the chosen k
  -> jax_ll_ep.dispatch: each token goes to the ranks that own its experts; rows arrive as [E_l, R*T, H]
  -> jax_ll_ep.swiglu_mlp: a SwiGLU MLP per local expert over its recv_count[e] valid rows only (a masked grouped
     matmul: rows past the count are never read, and cost nothing), fp8 rows consumed as they arrive
  -> jax_ll_ep.combine: outputs go back to their tokens and are summed with the router weights.
Some tokens of every rank are padding: their top-k ids are -1, so they go nowhere and combine to zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cpu", "cuda"])
    p.add_argument("--platform", default=None, choices=["cpu", "gpu"], help="default: gpu for cuda, else cpu")
    p.add_argument("--ranks", type=int, default=8, help="expert-parallel ranks (devices)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank (T)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert MLP width")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--padding", type=float, default=0.125, help="fraction of tokens per rank that are padding")
    p.add_argument("--fp8", default="none", choices=["none", "float", "pow2", "ue8m0"], help="fp8 dispatch")
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args()
PLATFORM = ARGS.platform or ("gpu" if ARGS.backend == "cuda" else "cpu")

import jax  # noqa: E402

if PLATFORM == "cpu":
    # Simulated devices must be requested before any JAX backend starts.
    jax.config.update("jax_num_cpu_devices", max(ARGS.ranks, 1))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ll_ep as ep  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------
def route(x, router, topk, valid):
    """Top-k experts per token and softmax weights over the chosen k; padding tokens (valid=False) get -1."""
    logits = jnp.dot(x.astype(jnp.float32), router)  # [n, E]
    top_logits, topk_idx = jax.lax.top_k(logits, topk)
    weights = jax.nn.softmax(top_logits, axis=-1)
    topk_idx = jnp.where(valid[:, None], topk_idx, -1).astype(jnp.int32)
    return topk_idx, jnp.where(valid[:, None], weights, 0.0)


def make_moe_layer(buf: ep.Buffer, topk: int, fp8: ep.Fp8Options | None):
    """The per-rank body of the layer; wrapped in shard_map + jit by the caller."""

    def layer(x, valid, router, w_gate, w_up, w_down):
        topk_idx, weights = route(x, router, topk, valid)
        recv_x, recv_count, handle = ep.dispatch(buf, x, topk_idx, fp8=fp8)  # [E_l, R*T, H], valid rows per expert
        # Only recv_count[e] rows of expert e are tokens: the grouped matmul computes those and leaves the rest
        # unwritten (combine never reads them).
        y = ep.swiglu_mlp(recv_x, recv_count, w_gate, w_up, w_down)
        out = ep.combine(buf, y, topk_idx, weights, handle)
        return out, topk_idx, weights

    return layer


# ---------------------------------------------------------------------------------------------------------------
# The dense single-device reference: every expert on every token, then the weighted sum of the chosen ones
# ---------------------------------------------------------------------------------------------------------------
@jax.jit
def dense_moe(x, topk_idx, weights, w_gate, w_up, w_down):
    x = x.astype(jnp.float32)
    f32 = jnp.float32
    gate = jnp.einsum("nh,ehf->nef", x, w_gate.astype(f32))
    up = jnp.einsum("nh,ehf->nef", x, w_up.astype(f32))
    y = jnp.einsum("nef,efh->neh", jax.nn.silu(gate) * up, w_down.astype(f32))  # [N, E, H]
    chosen = jnp.take_along_axis(y, jnp.maximum(topk_idx, 0)[..., None], axis=1)  # [N, K, H]
    return jnp.sum(jnp.where(topk_idx[..., None] >= 0, weights[..., None] * chosen, 0.0), axis=1)


def timed(fn, *args, iters: int):
    """(first call seconds incl. compile, median step seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    steps = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        steps.append(time.perf_counter() - t0)
    return first, float(np.median(steps))


def main(args) -> int:
    devices = jax.devices(PLATFORM)[: args.ranks]
    if len(devices) < args.ranks:
        print(f"need {args.ranks} {PLATFORM} devices, found {len(devices)}", file=sys.stderr)
        return 2
    mesh = Mesh(np.array(devices), ("ep",))
    r, t, h, f, e, k = args.ranks, args.tokens, args.hidden, args.ffn, args.experts, args.topk
    fp8 = None if args.fp8 == "none" else ep.Fp8Options(args.fp8)

    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((r * t, h)) * 0.5).astype(np.float32)
    valid = rng.random(r * t) >= args.padding
    router = (rng.standard_normal((h, e)) / np.sqrt(h)).astype(np.float32)
    w_gate, w_up = ((rng.standard_normal((e, h, f)) / np.sqrt(h)).astype(jnp.bfloat16) for _ in range(2))
    w_down = (rng.standard_normal((e, f, h)) / np.sqrt(f)).astype(jnp.bfloat16)

    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))

    sharded = P("ep")
    args_dev = (
        put(jnp.asarray(x, jnp.bfloat16), sharded),  # tokens: sharded over ranks
        put(valid, sharded),
        put(router, P()),  # router: replicated
        put(w_gate, sharded),  # experts: rank i owns experts [i*E_l, (i+1)*E_l)
        put(w_up, sharded),
        put(w_down, sharded),
    )

    with ep.Buffer(mesh, "ep", num_experts=e, max_tokens_per_rank=t, hidden=h, backend=args.backend) as buf:
        print(f"{buf!r} on {len(devices)} {PLATFORM} device(s); fp8={args.fp8}")
        layer = jax.jit(
            jax.shard_map(
                make_moe_layer(buf, k, fp8),
                mesh=mesh,
                in_specs=(sharded, sharded, P(), sharded, sharded, sharded),
                out_specs=sharded,
            )
        )
        first, step = timed(layer, *args_dev, iters=args.iters)
        out, topk_idx, weights = (np.asarray(a) for a in layer(*args_dev))
        buf.check()

    dense_args = (args_dev[0], topk_idx, weights, w_gate, w_up, w_down)
    dense_first, dense_step = timed(dense_moe, *dense_args, iters=args.iters)
    want = np.asarray(dense_moe(*dense_args))
    got = out.astype(np.float32)
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    rel = err / scale
    padding_zero = not np.any(got[~valid])
    tol = 2e-2 if fp8 is None else 1.5e-1  # bf16 rounding of y and out; fp8 keeps 3 mantissa bits

    print(f"tokens {r}x{t} (padding {int((~valid).sum())}), hidden {h}, ffn {f}, experts {e}, top-{k}")
    print(f"max |ep - dense| = {err:.3e}  (max |dense| = {scale:.3e}, relative {rel:.2e}, tolerance {tol:.0e})")
    print(f"padding tokens combine to zero: {padding_zero}")
    for name, (a, b) in (("ep layer", (first, step)), ("dense layer", (dense_first, dense_step))):
        print(f"{name + ':':12s} first call {a * 1e3:8.1f} ms (incl. compile), median step {b * 1e3:8.3f} ms")
    ok = rel <= tol and padding_zero
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
