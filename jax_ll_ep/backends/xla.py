"""The ``xla`` backend: dispatch and combine in pure JAX, over ``jax.lax.all_to_all``.

jax_ll_ep.ops calls :class:`XlaBackend`'s ops inside ``jax.shard_map`` over the buffer's axis, on this rank's local
shard, after validating shapes and dtypes. The results follow the contract of jax_ll_ep.ops bit for bit (the same as
the ``cpu`` and ``cuda`` backends and the NumPy oracle in tests/oracle.py).

How it works. Each (token, choice k) is one *slot*. A rank builds a send buffer of [R, n, K] slots, where slot
(d, t, k) carries token t if its k-th expert lives on rank d: a fixed capacity of n <= T slots per (destination rank,
k), so nothing can ever be dropped. One ``all_to_all`` moves the buffer (payload plus each slot's local expert id);
the receiver then computes, from the ids alone, where each arrived slot goes in the [E_l, R*T, ...] layout (by source
rank, then source token) and moves the payload there with one gather. Combine builds the inverse map from the handle,
gathers the expert outputs back into [R, n, K] slots, sends them home with one ``all_to_all`` and reduces them in
float32 in k order.

The split forms cut each op where the native backends do: the send half is the exchange (``all_to_all``), the
receive half builds the layout (dispatch) or reduces (combine). The exchanged rows travel in the pending value, so
a receive is ordered after its send by data flow. The buffer holds no memory, so nothing can be overwritten between
the halves; the rule of the native backends (each send followed by its receive before the next send on the buffer)
costs nothing here and keeps the same program correct on every backend.

Data moves only by gathers (whose transpose is a scatter-add), so ``jax.grad`` through bf16 dispatch and through
combine is plain JAX autodiff. FP8 dispatch is forward-only and raises if differentiated.

Floating point: the contract fixes every rounding step, and XLA rewrites some of them unless told not to:
  - fp8 quantization divides by integer long division (jax_ll_ep/fp8.py);
  - XLA:CPU lets LLVM contract ``acc + w * y`` into an FMA ("always allow FMA fusion"), which skips the rounding of
    the product; the products are therefore materialized behind an ``optimization_barrier`` before the adds;
  - ``0 + p`` is simplified to ``p``, which is wrong for ``p = -0.0`` (IEEE gives +0.0); the initial zero
    accumulator crosses the same barrier.
tests/test_reference.py checks each of them against the oracle bit for bit (on GPU too, marked ``gpu``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .. import _extension
from ..config import BufferConfig, Fp8Options
from ..errors import RoutingError
from ..fp8 import quantize_fp8
from ..types import CombinePending, DispatchHandle, DispatchPending, Fp8Array


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------
def sanitize_topk(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """Ids outside [0, E) and repeats of an expert within a row (after its first occurrence) become -1, so bad
    routing can never address a slot out of bounds or twice."""
    in_range = (topk_idx >= 0) & (topk_idx < num_experts)
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]  # [n, K, K]: same[t, k, j]
    earlier = jnp.tril(jnp.ones((k, k), bool), k=-1)  # j < k
    repeated = jnp.any(same & earlier & in_range[:, None, :], axis=-1)
    return jnp.where(in_range & ~repeated, topk_idx, -1)


def _report_routing_errors(topk_idx: jax.Array, num_experts: int, place, on_error: Callable) -> None:
    """Calls ``on_error(group, rank, code, expert, token, topk_pos)`` on the host for the first bad entry of this
    rank's call, if any: an id outside [-1, E) ("invalid_expert") or an expert repeated within a row
    ("duplicate_expert"). ``place``: this shard's (group, rank), traced. A clean call costs one reduction and a
    branch; only a bad one reaches the host."""
    invalid = (topk_idx < -1) | (topk_idx >= num_experts)
    k = topk_idx.shape[1]
    same = topk_idx[:, :, None] == topk_idx[:, None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), k=-1)
    duplicate = jnp.any(same & earlier, axis=-1) & (topk_idx >= 0) & ~invalid
    any_invalid, any_duplicate = jnp.any(invalid), jnp.any(duplicate)
    flat = jnp.where(any_invalid, invalid, duplicate).reshape(-1)
    entry = jnp.argmax(flat)  # the first offending entry in (token, k) order
    expert = topk_idx.reshape(-1)[entry]

    def on_host(any_invalid, expert, entry, group, rank):
        code = "invalid_expert" if any_invalid else "duplicate_expert"
        on_error(int(group), int(rank), code, int(expert), int(entry) // k, int(entry) % k)

    def report(*values):
        jax.debug.callback(on_host, *values)

    jax.lax.cond(any_invalid | any_duplicate, report, lambda *_: None, any_invalid, expert, entry, *place)


def _all_to_all(x: jax.Array, axis_name: str) -> jax.Array:
    """out[s] = what rank s put at index (this rank) of its x: the exchange of a [R, ...] send buffer."""
    return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0)


def _slot_layout(config: BufferConfig, recv_expert: jax.Array):
    """Where each received slot goes in the [E_l, R*T] layout.

    recv_expert: [R, n, K] int32, the local expert of slot (source rank, token, k), -1 if empty.
    Returns (src_slot [E_l, R*T]: the flat index r*n*K + t*K + k of the slot each row holds, or R*n*K past
    recv_count; recv_count [E_l]; layout_range [E_l, R, 2]).
    """
    num_ranks, n, k = recv_expert.shape
    e_l, rows = config.num_local_experts, config.recv_rows
    # chosen[e, r, t, k]: slot (r, t, k) targets local expert e (at most one k per (e, r, t)).
    chosen = recv_expert[None] == jnp.arange(e_l, dtype=jnp.int32)[:, None, None, None]
    present = jnp.any(chosen, axis=-1).astype(jnp.int32)  # [E_l, R, n]
    counts = jnp.sum(present, axis=-1)  # [E_l, R]
    offsets = jnp.cumsum(counts, axis=-1) - counts  # rows of the ranks before r (also for empty ranges)
    # Row of (e, r, t): ranks before r, then tokens of r before t (so rows are by source rank, then token).
    row_of = offsets[:, :, None] + jnp.cumsum(present, axis=-1) - present  # [E_l, R, n]
    slot_row = jnp.where(chosen, row_of[..., None], rows)  # [E_l, R, n, K]; `rows` is out of bounds
    slot_id = jnp.arange(num_ranks * n * k, dtype=jnp.int32).reshape(num_ranks, n, k)
    expert_id = jnp.broadcast_to(jnp.arange(e_l, dtype=jnp.int32)[:, None, None, None], chosen.shape)
    # Integer scatter of the permutation only; data moves by the gather in the caller.
    src_slot = jnp.full((e_l, rows), num_ranks * n * k, jnp.int32)
    src_slot = src_slot.at[expert_id, slot_row].set(jnp.broadcast_to(slot_id, chosen.shape), mode="drop")
    layout_range = jnp.stack([offsets, counts], axis=-1).astype(jnp.int32)
    return src_slot, jnp.sum(counts, axis=-1).astype(jnp.int32), layout_range


def _gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] along axis 0; out-of-range indices give zero rows (and are never read)."""
    if table.shape[0] == 0:  # no tokens on any rank: every index is out of range
        return jnp.zeros((*index.shape, *table.shape[1:]), table.dtype)
    return jnp.take(table, index, axis=0, mode="fill", fill_value=0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: the exchange (send half), then the layout (receive half)
# ---------------------------------------------------------------------------------------------------------------
def _dispatch_exchange(config: BufferConfig, fp8: Fp8Options | None, x: jax.Array, topk_idx: jax.Array):
    """Sends every (token, k) slot to the rank owning its expert. Returns (recv_expert [R, n, K], the received
    payloads: one [R*n*K, width] array, or fp8 data and scales)."""
    n = x.shape[0]
    k = topk_idx.shape[1]
    num_ranks, e_l, axis = config.num_ranks, config.num_local_experts, config.axis_name
    topk_idx = sanitize_topk(topk_idx, config.num_experts)
    dest = jnp.where(topk_idx >= 0, topk_idx // e_l, -1)  # [n, K]
    # The payload is cast (or quantized) once per token, then copied into every slot that sends it.
    payloads = [x] if fp8 is None else list(quantize_fp8(x, fp8))
    to_rank = dest[None] == jnp.arange(num_ranks, dtype=jnp.int32)[:, None, None]  # [R, n, K]
    send_expert = jnp.where(to_rank, topk_idx % e_l, -1)
    recv_expert = _all_to_all(send_expert, axis)  # [R_src, n, K]
    received = []
    for p in payloads:
        width = p.shape[-1]
        send = jnp.where(to_rank[..., None], p[None, :, None, :], jnp.zeros((), p.dtype))  # [R, n, K, width]
        received.append(_all_to_all(send, axis).reshape(num_ranks * n * k, width))
    return recv_expert, tuple(received)


def _dispatch_layout(config: BufferConfig, fp8: Fp8Options | None, recv_expert: jax.Array, received):
    """Places the received slots in the [E_l, R*T, ...] layout. Returns (recv_x, recv_count, DispatchHandle)."""
    num_ranks, n, k = recv_expert.shape
    src_slot, recv_count, layout_range = _slot_layout(config, recv_expert)
    rows = [_gather_rows(recv, src_slot) for recv in received]  # [E_l, R*T, width] each
    valid = src_slot < num_ranks * n * k
    src_info = jnp.where(valid, (src_slot // k) % n, 0).astype(jnp.int32)
    src_topk_pos = jnp.where(valid, src_slot % k, 0).astype(jnp.int32)
    recv_x = rows[0] if fp8 is None else Fp8Array(*rows)
    return recv_x, recv_count, DispatchHandle(src_info, layout_range, src_topk_pos)


def _dispatch(config: BufferConfig, fp8: Fp8Options | None, x: jax.Array, topk_idx: jax.Array):
    return _dispatch_layout(config, fp8, *_dispatch_exchange(config, fp8, x, topk_idx))


def _forward_only(fn):
    """``fn(config, fp8, x, topk_idx)`` whose derivative raises: fp8 quantization has no useful derivative."""
    wrapped = jax.custom_jvp(fn, nondiff_argnums=(0, 1))

    @wrapped.defjvp
    def _jvp(config, fp8, primals, tangents):
        del config, primals, tangents
        raise NotImplementedError(
            f"jax_ll_ep.dispatch with fp8={fp8!r} is forward-only: fp8 quantization has no useful derivative. "
            "Differentiate a bf16 dispatch (fp8=None), or stop the gradient at its input (jax.lax.stop_gradient(x))."
        )

    return wrapped


_dispatch_fp8 = _forward_only(_dispatch)
_dispatch_exchange_fp8 = _forward_only(_dispatch_exchange)


def dispatch(config: BufferConfig, x: jax.Array, topk_idx: jax.Array, *, fp8: Fp8Options | None):
    """This rank's part of dispatch. x: [n, H] bfloat16, topk_idx: [n, K] int32 (validated by jax_ll_ep.ops).

    Returns ``(recv_x [E_l, R*T, H] (or Fp8Array), recv_count [E_l], DispatchHandle)``. Rows past recv_count are
    zero here (the contract leaves them unspecified). Bad ids are treated as -1 (a repeated expert keeps its first
    occurrence).
    """
    return (_dispatch if fp8 is None else _dispatch_fp8)(config, fp8, x, topk_idx)


# ---------------------------------------------------------------------------------------------------------------
# Combine: the way back (send half), then the reduction (receive half)
# ---------------------------------------------------------------------------------------------------------------
def _combine_exchange(config: BufferConfig, y: jax.Array, topk_idx: jax.Array, handle: DispatchHandle) -> jax.Array:
    """Sends every valid row of y back to its source slot. Returns [R_owner, n, K, H]: for this rank's token t and
    choice k, the row from rank d if d owns that expert."""
    n, k = topk_idx.shape
    num_ranks, e_l, rows, axis = config.num_ranks, config.num_local_experts, config.recv_rows, config.axis_name
    hidden = y.shape[-1]
    num_slots = num_ranks * n * k
    # Inverse of dispatch's layout: which row of y goes to slot (source rank, token, k).
    offsets, counts = handle.layout_range[..., 0], handle.layout_range[..., 1]  # [E_l, R]
    row = jnp.arange(rows, dtype=jnp.int32)
    ends = offsets + counts
    # source rank of row j = number of ranks whose range ends at or before j (empty ranges end where they start)
    src_rank = jnp.sum(ends[:, None, :] <= row[None, :, None], axis=-1).astype(jnp.int32)  # [E_l, R*T]
    token, pos = handle.src_info, handle.src_topk_pos
    valid = (
        (row[None, :] < jnp.sum(counts, axis=-1, keepdims=True)) & (token >= 0) & (token < n) & (pos >= 0) & (pos < k)
    )
    slot = jnp.where(valid, (src_rank * n + token) * k + pos, num_slots)
    row_id = jnp.arange(e_l * rows, dtype=jnp.int32).reshape(e_l, rows)
    src_row = jnp.full((num_slots,), e_l * rows, jnp.int32).at[slot].set(row_id, mode="drop")
    send = _gather_rows(y.reshape(e_l * rows, hidden), src_row).reshape(num_ranks, n, k, hidden)
    return _all_to_all(send, axis)


def _combine_reduce(config: BufferConfig, back: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array):
    """``out[t] = bf16(acc)``, ``acc = 0; for k: if topk_idx[t,k] >= 0: acc = acc + float32(w[t,k] * y_row)``."""
    n, k = topk_idx.shape
    hidden = back.shape[-1]
    topk_idx = sanitize_topk(topk_idx, config.num_experts)
    chosen = topk_idx >= 0
    owner = jnp.where(chosen, topk_idx // config.num_local_experts, 0)
    y_rows = back[owner, jnp.arange(n)[:, None], jnp.arange(k)[None, :]]  # [n, K, H]
    # Weights of unchosen k may be anything (even NaN): zero them so neither the value nor its gradient sees them.
    weights = jnp.where(chosen, topk_weights, 0.0)
    products = weights[..., None] * y_rows.astype(jnp.float32)  # [n, K, H], each rounded to float32
    # The barrier materializes the products before the adds, so XLA:CPU cannot contract them into FMAs; and it
    # hides that acc starts at +0.0, so XLA cannot fold `0 + p` into `p` (which differs for p = -0.0).
    acc, products = jax.lax.optimization_barrier((jnp.zeros((n, hidden), jnp.float32), products))
    for j in range(k):  # in k order, as the contract fixes it
        acc = jnp.where(chosen[:, j, None], acc + products[:, j], acc)
    return acc.astype(jnp.bfloat16)


def combine(config: BufferConfig, y, topk_idx, topk_weights, handle: DispatchHandle) -> jax.Array:
    """This rank's part of combine. y: [E_l, R*T, H] bfloat16 in the layout of ``handle``; rows past recv_count are
    never read. Returns [n, H] bfloat16."""
    return _combine_reduce(config, _combine_exchange(config, y, topk_idx, handle), topk_idx, topk_weights)


# ---------------------------------------------------------------------------------------------------------------
# The backend object
# ---------------------------------------------------------------------------------------------------------------
class XlaBackend:
    """A buffer of the ``xla`` backend: no memory outside XLA. Its dispatch treats bad ids as -1 and reports the
    first of each rank's call through a host callback; ``check()`` raises them.

    Masking is only the dropped-pair rule here (nothing waits on peers, so nothing can time out): ids routed to a
    masked rank's experts become -1, and a masked rank's own ids all do (it sends and receives nothing). The mask is
    part of the traced program, so ``mask_ranks`` clears JAX's caches and programs are traced again."""

    name = "xla"
    region_bytes = 0

    def __init__(self, config: BufferConfig, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self._errors_lock = threading.Lock()
        self._routing_errors: list[tuple] = []
        self._masked: tuple[int, ...] = ()

    # ---- masking ----
    def mask_ranks(self, ranks: tuple[int, ...]) -> None:
        jax.effects_barrier()
        if ranks != self._masked:
            self._masked = ranks
            jax.clear_caches()  # the mask is a constant of every program traced with it

    def masked_ranks(self) -> tuple[int, ...]:
        return self._masked

    def dropped_pairs(self):
        raise NotImplementedError(
            "the xla backend does not count dropped pairs (its mask is only the dropped-pair rule); use the cpu or "
            "cuda backend"
        )

    def _mask(self, topk_idx):
        """topk_idx with every id routed to a masked rank's experts, and every id of a masked rank, set to -1."""
        if not self._masked:
            return topk_idx
        owner = jnp.where(topk_idx >= 0, topk_idx // self.config.num_local_experts, -1)
        dropped = jnp.isin(owner, jnp.asarray(self._masked, jnp.int32)) | self._self_masked()
        return jnp.where(dropped, -1, topk_idx)

    def _self_masked(self):
        """(traced, inside shard_map) whether the calling rank is masked."""
        return jnp.isin(jax.lax.axis_index(self.config.axis_name), jnp.asarray(self._masked, jnp.int32))

    # ---- lifecycle ----
    def check(self) -> None:
        jax.effects_barrier()  # the host callbacks of calls already dispatched have run
        with self._errors_lock:
            errors, self._routing_errors = self._routing_errors, []
        if not errors:
            return
        messages = []
        for group, rank, code, expert, token, topk_pos in sorted(set(errors)):
            messages.append(
                _extension.describe_routing_error(
                    code,
                    group=group,
                    rank=rank,
                    expert=expert,
                    token=token,
                    topk_pos=topk_pos,
                    num_experts=self.config.num_experts,
                )
            )
        raise RoutingError("jax_ll_ep xla backend: " + "; ".join(messages))

    def close(self) -> None:
        pass

    # ---- ops ----
    def _place(self):
        """(group, rank) of this shard, traced: rank on the buffer's axis, group over the other axes of the mesh
        (-1 where one of them is not bound here)."""
        rank = jax.lax.axis_index(self.config.axis_name)
        group = jnp.int32(0)
        for name in self.mesh.axis_names:
            if name == self.config.axis_name:
                continue
            try:
                group = group * self.mesh.shape[name] + jax.lax.axis_index(name)
            except NameError:
                return jnp.int32(-1), rank
        return group, rank

    def _on_routing_error(self, *record) -> None:
        with self._errors_lock:
            self._routing_errors.append(record)

    def _report(self, topk_idx) -> None:
        if self._masked:  # a masked rank's own ids are not read (as on the native backends)
            topk_idx = jnp.where(self._self_masked(), -1, topk_idx)
        _report_routing_errors(topk_idx, self.config.num_experts, self._place(), self._on_routing_error)

    def dispatch(self, x, topk_idx, fp8: Fp8Options | None):
        self._report(topk_idx)
        return dispatch(self.config, x, self._mask(topk_idx), fp8=fp8)

    def combine(self, y, topk_idx, topk_weights, handle: DispatchHandle):
        return combine(self.config, y, self._mask(topk_idx), topk_weights, handle)

    def dispatch_send(self, x, topk_idx, fp8: Fp8Options | None) -> DispatchPending:
        self._report(topk_idx)
        exchange = _dispatch_exchange if fp8 is None else _dispatch_exchange_fp8
        return DispatchPending(exchange(self.config, fp8, x, self._mask(topk_idx)), fp8)

    def dispatch_recv(self, pending: DispatchPending):
        recv_expert, received = pending.ticket
        return _dispatch_layout(self.config, pending.fp8, recv_expert, received)

    def combine_send(self, y, topk_idx, topk_weights, handle: DispatchHandle) -> CombinePending:
        topk_idx = self._mask(topk_idx)
        return CombinePending(_combine_exchange(self.config, y, topk_idx, handle), topk_idx, topk_weights)

    def combine_recv(self, pending: CombinePending):
        return _combine_reduce(self.config, pending.ticket, pending.topk_idx, pending.topk_weights)
