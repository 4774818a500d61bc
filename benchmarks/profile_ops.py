"""A small program for Nsight Compute: one rank's dispatch and combine, called in a jitted loop, nothing else.

    ncu --clock-control none --set full --import-source yes -k regex:'dispatch_kernel|combine_kernel' \
        --launch-skip 20 --launch-count 4 -o prof python benchmarks/profile_ops.py --tokens 128

One process driving one GPU uses the peer-access transport (plain device allocations), so NVSHMEM is never
initialized in the profiled process. Each call of the loop runs fp8 dispatch then bf16 combine on the standard
decode shapes (H=7168, K=8, E=256) with fresh random routing per input set; the kernels are the ones the benchmark
times. ``--calls`` bounds the number of launches so the profiler's replays stay short.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jax_ll_ep as ep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--fp8", default="float", help="scale format, or 'none' for bf16 dispatch")
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    fp8 = None if args.fp8 == "none" else ep.Fp8Options(args.fp8)
    t, h, k, e = args.tokens, args.hidden, args.topk, args.experts
    with ep.Buffer(mesh, "ep", num_experts=e, max_tokens_per_rank=t, hidden=h, backend="cuda") as buf:

        def pair(x, idx, w):
            recv_x, recv_count, handle = ep.dispatch(buf, x, idx, fp8=fp8)
            y = (recv_x.data if fp8 else recv_x).astype(jnp.bfloat16)
            return ep.combine(buf, y, idx, w, handle)

        step = jax.jit(jax.shard_map(pair, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
        rng = np.random.default_rng(0)
        for i in range(args.calls):
            x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
            idx = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jnp.int32)
            w = jnp.asarray(rng.random((t, k)), jnp.float32)
            out = step(x, idx, w)
            if i == 0:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
        buf.check()
    print("profile_ops: done")


if __name__ == "__main__":
    main()
