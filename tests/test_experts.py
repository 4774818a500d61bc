"""jax_ll_ep.experts: the masked grouped matmul and the SwiGLU MLP against an independent NumPy reference.

On CPU both implementations run: ``"pallas"`` is the GPU kernel itself in Pallas's interpreter (masked loads and
stores included), ``"reference"`` the masked einsum that ``"auto"`` picks off GPUs. Rows past each count hold NaN
(as dispatch may leave them), so a kernel that read them would turn valid outputs into NaN. The kernel is also
lowered for a Hopper GPU here (Triton IR), so an unsupported construct fails CI without a GPU.
"""

from __future__ import annotations

import functools

import experts_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ll_ep as ep
from jax_ll_ep.fp8 import quantize_fp8

IMPLS = ("pallas", "reference")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("w_layout", ["kn", "nk"])
@pytest.mark.parametrize(
    "x_fmt,w_fp8", [("bf16", False), ("bf16", True), ("float", False), ("float", True), ("pow2", True), ("ue8m0", True)]
)
def test_grouped_matmul_matches_numpy(impl, w_layout, x_fmt, w_fp8):
    rng = np.random.default_rng([hash((impl, w_layout, x_fmt, w_fp8)) % 2**32])
    e, m, k, n = 4, 40, 256, 128
    counts = ref.random_counts(rng, e, m)
    rows = ref.random_rows(rng, e, m, k, counts)
    x = jnp.asarray(rows) if x_fmt == "bf16" else ref.quantize_rows(rows, x_fmt)
    w = ref.random_weights(rng, e, k, n, fp8=w_fp8, w_layout=w_layout)
    out = ep.grouped_matmul(x, w, jnp.asarray(counts), w_layout=w_layout, implementation=impl)
    assert out.shape == (e, m, n) and out.dtype == jnp.bfloat16
    ref.check_rows(out, ref.grouped_matmul(x, w, counts, w_layout), counts, tol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_output_is_exact_to_float32_rounding(impl):
    rng = np.random.default_rng(1)
    e, m, k, n = 3, 24, 128, 64
    counts, x, w = ref.bf16_case(rng, e, m, k, n)
    out = ep.grouped_matmul(x, w, jnp.asarray(counts), out_dtype=jnp.float32, implementation=impl)
    assert out.dtype == jnp.float32
    ref.check_rows(out, ref.grouped_matmul(x, w, counts), counts, tol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("e,m", [(1, 1), (1, 33), (5, 1)])
def test_smallest_shapes(impl, e, m):
    rng = np.random.default_rng([e, m])
    k, n = 64, 32
    counts = rng.integers(0, m + 1, size=e).astype(np.int32)
    counts[0] = m
    x = jnp.asarray(ref.random_rows(rng, e, m, k, counts))
    w = ref.random_weights(rng, e, k, n, fp8=False, w_layout="kn")
    out = ep.grouped_matmul(x, w, jnp.asarray(counts), implementation=impl)
    ref.check_rows(out, ref.grouped_matmul(x, w, counts), counts, tol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_fmt,w_fp8,w_layout", [("bf16", False, "kn"), ("ue8m0", True, "nk"), ("bf16", True, "nk")])
def test_swiglu_mlp_matches_numpy(impl, x_fmt, w_fp8, w_layout):
    rng = np.random.default_rng(7)
    e, m, h, f = 3, 48, 256, 128
    counts = ref.random_counts(rng, e, m)
    rows = ref.random_rows(rng, e, m, h, counts)
    x = jnp.asarray(rows) if x_fmt == "bf16" else ref.quantize_rows(rows, x_fmt)
    w_gate, w_up = (ref.random_weights(rng, e, h, f, fp8=w_fp8, w_layout=w_layout) for _ in range(2))
    w_down = ref.random_weights(rng, e, f, h, fp8=w_fp8, w_layout=w_layout)
    c = jnp.asarray(counts)
    hidden = ep.swiglu(x, w_gate, w_up, c, w_layout=w_layout, implementation=impl)
    ref.check_rows(hidden, ref.swiglu(x, w_gate, w_up, counts, w_layout), counts, tol=1e-2)
    y = ep.swiglu_mlp(x, c, w_gate, w_up, w_down, w_layout=w_layout, implementation=impl)
    # The reference of the second product starts from the bf16 hidden rows, as the op does.
    hidden_bf16 = [np.asarray(hidden, np.float64)[i, : counts[i]] for i in range(e)]
    wd = ref.value(w_down)
    wd = np.swapaxes(wd, 1, 2) if w_layout == "nk" else wd
    ref.check_rows(y, [hidden_bf16[i] @ wd[i] for i in range(e)], counts, tol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_outside_the_layout_are_clamped(impl):
    rng = np.random.default_rng(9)
    e, m, k, n = 3, 20, 128, 64
    x = jnp.asarray(ref.random_rows(rng, e, m, k, np.full(e, m, np.int32)))
    w = ref.random_weights(rng, e, k, n, fp8=False, w_layout="kn")
    out = ep.grouped_matmul(x, w, jnp.asarray([-5, m + 7, 2**30], jnp.int32), implementation=impl)
    ref.check_rows(out, ref.grouped_matmul(x, w, np.array([0, m, m])), np.array([0, m, m]), tol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_tiles_and_row_programs_do_not_change_results(impl):
    rng = np.random.default_rng(3)
    e, m, k, n = 3, 100, 256, 128
    counts, x, w = ref.bf16_case(rng, e, m, k, n)
    want = ref.grouped_matmul(x, w, counts)
    for cfg in (
        ep.GroupedMatmulConfig(block_m=16, row_programs=3),
        ep.GroupedMatmulConfig(block_m=32, block_n=32, block_k=128, row_programs=8),
        ep.GroupedMatmulConfig(block_m=64, block_n=64, block_k=16, num_warps=8, num_stages=2),
    ):
        out = ep.grouped_matmul(x, w, jnp.asarray(counts), implementation=impl, config=cfg)
        ref.check_rows(out, want, counts, tol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Autodiff
# ---------------------------------------------------------------------------------------------------------------
def dense_mlp_loss(x, counts, w_gate, w_up, w_down, cot, w_layout):
    """Plain jnp over each expert's valid rows only (no jax_ll_ep code): sum(y * cot)."""
    total = 0.0
    for e in range(x.shape[0]):
        c = int(counts[e])
        xv = x[e, :c].astype(jnp.float32)
        wg, wu, wd = (a[e].astype(jnp.float32) for a in (w_gate, w_up, w_down))
        if w_layout == "nk":
            wg, wu, wd = wg.T, wu.T, wd.T
        h = jax.nn.silu(xv @ wg) * (xv @ wu)
        total = total + jnp.sum((h @ wd) * cot[e, :c])
    return total


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("w_layout", ["kn", "nk"])
def test_grad_matches_dense_reference(impl, w_layout):
    rng = np.random.default_rng(11)
    e, m, h, f = 3, 40, 128, 64
    counts = ref.random_counts(rng, e, m)
    x = jnp.asarray(np.nan_to_num(np.asarray(ref.random_rows(rng, e, m, h, counts), np.float32)), jnp.bfloat16)
    w_gate, w_up = (ref.random_weights(rng, e, h, f, fp8=False, w_layout=w_layout) for _ in range(2))
    w_down = ref.random_weights(rng, e, f, h, fp8=False, w_layout=w_layout)
    cot = jnp.asarray(rng.standard_normal((e, m, h)), jnp.float32)
    c = jnp.asarray(counts)
    mask = (jnp.arange(m)[None, :] < c[:, None])[:, :, None]

    def loss(x, wg, wu, wd):
        y = ep.swiglu_mlp(x, c, wg, wu, wd, w_layout=w_layout, implementation=impl)
        return jnp.sum(jnp.where(mask, y.astype(jnp.float32) * cot, 0.0))

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)
    want = jax.grad(dense_mlp_loss, argnums=(0, 2, 3, 4))(x, counts, w_gate, w_up, w_down, cot, w_layout)
    for name, g, wnt in zip(("x", "w_gate", "w_up", "w_down"), got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        err = ref.relative_error(np.asarray(g, np.float64), np.asarray(wnt, np.float64))
        assert err <= 3e-2, f"d{name}: relative error {err:.2e}"
    dx = np.asarray(got[0], np.float32)
    assert not np.any(dx[np.arange(m)[None, :] >= counts[:, None]]), "rows past the count must get zero gradient"


def test_fp8_is_forward_only():
    rng = np.random.default_rng(5)
    counts = np.array([3, 0], np.int32)
    rows = ref.random_rows(rng, 2, 8, 128, counts)
    x8 = ref.quantize_rows(rows, "float")
    w = ref.random_weights(rng, 2, 128, 128, fp8=False, w_layout="kn")
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda w: jnp.sum(ep.grouped_matmul(x8, w, jnp.asarray(counts)).astype(jnp.float32)))(w)


# ---------------------------------------------------------------------------------------------------------------
# Inside jit, scan and shard_map with real dispatch output
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_jit_and_scan(impl):
    rng = np.random.default_rng(13)
    e, m, k, n, steps = 2, 16, 128, 64, 3
    counts = np.stack([ref.random_counts(rng, e, m) for _ in range(steps)])
    xs = np.stack([np.asarray(ref.random_rows(rng, e, m, k, c), np.float32) for c in counts]).astype(jnp.bfloat16)
    w = ref.random_weights(rng, e, k, n, fp8=False, w_layout="kn")

    @jax.jit
    def run(xs, counts):
        return jax.lax.scan(
            lambda _, a: (None, ep.grouped_matmul(a[0], w, a[1], implementation=impl)), None, (xs, counts)
        )[1]

    out = run(jnp.asarray(xs), jnp.asarray(counts))
    for s in range(steps):
        ref.check_rows(out[s], ref.grouped_matmul(jnp.asarray(xs[s]), w, counts[s]), counts[s], tol=1e-2)


@pytest.mark.parametrize(
    "backend,fp8,impl",
    [("xla", None, "auto"), ("cpu", "ue8m0", "auto"), ("cpu", None, "pallas"), ("xla", "pow2", "pallas")],
)
def test_moe_layer_in_shard_map_matches_dense(mesh8, make_buffer, backend, fp8, impl):
    """dispatch -> swiglu_mlp -> combine on 8 ranks, against a dense per-token MLP. Pallas's interpreter trips over
    shard_map's varying-axes check (a JAX limitation of interpret mode), so the interpreted kernel runs with
    check_vma=False; the compiled kernel runs with the check in the GPU suite."""
    r, t, h, f, num_e, k = 8, 8, 128, 64, 16, 4
    buf = make_buffer(mesh8, backend=backend, num_experts=num_e, max_tokens_per_rank=t, hidden=h)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((r * t, h)).astype(np.float32)
    idx = np.argsort(rng.random((r * t, num_e)), axis=1)[:, :k].astype(np.int32)
    idx[rng.random((r * t, k)) < 0.1] = -1
    wts = rng.random((r * t, k)).astype(np.float32)
    w_gate, w_up = (ref.random_weights(rng, num_e, h, f, fp8=False, w_layout="kn") for _ in range(2))
    w_down = ref.random_weights(rng, num_e, f, h, fp8=False, w_layout="kn")
    opts = None if fp8 is None else ep.Fp8Options(fp8)

    def layer(x, idx, wts, wg, wu, wd):
        recv_x, count, handle = ep.dispatch(buf, x, idx, fp8=opts)
        y = ep.swiglu_mlp(recv_x, count, wg, wu, wd, implementation=impl)
        return ep.combine(buf, y, idx, wts, handle)

    spec = P("ep")
    fn = jax.jit(jax.shard_map(layer, mesh=mesh8, in_specs=(spec,) * 6, out_specs=spec, check_vma=impl != "pallas"))
    out = np.asarray(
        fn(jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), jnp.asarray(wts), w_gate, w_up, w_down), np.float64
    )
    buf.check()
    xin = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    if fp8 is not None:  # what the experts receive: the quantized rows
        data, scale = quantize_fp8(jnp.asarray(x, jnp.bfloat16), fp8)
        xin = ref.value(ep.Fp8Array(data[None], scale[None]))[0]
    wg, wu, wd = (ref.value(a) for a in (w_gate, w_up, w_down))
    want = np.zeros((r * t, h))
    for tok in range(r * t):
        for j in range(k):
            ex = idx[tok, j]
            if ex >= 0:
                hid = ref.silu(xin[tok] @ wg[ex]) * (xin[tok] @ wu[ex])
                want[tok] += wts[tok, j] * (hid @ wd[ex])
    err = ref.relative_error(out, want)
    assert np.isfinite(out).all() and err <= 2e-2, f"layer relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Errors at trace time
# ---------------------------------------------------------------------------------------------------------------
def _ops():
    x = jnp.zeros((2, 8, 128), jnp.bfloat16)
    w = jnp.zeros((2, 128, 64), jnp.bfloat16)
    return x, w, jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda x, w, c: (x[0], w, c), ValueError, r"x must be \[E_l, M, K\]"),
        (lambda x, w, c: (x, w[:, :64], c), ValueError, r"w has shape \(2, 64, 64\)"),
        (lambda x, w, c: (x, w[:1], c), ValueError, r"w has shape \(1, 128, 64\)"),
        (lambda x, w, c: (x, w, c[:1]), ValueError, r"counts must be int32\[2\]"),
        (lambda x, w, c: (x, w, c.astype(jnp.float32)), ValueError, r"counts must be int32\[2\].*float32"),
        (lambda x, w, c: (x.astype(jnp.float32), w, c), TypeError, "x has dtype float32; allowed: bfloat16"),
        (lambda x, w, c: (x, w.astype(jnp.float16), c), TypeError, "w has dtype float16"),
        (lambda x, w, c: (x, np.zeros((2, 128, 64)), c), TypeError, "w has dtype float64"),
        (lambda x, w, c: (x[:, :, :120], w[:, :120], c), ValueError, "K and N multiples of 16"),
    ],
)
def test_shape_and_dtype_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        ep.grouped_matmul(*mutate(*_ops()))


def test_fp8_shape_errors():
    x, w, c = _ops()
    x8 = ep.Fp8Array(x.astype(jnp.float8_e4m3fn), jnp.ones((2, 8, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"x.scale has shape \(2, 8, 2\); allowed: \[2, 8, 1\]"):
        ep.grouped_matmul(ep.Fp8Array(x8.data, jnp.ones((2, 8, 2), jnp.float32)), w, c)
    with pytest.raises(ValueError, match="N=64 must be a multiple of 128 for fp8 w"):
        ep.grouped_matmul(x8, ep.Fp8Array(w.astype(jnp.float8_e4m3fn), jnp.ones((2, 1, 1), jnp.float32)), c)
    w8 = ep.Fp8Array(jnp.zeros((2, 128, 128), jnp.float8_e4m3fn), jnp.ones((2, 1, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"w.scale has shape \(2, 1, 2\); allowed: \[2, 1, 1\]"):
        ep.grouped_matmul(x8, w8, c)
    with pytest.raises(ValueError, match="K=96 must be a multiple of 128"):
        ep.grouped_matmul(ep.Fp8Array(x8.data[:, :, :96], x8.scale), w[:, :96], c)
    with pytest.raises(TypeError, match="x.scale has dtype int32"):
        ep.grouped_matmul(ep.Fp8Array(x8.data, jnp.ones((2, 8, 1), jnp.int32)), w, c)
    x8_wide = ep.Fp8Array(jnp.zeros((2, 8, 256), jnp.float8_e4m3fn), jnp.ones((2, 8, 2), jnp.float32))
    with pytest.raises(ValueError, match="block_k=256 must be at most 128 with fp8"):
        ep.grouped_matmul(x8_wide, jnp.zeros((2, 256, 64), jnp.bfloat16), c, config=ep.GroupedMatmulConfig(block_k=256))


def test_option_errors():
    x, w, c = _ops()
    with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
        ep.grouped_matmul(x, w, c, implementation="cuda")
    with pytest.raises(ValueError, match="out_dtype=float16 is not allowed"):
        ep.grouped_matmul(x, w, c, out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="w_layout='mk' is not one of"):
        ep.grouped_matmul(x, w, c, w_layout="mk")
    with pytest.raises(ValueError, match=r"w has shape \(2, 128, 64\); .*w_layout='nk'"):
        ep.grouped_matmul(x, w, c, w_layout="nk")
    with pytest.raises(ValueError, match="block_m=8 must be at least 16"):
        ep.GroupedMatmulConfig(block_m=8)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        ep.GroupedMatmulConfig(block_n=48)
    with pytest.raises(ValueError, match="N=64 must be a multiple of block_n=128"):
        ep.grouped_matmul(x, w, c, config=ep.GroupedMatmulConfig(block_n=128))
    with pytest.raises(TypeError, match="w_gate and w_up must have one shape and format"):
        ep.swiglu(x, w, w[:, :, :32], c)


# ---------------------------------------------------------------------------------------------------------------
# The kernel lowers for a Hopper GPU (Triton IR is produced here, without a GPU)
# ---------------------------------------------------------------------------------------------------------------
def _lower_for_hopper(fn, *args) -> str:
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "x_fp8,w_fp8,w_layout", [(False, False, "kn"), (True, True, "nk"), (False, True, "nk"), (True, False, "kn")]
)
def test_kernel_lowers_for_hopper(x_fp8, w_fp8, w_layout):
    s = jax.ShapeDtypeStruct
    e, m, h, f = 4, 64, 256, 128
    x = (
        ep.Fp8Array(s((e, m, h), jnp.float8_e4m3fn), s((e, m, h // 128), jnp.float8_e8m0fnu))
        if x_fp8
        else s((e, m, h), jnp.bfloat16)
    )

    def weight(k, n):
        shape, blocks = (
            ((e, n, k), (e, n // 128, k // 128)) if w_layout == "nk" else ((e, k, n), (e, k // 128, n // 128))
        )
        return ep.Fp8Array(s(shape, jnp.float8_e4m3fn), s(blocks, jnp.float32)) if w_fp8 else s(shape, jnp.bfloat16)

    fn = functools.partial(ep.swiglu_mlp, w_layout=w_layout)
    text = _lower_for_hopper(fn, x, s((e,), jnp.int32), weight(h, f), weight(h, f), weight(f, h))
    assert text.count("__gpu$xla.gpu.triton") == 2, "expected the two kernels as Triton custom calls"


def test_backward_lowers_for_hopper():
    s = jax.ShapeDtypeStruct
    e, m, h, f = 2, 32, 128, 64

    def loss(x, wg, wu, wd, c):
        return jnp.sum(ep.swiglu_mlp(x, c, wg, wu, wd).astype(jnp.float32))

    args = (
        s((e, m, h), jnp.bfloat16),
        s((e, h, f), jnp.bfloat16),
        s((e, h, f), jnp.bfloat16),
        s((e, f, h), jnp.bfloat16),
        s((e,), jnp.int32),
    )
    text = _lower_for_hopper(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
    assert text.count("__gpu$xla.gpu.triton") >= 8, "forward, recomputed products, dx and dw kernels"


@pytest.mark.parametrize("implementation", ["auto", "pallas"])
def test_one_byte_operands_that_the_kernel_would_misaddress_are_refused(implementation):
    """fp8 weights of 2^31 to 2^32 elements (256 DeepSeek-V3 experts in one array) would be read through wrapped
    32-bit offsets by the Triton lowering: refused at trace time, naming the operand and how many experts fit; 146
    experts, the reference path, and bf16 weights of the same shape are accepted (shapes only: nothing allocated)."""
    s = jax.ShapeDtypeStruct
    h, f, m = 7168, 2048, 8

    def fp8_weight(e):
        return ep.Fp8Array(s((e, f, h), jnp.float8_e4m3fn), s((e, f // 128, h // 128), jnp.float32))

    def out_shape(e, w, impl):
        fn = functools.partial(ep.grouped_matmul, w_layout="nk", implementation=impl)
        return jax.eval_shape(fn, s((e, m, h), jnp.bfloat16), w, s((e,), jnp.int32))

    with pytest.raises(ValueError, match=r"w holds 3,758,096,384 one-byte \(fp8\) elements.*at most 146 experts"):
        out_shape(256, fp8_weight(256), implementation)
    assert out_shape(146, fp8_weight(146), implementation).shape == (146, m, f)
    assert out_shape(256, fp8_weight(256), "reference").shape == (256, m, f)
    assert out_shape(256, s((256, f, h), jnp.bfloat16), implementation).shape == (256, m, f)
