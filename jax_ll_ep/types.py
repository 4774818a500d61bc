"""The pytrees the ops return: FP8 payloads, the dispatch handle, and the tickets of the split forms."""

from __future__ import annotations

from typing import NamedTuple

import jax

from .config import Fp8Options


class DroppedPairs(NamedTuple):
    """(token, expert) pairs one rank dropped because their expert's rank was masked (``Buffer.dropped_pairs``):
    in its most recent call, and in every call since the buffer was created."""

    last_call: int
    total: int


class Fp8Array(NamedTuple):
    """FP8 payload: ``data`` [..., H] float8_e4m3fn and ``scale`` [..., H/128] (float32, or float8_e8m0fnu for
    UE8M0); the value is ``data * scale`` per 128-channel block."""

    data: jax.Array
    scale: jax.Array


class DispatchHandle(NamedTuple):
    """What combine needs to send rows back. Arrays, so it flows through jit/scan like any pytree.

    src_info:     [E_l, R*T] int32, the source token index of each received row.
    layout_range: [E_l, R, 2] int32, (offset, count) of each source rank's rows within a local expert.
    src_topk_pos: [E_l, R*T] int32, the position k of this expert in the source token's top-k row.
    """

    src_info: jax.Array
    layout_range: jax.Array
    src_topk_pos: jax.Array


@jax.tree_util.register_pytree_node_class
class DispatchPending:
    """Returned by dispatch_send; pass it to dispatch_recv. ``fp8`` is static (part of the tree structure).

    ``ticket`` is what the receive half needs from its send half: on the native backends the call's ticket (int32[1]:
    its sequence number, checked by the receive half), on the ``xla`` backend the rows the send half exchanged (a
    tuple of arrays). Either way it orders the receive after its send through data flow.
    """

    def __init__(self, ticket, fp8: Fp8Options | None):
        self.ticket = ticket
        self.fp8 = fp8

    def tree_flatten(self):
        return (self.ticket,), self.fp8

    @classmethod
    def tree_unflatten(cls, fp8, children):
        return cls(children[0], fp8)


class CombinePending(NamedTuple):
    """Returned by combine_send; pass it to combine_recv. ``ticket`` as in :class:`DispatchPending` (on the ``xla``
    backend: the expert outputs sent home, [R, n, K, H])."""

    ticket: jax.Array
    topk_idx: jax.Array
    topk_weights: jax.Array
