"""The benchmarks' own tools, on CPU: the loop mode's programs (benchmarks/loop_pairs.py) compute what they claim,
rolled and unrolled, and the profile summary (benchmarks/profile_loop.py) reads a trace as documented. The numbers
the benchmarks report are only as good as these."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_ll_ep as ep
from jax_ll_ep import testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loop_pairs  # noqa: E402
import profile_loop  # noqa: E402

T, H, K, E, ITERS = 5, 256, 3, 8, 4


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    topk = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    topk[1, 2] = -1  # a dropped choice
    w = rng.uniform(0.2, 0.6, (T, K)).astype(np.float32)
    return x, topk, w


def _reference(x, topk, w):
    """ITERS dependent pairs: every valid choice of token t returns x[t] itself, so a pair maps x[t] to
    bf16(sum over valid k of w[t, k] * x[t]), accumulated in float32 in k order."""
    cur = x.astype(np.float32)
    for _ in range(ITERS):
        acc = np.zeros_like(cur)
        for k in range(K):
            acc = acc + np.where(topk[:, k : k + 1] >= 0, w[:, k : k + 1], 0.0).astype(np.float32) * cur
        cur = acc.astype(ml_dtypes.bfloat16).astype(np.float32)
    return cur


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("method", ["jax_ll_ep", "jax_native"])
def test_loop_program_runs_every_pair(method, unroll):
    mesh = testing.ep_mesh(1)
    x, topk, w = _inputs(seed=7 + unroll)
    buf = None
    try:
        if method == "jax_ll_ep":
            buf = ep.Buffer(mesh, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="cpu")
            pair = loop_pairs.native_pair(buf)
        else:
            pair = loop_pairs.jax_packed_pair(E)
            topk = np.where(topk < 0, 0, topk)  # the JAX-native pair has no dropped choices
        fn = loop_pairs.loop_program(mesh, "ep", pair, ITERS, unroll=unroll)
        got = np.asarray(jax.block_until_ready(fn(jnp.asarray(x), jnp.asarray(topk), jnp.asarray(w))))
    finally:
        if buf is not None:
            buf.close()
    want = _reference(x, topk, w)
    assert not np.allclose(want, x.astype(np.float32), rtol=0.05)  # the pairs move the values
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=1e-3)


def test_profile_summary_reads_a_trace():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    host = [
        {"ph": "X", "pid": 2, "tid": 9, "name": "execution ours T=1", "ts": 1000.0, "dur": 100.0},
        {"ph": "X", "pid": 2, "tid": 9, "name": "PjitFunction(body)", "ts": 1001.0, "dur": 90.0},
        {"ph": "X", "pid": 2, "tid": 9, "name": "launch", "ts": 1002.0, "dur": 3.0},
        {"ph": "X", "pid": 2, "tid": 9, "name": "launch", "ts": 1010.0, "dur": 5.0},
        {"ph": "X", "pid": 2, "tid": 9, "name": "execution theirs T=1", "ts": 2000.0, "dur": 50.0},
    ]
    device = [
        {"ph": "X", "pid": 1, "tid": 1, "name": "dispatch_kernel", "ts": 1020.0, "dur": 8.0},
        {"ph": "X", "pid": 1, "tid": 1, "name": "combine_kernel", "ts": 1030.0, "dur": 6.0},
        {"ph": "X", "pid": 1, "tid": 1, "name": "dispatch_kernel", "ts": 1040.0, "dur": 10.0},
        {"ph": "X", "pid": 1, "tid": 1, "name": "outside", "ts": 1500.0, "dur": 1.0},
    ]
    ours, theirs = profile_loop.execution_summaries({"traceEvents": meta + device[::-1] + host})
    assert ours["name"] == "execution ours T=1" and ours["host_us"] == 100.0
    assert ours["kernels"] == 3 and ours["busy_us"] == 24.0
    assert ours["first_kernel_us"] == 20.0 and ours["last_end_us"] == 50.0
    assert ours["gap_sum_us"] == 6.0 and ours["gap_median_us"] == 3.0  # gaps 2 and 4
    assert ours["device"] == {"dispatch_kernel": (2, 9.0), "combine_kernel": (1, 6.0)}
    assert ours["host"][0] == ("PjitFunction(body)", 1, 90.0, 90.0)
    assert ours["host"][1] == ("launch", 2, 8.0, 4.0)
    assert theirs["kernels"] == 0 and "busy_us" not in theirs
