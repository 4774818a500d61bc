"""Every use of JAX internals (``jax._src``) in jax_ll_ep, each with the reason no public API serves:

1. The ordered native call. Calls on one buffer must run in the same order on every rank (the protocol's sequence
   numbers depend on it). ``jax.ffi.ffi_call(..., has_side_effect=True)`` only prevents dead-code elimination; it does
   not order two calls that have no data dependency (XLA:CPU even runs independent thunks concurrently). An *ordered*
   effect makes JAX thread a token through every call on the buffer, inside ``shard_map``, ``lax.scan``/``while`` and
   across separate jitted calls, so the order is the program order by construction. The token arrives at the FFI
   handler as its first operand and leaves as its last result (``ffi::Token``); it carries no data. Public JAX has
   the base class of effects (``jax.extend.core.Effect``) but no way to declare an effect ordered, shardable,
   allowed in control flow, custom derivatives and remat (``jax._src.effects``), and ``jax.ffi.ffi_call`` cannot
   take or return a token, so the custom call is built with ``jax._src.interpreters.mlir.custom_call``.
2. Forgetting a failed call's token (:func:`settle_order_token`): JAX keeps the ordered effects' runtime tokens in
   ``jax._src.dispatch.runtime_tokens``, with no public way to drop one.
3. The distributed key-value client (:func:`distributed_client`): ``jax.distributed`` initializes it but does not
   expose it; multi-process buffers bootstrap through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch as _dispatch
from jax._src import distributed as _distributed
from jax._src import effects as _effects
from jax._src.interpreters import mlir as _private_mlir
from jax.extend.core import Effect, Primitive
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir


# ---------------------------------------------------------------------------------------------------------------
# 1. The ordered native call
# ---------------------------------------------------------------------------------------------------------------
class BufferOrderEffect(Effect):
    """Orders every native call on one buffer (identified by its registry handle)."""

    def __init__(self, buffer_id: int):
        self.buffer_id = buffer_id

    def __eq__(self, other):
        return isinstance(other, BufferOrderEffect) and other.buffer_id == self.buffer_id

    def __hash__(self):
        return hash((BufferOrderEffect, self.buffer_id))

    def __repr__(self):
        return f"BufferOrderEffect({self.buffer_id})"


for _effect_set in (
    _effects.ordered_effects,
    # Each device of a shard_map runs its own copy of the call in program order; that is what we need.
    _effects.shardable_ordered_effects,
    _effects.lowerable_effects,
    _effects.control_flow_allowed_effects,
    _effects.custom_derivatives_allowed_effects,
    _effects.remat_allowed_effects,
):
    _effect_set.add_type(BufferOrderEffect)


native_call_p = Primitive("jax_ll_ep_native_call")
native_call_p.multiple_results = True


def _abstract_eval(*args, target, result_avals, buffer_id, attrs):
    del args, target, attrs
    return list(result_avals), {BufferOrderEffect(buffer_id)}


native_call_p.def_effectful_abstract_eval(_abstract_eval)


def _attribute(value):
    # Attribute dtypes are strict on the C++ side: pass numpy scalars of the decoded type.
    if isinstance(value, (np.integer, np.floating)):
        return mlir.ir_attribute(value)
    raise TypeError(f"native attribute {value!r} must be a numpy scalar")


def _lowering(ctx, *args, target, result_avals, buffer_id, attrs):
    effect = BufferOrderEffect(buffer_id)
    token_in = ctx.tokens_in.get(effect)
    result_types = [mlir.aval_to_ir_type(ctx.module_context, aval) for aval in result_avals]
    backend_config = {"buffer_id": mlir.ir_attribute(np.int64(buffer_id))}
    backend_config.update({name: _attribute(value) for name, value in attrs})
    op = _private_mlir.custom_call(
        target,
        result_types=[*result_types, stablehlo.TokenType.get()],
        operands=[token_in, *args],
        backend_config=backend_config,
        api_version=4,
        has_side_effect=True,
    )
    ctx.set_tokens_out(mlir.TokenSet({effect: op.results[-1]}))
    return list(op.results[:-1])


def _cuda_lowering(ctx, *args, **params):
    # XLA:GPU's dynamic-slice-fusion rewriter wraps a custom call whose operands are dynamic slices (or whose results
    # feed dynamic-update-slices, as in lax.scan) into a fusion; with our token result that fusion crashes the
    # compiler (jax 0.11.2: "Check failed: shape.IsArray() || shape.IsTuple()" in GpuHloCostAnalysis). Optimization
    # barriers on the array operands and results keep the rewriter away; they cost no copy.
    if args:
        args = stablehlo.OptimizationBarrierOp(list(args)).results
    outs = _lowering(ctx, *args, **params)
    return list(stablehlo.OptimizationBarrierOp(outs).results) if outs else outs


mlir.register_lowering(native_call_p, _lowering, platform="cpu")
mlir.register_lowering(native_call_p, _cuda_lowering, platform="cuda")


def native_call(target: str, args: Sequence, result_avals: Sequence, *, buffer_id: int, **attrs):
    """Binds one native call, ordered after every earlier call on ``buffer_id``. ``attrs`` values must be numpy
    scalars (np.int32, np.float64, ...)."""
    return native_call_p.bind(
        *args,
        target=target,
        result_avals=tuple(result_avals),
        buffer_id=int(buffer_id),
        attrs=tuple(sorted(attrs.items())),
    )


def aval(like: jax.Array, shape, dtype):
    """A result type for :func:`native_call` that keeps the caller's varying-manual-axes type, so shard_map's checks
    pass."""
    return jax.typeof(like).update(shape=tuple(shape), dtype=jnp.dtype(dtype), weak_type=False)


# ---------------------------------------------------------------------------------------------------------------
# 2. A failed call's ordering token
# ---------------------------------------------------------------------------------------------------------------
def settle_order_token(buffer_id: int) -> None:
    """Waits until every program dispatched on the buffer (by this thread) has finished on all local devices; if the
    last one failed, forgets its ordering token.

    JAX threads one runtime token per ordered effect through the programs that carry it (one per buffer). When a
    program fails (a timeout, a routing error), that token holds the failure, and JAX would refuse every later call
    on the buffer with it, and print it again at exit. The failure has already been raised where the program's
    results were awaited, and the protocol state is consistent after routing errors and split misuse (and a
    timed-out buffer says so itself), so the token is dropped once the failed program has finished on every device.
    """
    tokens = _dispatch.runtime_tokens
    effect = BufferOrderEffect(buffer_id)
    token = tokens.current_tokens.get(effect)
    if token is None:
        return
    try:
        token.block_until_ready()  # ready once the last program on the buffer is done on every local device
    except Exception:  # noqa: BLE001 - that failure was reported to the caller already; the record says what it was
        tokens.current_tokens.pop(effect, None)
        # The per-device tokens of that program carry the same failure (JAX only waits on them at exit).
        for device, device_token in list(tokens.output_runtime_tokens.items()):
            try:
                device_token.block_until_ready()
            except Exception:  # noqa: BLE001
                tokens.output_runtime_tokens.pop(device, None)


# ---------------------------------------------------------------------------------------------------------------
# 3. The distributed key-value client
# ---------------------------------------------------------------------------------------------------------------
def distributed_client():
    """The client ``jax.distributed.initialize`` created (None before it, or after shutdown)."""
    return _distributed.global_state.client
