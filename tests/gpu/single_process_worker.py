"""One process driving every visible GPU: ``python single_process_worker.py OUT_DIR``.

The ``cuda`` backend's peer-access transport (jax_ll_ep/backends/cuda.py): no jax.distributed, no NVSHMEM, one rank
per GPU of the mesh, peers reached through peer access. Runs the round trip against the NumPy oracle (bf16 and the
three fp8 scale formats, fresh data per call, many calls back to back on one buffer, a 2-D mesh when there are at
least 4 GPUs) and writes ``OUT_DIR/result.json`` ({check: {"ok", "seconds", "error"?}}). On a one-GPU machine it
runs with one rank; the several-GPU cases need a machine with several GPUs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: oracle, test_reference
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: jax_ll_ep

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import numpy as np  # noqa: E402
import test_reference as ref  # noqa: E402

import jax_ll_ep as ep  # noqa: E402
from jax_ll_ep import testing  # noqa: E402

OUT_DIR = sys.argv[1]
GPUS = jax.devices("gpu")
CASE = ref.Case(num_ranks=len(GPUS), num_experts=8 * len(GPUS), max_tokens=64, hidden=512, topk=4)


def make_buffer(mesh, axis="ep", case=CASE):
    buf = ep.Buffer(
        mesh,
        axis,
        num_experts=case.num_experts,
        max_tokens_per_rank=case.max_tokens,
        hidden=case.hidden,
        backend="cuda",
        timeout_s=30.0,
    )
    assert buf.backend.transport == "peer", buf.backend.transport
    return buf


def check_roundtrip():
    with make_buffer(testing.ep_mesh(CASE.num_ranks, devices=GPUS)) as buf:
        for fp8 in (None, "float", "pow2", "ue8m0"):
            xs, topks, weights = ref._inputs(CASE, seed=300 + len(str(fp8)))
            ref._check_against_oracle(buf, CASE, xs, topks, weights, fp8=fp8)
        buf.check()


def check_back_to_back():
    """50 round trips on one buffer, fresh data each, every result compared (the ranks' calls stay matched)."""
    with make_buffer(testing.ep_mesh(CASE.num_ranks, devices=GPUS)) as buf:
        for i in range(50):
            xs, topks, weights = ref._inputs(CASE, seed=400 + i)
            ref._check_against_oracle(buf, CASE, xs, topks, weights)
        buf.check()


def check_mesh_2d():
    if len(GPUS) < 4 or len(GPUS) % 2:
        return  # needs two groups of at least two GPUs
    case = ref.Case(num_ranks=len(GPUS) // 2, num_experts=4 * len(GPUS), max_tokens=32, hidden=256, topk=4)
    mesh = jax.sharding.Mesh(np.array(GPUS).reshape(2, case.num_ranks), ("dp", "ep"))
    with make_buffer(mesh, case=case) as buf:
        xs, topks, weights = ref._inputs(case, seed=500, devices=len(GPUS))
        ref._check_against_oracle(buf, case, xs, topks, weights)
        buf.check()


CHECKS = {"roundtrip": check_roundtrip, "back_to_back": check_back_to_back, "mesh_2d": check_mesh_2d}


def main() -> None:
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.time()
        try:
            fn()
            results[name] = {"ok": True, "seconds": round(time.time() - t0, 2), "gpus": len(GPUS)}
        except Exception:  # noqa: BLE001 - recorded, reported by the pytest driver
            results[name] = {
                "ok": False,
                "seconds": round(time.time() - t0, 2),
                "error": traceback.format_exc()[-6000:],
            }
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)", flush=True)
        with open(os.path.join(OUT_DIR, "result.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
