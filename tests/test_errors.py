"""Every trace-time constraint of the ops (jax_ll_ep/ops.py) raises a clear exception that names the argument, the bad
value and what is allowed. Nothing here compiles or runs: the errors come while tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ll_ep as ep

R, E, T, H, K = 8, 32, 16, 256, 4
E_L, ROWS = E // R, R * T
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def buf(mesh8):
    with ep.Buffer(mesh8, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla") as b:
        yield b


def _spec(mesh, shape, dtype):
    """A per-device [shape] argument, as the global abstract array shard_map splits over "ep"."""
    return jax.ShapeDtypeStruct((R * shape[0], *shape[1:]), dtype, sharding=NamedSharding(mesh, P("ep")))


def _trace(buf, body, *shapes_dtypes, mesh=None):
    """Traces and lowers ``body`` inside shard_map over "ep" with per-device arguments of the given shapes."""
    mesh = buf.mesh if mesh is None else mesh
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    return fn.lower(*(_spec(mesh, s, d) for s, d in shapes_dtypes))


def _dispatch(buf, x=((T, H), BF16), topk=((T, K), np.int32), fp8=None):
    return _trace(buf, lambda a, b: ep.dispatch(buf, a, b, fp8=fp8)[1], x, topk)


def _combine(
    buf,
    y=((E_L, ROWS, H), BF16),
    topk=((T, K), np.int32),
    w=((T, K), np.float32),
    src_info=((E_L, ROWS), np.int32),
    layout_range=((E_L, R, 2), np.int32),
    pos=((E_L, ROWS), np.int32),
):
    def body(y, t, w, s, lr, p):
        return ep.combine(buf, y, t, w, ep.DispatchHandle(s, lr, p))

    return _trace(buf, body, y, topk, w, src_info, layout_range, pos)


def test_valid_calls_trace(buf):
    """The baseline every other test perturbs: these shapes are accepted."""
    _dispatch(buf)
    _dispatch(buf, x=((T, H), np.float32))  # float32 is accepted (cast to bf16)
    _dispatch(buf, x=((3, H), BF16), topk=((3, K), np.int32))  # n < T
    _dispatch(buf, topk=((T, 32), np.int32))  # K = 32
    _dispatch(buf, fp8=ep.Fp8Options("ue8m0"))
    _combine(buf)


# ---------------------------------------------------------------------------------------------------------------
# Buffer construction
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(num_experts=12), ValueError, r"num_experts=12 .*divisible.*'ep' \(8\)"),
        (dict(num_experts=0), ValueError, r"num_experts=0 must be a positive int"),
        (dict(max_tokens_per_rank=0), ValueError, r"max_tokens_per_rank=0 must be a positive int"),
        (dict(max_tokens_per_rank=2.5), ValueError, r"max_tokens_per_rank=2.5 must be a positive int"),
        (dict(hidden=100), ValueError, r"hidden=100 must be a multiple of 8"),
        (dict(backend="tpu"), ValueError, r"backend='tpu' is not one of"),
        (dict(backend="cuda"), ValueError, r"backend='cuda' needs a mesh of GPU devices"),
        (dict(timeout_s=0), ValueError, r"timeout_s=0.* must be a number of seconds"),
    ],
)
def test_buffer_arguments(mesh8, kwargs, exc, pattern):
    args = dict(num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla") | kwargs
    with pytest.raises(exc, match=pattern):
        ep.Buffer(mesh8, "ep", **args)


def test_buffer_axis_and_mesh(mesh8):
    with pytest.raises(ValueError, match=r"axis_name='tp' is not an axis of the mesh; its axes are \('ep',\)"):
        ep.Buffer(mesh8, "tp", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla")
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh, got list"):
        ep.Buffer(list(mesh8.devices), "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla")


def test_fp8_options():
    allowed = r"allowed: \('float', 'pow2', 'ue8m0'\)"
    with pytest.raises(ValueError, match=rf"scale_format='e5m2' is not supported; {allowed}"):
        ep.Fp8Options("e5m2")


# ---------------------------------------------------------------------------------------------------------------
# dispatch arguments
# ---------------------------------------------------------------------------------------------------------------
def test_too_many_tokens(buf):
    with pytest.raises(ValueError, match=r"x has 17 tokens but the buffer holds at most max_tokens_per_rank=16"):
        _dispatch(buf, x=((T + 1, H), BF16), topk=((T + 1, K), np.int32))


def test_wrong_hidden(buf):
    with pytest.raises(ValueError, match=r"x must have shape \[n, hidden=256\], got \(16, 128\)"):
        _dispatch(buf, x=((T, 128), BF16))


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_x_dtype(buf, dtype):
    with pytest.raises(TypeError, match=rf"x must be bfloat16 \(float32 is cast\), got {np.dtype(dtype).name}"):
        _dispatch(buf, x=((T, H), dtype))


@pytest.mark.parametrize("k", [0, 33])
def test_topk_width(buf, k):
    with pytest.raises(ValueError, match=rf"topk_idx has K={k} columns; allowed: 1 <= K <= 32"):
        _dispatch(buf, topk=((T, k), np.int32))


def test_topk_rows(buf):
    with pytest.raises(ValueError, match=r"topk_idx must have shape \[n=16, K\], got \(15, 4\)"):
        _dispatch(buf, topk=((T - 1, K), np.int32))


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint32])
def test_topk_dtype(buf, dtype):
    pattern = rf"topk_idx must be int32 with values in \[-1, 32\), got {np.dtype(dtype).name}"
    with pytest.raises(TypeError, match=pattern):
        _dispatch(buf, topk=((T, K), dtype))


def test_fp8_needs_hidden_multiple_of_128(mesh8):
    with ep.Buffer(mesh8, "ep", num_experts=E, max_tokens_per_rank=T, hidden=136, backend="xla") as b:
        _dispatch(b, x=((T, 136), BF16))  # bf16 is fine with a multiple of 8
        with pytest.raises(ValueError, match=r"fp8 dispatch needs hidden to be a multiple of 128; hidden=136"):
            _dispatch(b, x=((T, 136), BF16), fp8=ep.Fp8Options())


def test_fp8_must_be_options(buf):
    with pytest.raises(TypeError, match=r"fp8 must be None or jax_ll_ep.Fp8Options, got 'pow2'"):
        _dispatch(buf, fp8="pow2")


# ---------------------------------------------------------------------------------------------------------------
# combine arguments
# ---------------------------------------------------------------------------------------------------------------
def test_y_shape_and_dtype(buf):
    with pytest.raises(ValueError, match=r"y must have shape \(4, 128, 256\) \(the dispatch layout"):
        _combine(buf, y=((E_L, ROWS - 1, H), BF16))
    with pytest.raises(TypeError, match=r"y must be bfloat16, got float16"):
        _combine(buf, y=((E_L, ROWS, H), np.float16))
    _combine(buf, y=((E_L, ROWS, H), np.float32))  # float32 is accepted (cast to bf16)


def test_weights(buf):
    with pytest.raises(ValueError, match=r"topk_weights must have the shape of topk_idx \(16, 4\), got \(16, 3\)"):
        _combine(buf, w=((T, 3), np.float32))
    with pytest.raises(TypeError, match=r"topk_weights must be float32, got bfloat16"):
        _combine(buf, w=((T, K), BF16))


def test_combine_topk(buf):
    with pytest.raises(ValueError, match=r"topk_idx has 17 tokens but the buffer holds at most max_tokens_per_rank=16"):
        _combine(buf, topk=((T + 1, K), np.int32), w=((T + 1, K), np.float32))
    with pytest.raises(ValueError, match=r"K=33 columns; allowed: 1 <= K <= 32"):
        _combine(buf, topk=((T, 33), np.int32), w=((T, 33), np.float32))


def test_handle_shapes(buf):
    with pytest.raises(ValueError, match=r"handle.src_info must have shape \(4, 128\)"):
        _combine(buf, src_info=((E_L, ROWS - 8), np.int32))
    with pytest.raises(ValueError, match=r"handle.src_topk_pos must have shape \(4, 128\)"):
        _combine(buf, pos=((E_L + 1, ROWS), np.int32))
    with pytest.raises(TypeError, match=r"handle.src_info must be int32, got float32"):
        _combine(buf, src_info=((E_L, ROWS), np.float32))
    with pytest.raises(ValueError, match=r"handle.layout_range must be int32 \[4, 8, 2\], got int32\(4, 8, 3\)"):
        _combine(buf, layout_range=((E_L, R, 3), np.int32))


def test_handle_type(buf):
    def body(y, t, w, s, lr, p):
        return ep.combine(buf, y, t, w, (s, lr, p))

    specs = [((E_L, ROWS, H), BF16), ((T, K), np.int32), ((T, K), np.float32)]
    specs += [((E_L, ROWS), np.int32), ((E_L, R, 2), np.int32), ((E_L, ROWS), np.int32)]
    with pytest.raises(TypeError, match=r"handle must be the DispatchHandle returned by dispatch, got tuple"):
        _trace(buf, body, *specs)


# ---------------------------------------------------------------------------------------------------------------
# Context: shard_map over the buffer's axis, the right axis size, an open buffer
# ---------------------------------------------------------------------------------------------------------------
def test_outside_shard_map(buf):
    x, topk = jnp.zeros((T, H), jnp.bfloat16), jnp.zeros((T, K), jnp.int32)
    pattern = r"dispatch must be called inside jax.shard_map over the buffer's mesh axis 'ep'"
    with pytest.raises(ValueError, match=pattern):
        ep.dispatch(buf, x, topk)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda a, b: ep.dispatch(buf, a, b))(x, topk)
    with pytest.raises(ValueError, match=r"combine must be called inside jax.shard_map"):
        ep.combine(buf, jnp.zeros((E_L, ROWS, H), jnp.bfloat16), topk, jnp.zeros((T, K)), None)


def test_shard_map_over_another_axis(buf, make_mesh):
    other = make_mesh((8,), ("tp",))
    fn = jax.jit(jax.shard_map(lambda a, b: ep.dispatch(buf, a, b)[1], mesh=other, in_specs=P("tp"), out_specs=P("tp")))
    x = jax.ShapeDtypeStruct((R * T, H), BF16, sharding=NamedSharding(other, P("tp")))
    t = jax.ShapeDtypeStruct((R * T, K), np.int32, sharding=NamedSharding(other, P("tp")))
    with pytest.raises(ValueError, match=r"axis 'ep' is not bound here"):
        fn.lower(x, t)


def test_mesh_axis_of_another_size(buf, make_mesh):
    small = make_mesh((4,), ("ep",))
    fn = jax.jit(jax.shard_map(lambda a, b: ep.dispatch(buf, a, b)[1], mesh=small, in_specs=P("ep"), out_specs=P("ep")))
    x = jax.ShapeDtypeStruct((4 * T, H), BF16, sharding=NamedSharding(small, P("ep")))
    t = jax.ShapeDtypeStruct((4 * T, K), np.int32, sharding=NamedSharding(small, P("ep")))
    with pytest.raises(ValueError, match=r"mesh axis 'ep' has size 4 here but the buffer was created for 8 ranks"):
        fn.lower(x, t)


def test_used_after_close(mesh8):
    b = ep.Buffer(mesh8, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla")
    _dispatch(b)
    b.close()
    b.close()  # idempotent
    with pytest.raises(ep.BufferClosedError, match=r"is closed; create a new Buffer"):
        _dispatch(b)
    with pytest.raises(ep.BufferClosedError):
        _combine(b)
    with pytest.raises(ep.BufferClosedError):
        b.check()


def test_split_forms_validate_like_the_fused_ops(buf):
    def send(x_spec, topk_spec):
        return _trace(buf, lambda a, b: ep.dispatch_send(buf, a, b).ticket[0], x_spec, topk_spec)

    send(((T, H), BF16), ((T, K), np.int32))  # accepted on every backend
    with pytest.raises(ValueError, match=r"dispatch_send: x has 17 tokens but the buffer holds at most"):
        send(((T + 1, H), BF16), ((T + 1, K), np.int32))
    with pytest.raises(TypeError, match=r"dispatch_send: topk_idx must be int32"):
        send(((T, H), BF16), ((T, K), np.float32))

    def combine_send(topk_rows):
        def body(y, t, w, s, lr, p):
            return ep.combine_send(buf, y, t, w, ep.DispatchHandle(s, lr, p)).ticket

        specs = [((E_L, ROWS, H), BF16), ((topk_rows, K), np.int32), ((topk_rows, K), np.float32)]
        specs += [((E_L, ROWS), np.int32), ((E_L, R, 2), np.int32), ((E_L, ROWS), np.int32)]
        return _trace(buf, body, *specs)

    combine_send(T)
    with pytest.raises(ValueError, match=r"combine_send: topk_idx has 17 tokens but the buffer holds at most"):
        combine_send(T + 1)
    with pytest.raises(TypeError, match=r"dispatch_recv: pending must come from dispatch_send, got tuple"):
        _trace(buf, lambda a: ep.dispatch_recv(buf, (a,))[1], ((T, 1), np.int32))


def test_cuda_options_argument(mesh8):
    with pytest.raises(TypeError, match=r"cuda must be None or jax_ll_ep.CudaOptions, got 'peer'"):
        ep.Buffer(mesh8, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla", cuda="peer")
    # Other backends ignore the cuda options (so that backend="auto" code carries them everywhere).
    with ep.Buffer(
        mesh8, "ep", num_experts=E, max_tokens_per_rank=T, hidden=H, backend="xla", cuda=ep.CudaOptions(trace=True)
    ) as b:
        assert b.backend.name == "xla"


def test_xla_backend_reports_routing_errors_at_check(make_mesh):
    mesh = make_mesh((4,), ("ep",))
    r, e, t, h = 4, 8, 3, 16
    idx = np.tile(np.array([[0, 1]], np.int32), (r * t, 1))
    idx[5] = [7, 42]  # 42 is outside [-1, 8)
    x = np.random.default_rng(0).standard_normal((r * t, h)).astype(np.float32)
    sharding = NamedSharding(mesh, P("ep"))
    with ep.Buffer(mesh, "ep", num_experts=e, max_tokens_per_rank=t, hidden=h, backend="xla") as buf:
        f = jax.jit(
            jax.shard_map(
                lambda x, i: ep.dispatch(buf, x, i)[1], mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")
            )
        )
        counts = np.asarray(f(jax.device_put(jnp.asarray(x), sharding), jax.device_put(jnp.asarray(idx), sharding)))
        # Rank 0 owns experts 0 and 1, chosen by every token but token 5; token 5's bad id 42 was dropped and
        # its expert 7 (rank 3's) still arrived.
        assert counts.reshape(r, e // r)[0].tolist() == [r * t - 1, r * t - 1]
        assert counts.reshape(r, e // r)[3].tolist() == [0, 1]
        # (token 5 of the global array is rank 1's token 2)
        with pytest.raises(ep.RoutingError, match=r"rank 1 of group 0, dispatch call: topk_idx\[2, 1\] = 42 is out"):
            buf.check()
        buf.check()  # cleared
