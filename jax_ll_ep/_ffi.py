"""One JAX primitive for every native call, ordered per buffer by an ordered effect.

Why a primitive and not ``jax.ffi.ffi_call``: calls on one buffer must run in the same order on every rank (the
protocol's sequence numbers depend on it), and ``has_side_effect`` only prevents dead-code elimination; it does not
order two calls that have no data dependency (XLA:CPU even runs independent thunks concurrently). An *ordered*
effect makes JAX thread a token through every call on the buffer, inside ``shard_map``, ``lax.scan``/``while`` and
across separate jitted calls, so the order is the program order by construction. The token arrives at the FFI
handler as its first operand and leaves as its last result (``ffi::Token``); it carries no data.

The same lowering serves the ``cpu`` and ``cuda`` platforms: both native modules register the same target names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax._src import effects
from jax._src.interpreters import mlir
from jax._src.lib.mlir.dialects import hlo
from jax.extend.core import Primitive


class BufferOrderEffect(effects.Effect):
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
    effects.ordered_effects,
    # Each device of a shard_map runs its own copy of the call in program order; that is what we need.
    effects.shardable_ordered_effects,
    effects.lowerable_effects,
    effects.control_flow_allowed_effects,
    effects.custom_derivatives_allowed_effects,
    effects.remat_allowed_effects,
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
    op = mlir.custom_call(
        target,
        result_types=[*result_types, hlo.TokenType.get()],
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
        args = hlo.OptimizationBarrierOp(list(args)).results
    outs = _lowering(ctx, *args, **params)
    return list(hlo.OptimizationBarrierOp(outs).results) if outs else outs


mlir.register_lowering(native_call_p, _lowering, platform="cpu")
mlir.register_lowering(native_call_p, _cuda_lowering, platform="cuda")


def native_call(target: str, args: Sequence, result_avals: Sequence, *, buffer_id: int, **attrs):
    """Binds one ordered native call. ``attrs`` values must be numpy scalars (np.int32, np.float64, ...)."""
    return native_call_p.bind(
        *args,
        target=target,
        result_avals=tuple(result_avals),
        buffer_id=int(buffer_id),
        attrs=tuple(sorted(attrs.items())),
    )
