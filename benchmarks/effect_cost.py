"""What an effect costs a jitted call on the host: JAX's dispatch of a tiny program (``x + 1``) with no effect, with
an unordered effect, and with an ordered one (the kind jax_ll_ep's ops carry: the buffer's ordering token).

    python benchmarks/effect_cost.py [--calls 2000]

Each effect comes from a primitive that lowers to nothing, so only JAX's own paths are timed: any effect keeps a
call off jit's C++ fast path, and an ordered one adds the runtime token's handling on every call. Runs on any
platform (set JAX_PLATFORMS). A probe of JAX itself, so it declares its effect kinds through ``jax._src``, which
the library proper keeps to ``jax_ll_ep/_jax_internals.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import effects as _effects
from jax._src.interpreters import mlir
from jax.extend.core import Effect, Primitive


class OrderedProbe(Effect):
    def __eq__(self, other):
        return isinstance(other, OrderedProbe)

    def __hash__(self):
        return hash(OrderedProbe)


class UnorderedProbe(Effect):
    def __eq__(self, other):
        return isinstance(other, UnorderedProbe)

    def __hash__(self):
        return hash(UnorderedProbe)


for _set in (_effects.lowerable_effects, _effects.control_flow_allowed_effects):
    _set.add_type(OrderedProbe)
    _set.add_type(UnorderedProbe)
_effects.ordered_effects.add_type(OrderedProbe)
_effects.shardable_ordered_effects.add_type(OrderedProbe)


def probe_primitive(effect: Effect) -> Primitive:
    """x -> x, carrying `effect`; an ordered effect's token passes through unchanged."""
    prim = Primitive(f"effect_probe_{type(effect).__name__}")
    prim.def_effectful_abstract_eval(lambda x: (x, {effect}))

    def lower(ctx, x):
        if isinstance(effect, OrderedProbe):
            ctx.set_tokens_out(mlir.TokenSet({effect: ctx.tokens_in.get(effect)}))
        return [x]

    mlir.register_lowering(prim, lower)
    return prim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    ordered, unordered = probe_primitive(OrderedProbe()), probe_primitive(UnorderedProbe())
    x = jnp.ones((4,), jnp.float32)
    programs = {
        "no effect": jax.jit(lambda x: x + 1),
        "unordered effect": jax.jit(lambda x: unordered.bind(x) + 1),
        "ordered effect": jax.jit(lambda x: ordered.bind(x) + 1),
    }
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.calls} calls each")
    for name, fn in programs.items():
        for _ in range(10):
            jax.block_until_ready(fn(x))
        sync = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            out = fn(x)
        jax.block_until_ready(out)
        queued = (time.perf_counter() - t0) / args.calls
        print(f"{name:17s} one call at a time: median {np.median(sync) * 1e6:7.1f} us; queued: {queued * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
