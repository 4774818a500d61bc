"""jax_ll_ep across OS processes, the way a cluster runs it: one process per device group (one per GPU in
production), joined by ``jax.distributed``, every process running the same SPMD program on its own shards.

    python examples/multiprocess.py                              # 4 processes on localhost, 1 CPU device each
    python examples/multiprocess.py --processes 2 --devices-per-process 2
    python examples/multiprocess.py --processes 8 --platform gpu --backend cuda   # a host with 8 GPUs

Without ``--process-id`` the script starts ``--processes`` copies of itself on localhost (each with
``--process-id i``) and waits for them, printing their output. With ``--process-id`` it is one process of the job:
what a scheduler (SLURM, Kubernetes, mpirun) starts on every host, with ``--coordinator HOST:PORT`` of process 0.

Every process builds the same global data from ``--seed``, feeds only its own devices' shards to
``jax.make_array_from_callback``, runs dispatch -> experts -> combine under ``jax.jit`` + ``jax.shard_map``, and checks
its own tokens bit for bit against NumPy. Expert e multiplies its rows by 2^(e mod 3 - 1) (exact in bf16), so
``out[t] = bf16(sum_k w[t, k] * scale[e_k] * x[t])``, the products and sums in float32, in k order.
On CPU the ranks' buffer is POSIX shared memory (the ``cpu`` backend); on GPUs it is NVSHMEM symmetric memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=4, help="processes in the job")
    p.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process (cpu platform)")
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=16, help="tokens per rank (T)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts-per-rank", type=int, default=2)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds before the launcher kills the job")
    p.add_argument("--process-id", type=int, default=None, help="run as this process of the job")
    p.add_argument("--coordinator", default="", help="HOST:PORT of process 0 (with --process-id)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# One process of the job
# ---------------------------------------------------------------------------------------------------------------
def run_process(args) -> int:
    import jax

    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices_per_process)  # before any backend starts
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.process_id,
        local_device_ids=[args.process_id] if args.platform == "gpu" else None,  # one GPU per process
    )
    import ml_dtypes
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_ll_ep as ep

    devices = jax.devices()  # every process's devices, the same list everywhere
    mesh = Mesh(np.array(devices), ("ep",))
    r, t, h, k = len(devices), args.tokens, args.hidden, args.topk
    e = r * args.experts_per_rank

    # The same global data in every process (fixed seed); each process feeds only its own devices' shards.
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((r * t, h)).astype(ml_dtypes.bfloat16)
    topk_idx = np.argsort(rng.random((r * t, e)), axis=1)[:, :k].astype(np.int32)  # k distinct experts per token
    topk_idx[rng.random((r * t, k)) < 0.1] = -1  # some choices dropped
    weights = rng.random((r * t, k)).astype(np.float32)
    scale = (2.0 ** (np.arange(e) % 3 - 1)).astype(ml_dtypes.bfloat16)  # 0.5, 1, 2, ...: exact in bf16

    sharding = NamedSharding(mesh, P("ep"))

    def shard(a):
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def layer(x, topk_idx, weights, scale):  # per rank: [T, H], [T, K], [T, K], [E_l]
        recv_x, recv_count, handle = ep.dispatch(buf, x, topk_idx)  # [E_l, R*T, H]
        y = recv_x * scale[:, None, None]  # the experts; rows past recv_count[e] are not tokens (never read back)
        return ep.combine(buf, y, topk_idx, weights, handle)  # [T, H]

    with ep.Buffer(mesh, "ep", num_experts=e, max_tokens_per_rank=t, hidden=h, backend=args.backend) as buf:
        step = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        inputs = [shard(a) for a in (x, topk_idx, weights, scale)]
        out = jax.block_until_ready(step(*inputs))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = jax.block_until_ready(step(*inputs))
            times.append(time.perf_counter() - t0)
        buf.check()
        backend = buf.backend.name

    # This process's tokens against NumPy: float32 products and sums in k order, one bf16 rounding at the end.
    acc = np.zeros((r * t, h), np.float32)
    for j in range(k):
        chosen = topk_idx[:, j]
        term = weights[:, j, None] * (x.astype(np.float32) * scale[np.maximum(chosen, 0)].astype(np.float32)[:, None])
        acc = np.where(chosen[:, None] >= 0, acc + term, acc).astype(np.float32)
    want = acc.astype(ml_dtypes.bfloat16)
    exact = all(np.array_equal(np.asarray(s.data), want[s.index]) for s in out.addressable_shards)
    ranks = sorted(mesh.devices.tolist().index(s.device) for s in out.addressable_shards)
    print(
        f"process {args.process_id}: ranks {ranks} of {r}, backend {backend}, experts {e}, top-{k}, T={t}, H={h}; "
        f"median step {np.median(times) * 1e3:.2f} ms; own tokens exact: {exact}",
        flush=True,
    )
    jax.distributed.shutdown()
    return 0 if exact else 1


# ---------------------------------------------------------------------------------------------------------------
# The launcher: this script, once per process, on localhost
# ---------------------------------------------------------------------------------------------------------------
def launch(args, argv) -> int:
    from jax_ll_ep.testing import free_port, launch_ranks

    coordinator = f"127.0.0.1:{free_port()}"
    commands = [
        [sys.executable, __file__, *argv, "--process-id", str(i), "--coordinator", coordinator]
        for i in range(args.processes)
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    else:  # one host: no network transport for NVSHMEM, and leave GPU memory for its symmetric heap (README, GPUs)
        env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with tempfile.TemporaryDirectory(prefix="jax_ll_ep_example_") as log_dir:
        result = launch_ranks(commands, log_dir=log_dir, deadline_s=args.deadline, env=env)
        for i, log in enumerate(result.logs):
            print(f"----- process {i} (exit {result.returncodes[i]}) -----\n{log.rstrip()}")
    print("OK" if result.ok else f"FAILED: {result.report(tail_lines=0).splitlines()[0]}")
    return 0 if result.ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.process_id is None:
        return launch(args, argv)
    return run_process(args)


if __name__ == "__main__":
    sys.exit(main())
