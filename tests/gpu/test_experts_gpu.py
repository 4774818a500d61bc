"""The compiled grouped-matmul kernel on a GPU (marked ``gpu``; run by scripts/gpu_suite.sh): the same checks as
tests/test_experts.py against the NumPy reference, plus the decode shapes of one DeepSeek-V3 EP8 share and the
layer inside ``shard_map`` with the varying-axes check on."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import experts_reference as ref  # noqa: E402

import jax_ll_ep as ep  # noqa: E402

pytestmark = pytest.mark.gpu


def gpu():
    return jax.devices("gpu")[0]


@pytest.mark.parametrize(
    "x_fmt,w_fp8,w_layout,shape",
    [
        ("bf16", False, "kn", (4, 40, 256, 128)),
        ("bf16", False, "nk", (1, 1, 128, 128)),
        ("float", True, "kn", (3, 200, 512, 256)),
        ("ue8m0", True, "nk", (4, 40, 256, 128)),
        ("pow2", False, "kn", (4, 40, 256, 128)),
    ],
)
def test_kernel_matches_numpy(x_fmt, w_fp8, w_layout, shape):
    e, m, k, n = shape
    rng = np.random.default_rng([e, m, k, n, hash((w_layout, x_fmt, w_fp8)) % 2**16])
    counts = ref.random_counts(rng, e, m) if e > 1 else np.array([m], np.int32)
    rows = ref.random_rows(rng, e, m, k, counts)
    x = jnp.asarray(rows) if x_fmt == "bf16" else ref.quantize_rows(rows, x_fmt)
    w = ref.random_weights(rng, e, k, n, fp8=w_fp8, w_layout=w_layout)
    with jax.default_device(gpu()):
        out = jax.jit(lambda x, w, c: ep.grouped_matmul(x, w, c, w_layout=w_layout))(x, w, jnp.asarray(counts))
    ref.check_rows(out, ref.grouped_matmul(x, w, counts, w_layout), counts, tol=1e-2)


@pytest.mark.parametrize("w_layout,fp8", [("kn", False), ("nk", True)])
def test_deepseek_share_decode(w_layout, fp8):
    """One rank's EP8 share of a DeepSeek-V3 layer: 32 experts, 1,024 rows of capacity, H=7168, F=2048."""
    e, m, h, f = 32, 1024, 7168, 2048
    rng = np.random.default_rng(1)
    counts = np.bincount(np.argsort(rng.random((1024, 256)), axis=1)[:, :8].ravel(), minlength=256)[:e]
    counts = counts.astype(np.int32)
    rows = ref.random_rows(rng, e, m, h, counts)
    x = ref.quantize_rows(rows, "ue8m0") if fp8 else jnp.asarray(rows)
    w_gate, w_up = (ref.random_weights(rng, e, h, f, fp8=fp8, w_layout=w_layout) for _ in range(2))
    w_down = ref.random_weights(rng, e, f, h, fp8=fp8, w_layout=w_layout)
    with jax.default_device(gpu()):
        hidden = jax.jit(lambda *a: ep.swiglu(*a, w_layout=w_layout))(x, w_gate, w_up, jnp.asarray(counts))
    ref.check_rows(hidden, ref.swiglu(x, w_gate, w_up, counts, w_layout), counts, tol=1e-2)
    with jax.default_device(gpu()):
        y = jax.jit(lambda *a: ep.grouped_matmul(*a, w_layout=w_layout))(hidden, w_down, jnp.asarray(counts))
    hid = [np.asarray(hidden, np.float64)[i, : counts[i]] for i in range(e)]
    wd = ref.value(w_down)
    wd = np.swapaxes(wd, 1, 2) if w_layout == "nk" else wd
    ref.check_rows(y, [hid[i] @ wd[i] for i in range(e)], counts, tol=1e-2)


def test_grad_matches_reference_path():
    rng = np.random.default_rng(2)
    e, m, h, f = 3, 64, 256, 128
    counts = ref.random_counts(rng, e, m)
    x = jnp.asarray(np.nan_to_num(np.asarray(ref.random_rows(rng, e, m, h, counts), np.float32)), jnp.bfloat16)
    ws = [ref.random_weights(rng, e, *s, fp8=False, w_layout="kn") for s in ((h, f), (h, f), (f, h))]
    cot = jnp.asarray(rng.standard_normal((e, m, h)), jnp.float32)
    c = jnp.asarray(counts)
    mask = (jnp.arange(m)[None, :] < c[:, None])[:, :, None]

    def loss(impl, x, wg, wu, wd):
        y = ep.swiglu_mlp(x, c, wg, wu, wd, implementation=impl)
        return jnp.sum(jnp.where(mask, y.astype(jnp.float32) * cot, 0.0))

    with jax.default_device(gpu()):
        got = jax.jit(jax.grad(lambda *a: loss("auto", *a), argnums=(0, 1, 2, 3)))(x, *ws)
        want = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3)))(x, *ws)
    for g, w in zip(got, want, strict=True):
        err = ref.relative_error(np.asarray(g, np.float64), np.asarray(w, np.float64))
        assert err <= 3e-2, f"relative error {err:.2e}"


def test_in_shard_map_with_vma_check():
    mesh = Mesh(np.array([gpu()]), ("ep",))
    rng = np.random.default_rng(3)
    e, m, h, f = 4, 64, 256, 128
    counts = ref.random_counts(rng, e, m)
    x = jnp.asarray(ref.random_rows(rng, e, m, h, counts))
    ws = [ref.random_weights(rng, e, *s, fp8=False, w_layout="kn") for s in ((h, f), (h, f), (f, h))]
    fn = jax.jit(
        jax.shard_map(lambda x, c, *w: ep.swiglu_mlp(x, c, *w), mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    )
    y = fn(x, jnp.asarray(counts), *ws)
    g, u = ref.products(x, ws[:2], counts, "kn")
    hid = [ref.silu(a) * b for a, b in zip(g, u, strict=True)]
    wd = ref.value(ws[2])
    ref.check_rows(y, [hid[i] @ wd[i] for i in range(e)], counts, tol=2e-2)
