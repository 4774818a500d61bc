"""What the two native backends (cpu and cuda) share: their ops as ordered FFI calls (the targets of
xla_ffi/ffi/targets.h, the same names on both platforms), the mesh's groups, and the typed exception for the error
records their extension modules return (worded by xla_ffi/include/jax_ll_ep/errors.h), and the agreement of
``mask_ranks`` across processes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import autodiff
from .._extension import SCALE_BLOCK
from .._jax_internals import aval, distributed_client, native_call, settle_order_token
from ..config import BufferConfig, Fp8Options, fp8_mode_code
from ..errors import JaxLlEpError, ProtocolTimeoutError, RanksMaskedError, RoutingError, SequenceMismatchError
from ..types import CombinePending, DispatchHandle, DispatchPending, DroppedPairs, Fp8Array

_MASK_TIMEOUT_MS = 120_000  # how long mask_ranks waits for the other live processes


def device_groups(mesh: Mesh, axis_name: str) -> np.ndarray:
    """[G, R] array of the mesh's devices: row g is group g (a slice of the mesh along the other axes, in mesh
    order), column r is rank r on ``axis_name``."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
    return devices.reshape(-1, mesh.shape[axis_name])


# Which record check() raises when several ranks hold one: the root cause first. A rank that detected a sequence
# mismatch explains why its peers timed out; timeouts are the least specific.
_ROOT_CAUSE_FIRST = {
    "sequence_mismatch": 0,
    "invalid_expert": 1,
    "duplicate_expert": 1,
    "invalid_handle": 2,
    "split_misuse": 3,
    "timeout": 4,
    "ranks_masked": 5,
    "buffer_unusable": 6,
}


def exception(backend: str, records: list[dict]) -> JaxLlEpError:
    """The typed exception for the error records of one or more ranks (root cause first). A record is what the
    extension modules return: code, op, seq, count, missing, message (xla_ffi/ffi/records.h)."""
    records = sorted(records, key=lambda rec: _ROOT_CAUSE_FIRST.get(rec["code"], 6))  # stable: then (group, rank)
    first = records[0]
    lines = [rec["message"] + (f" (+{rec['count'] - 1} later errors)" if rec["count"] > 1 else "") for rec in records]
    message = f"jax_ll_ep {backend} backend: " + "; ".join(lines)
    code = first["code"]
    if code in ("timeout", "ranks_masked"):
        missing = sorted({tuple(pair) for rec in records if rec["code"] == code for pair in rec["missing"]})
        if code == "ranks_masked":
            masked = tuple(sorted({rank for rank, _ in missing}))
            return RanksMaskedError(
                message, op=first["op"], seq=int(first["seq"]), missing=tuple(missing), masked=masked
            )
        return ProtocolTimeoutError(message, op=first["op"], seq=int(first["seq"]), missing=tuple(missing))
    if code == "sequence_mismatch":
        return SequenceMismatchError(message)
    if code in ("invalid_expert", "duplicate_expert"):
        return RoutingError(message)
    return JaxLlEpError(message)


def barrier_among(client, key: str, processes: list[int], timeout_ms: int) -> None:
    """jax.distributed's barrier `key` over `processes` (every process of the job: the plain barrier; fewer once
    mask_ranks has left a process out, which may be gone)."""
    everyone = processes == list(range(jax.process_count()))
    client.wait_at_barrier(key, timeout_ms, None if everyone else processes)


class NativeBackend:
    """The ops of a native backend. A subclass sets ``name``, owns the memory the handle names, and reads and sets
    its ranks' mask state (``_mask_states``, ``_set_mask``)."""

    name = ""

    def __init__(self, config: BufferConfig, handle: int, groups: np.ndarray):
        self.config = config
        self.handle = handle
        # The processes holding each rank (position on the axis) in some group: who must take part in mask_ranks.
        self._owners = {r: {int(d.process_index) for d in groups[:, r]} for r in range(groups.shape[1])}
        self._mask_rounds = 0
        self._agreed_mask: tuple[int, ...] = ()  # the ranks of the last mask_ranks

    # ----------------------------------------------------------------------------------------------------------
    # Masking (the state itself lives in each rank's region; see the subclasses)
    # ----------------------------------------------------------------------------------------------------------
    def _mask_states(self) -> list[dict]:
        """Per local rank, after its calls have finished: group, rank, masked, dropped_last, dropped_total, seq,
        open_seq."""
        raise NotImplementedError

    def _set_mask(self, ranks: tuple[int, ...], seq: int) -> None:
        """Every local rank: this mask, this last completed call, the sticky refusal cleared."""
        raise NotImplementedError

    def masked_ranks(self) -> tuple[int, ...]:
        settle_order_token(self.handle)
        return tuple(sorted({r for state in self._mask_states() for r in state["masked"]}))

    def dropped_pairs(self) -> dict[tuple[int, int], DroppedPairs]:
        settle_order_token(self.handle)
        return {
            (s["group"], s["rank"]): DroppedPairs(int(s["dropped_last"]), int(s["dropped_total"]))
            for s in self._mask_states()
        }

    def mask_ranks(self, ranks: tuple[int, ...]) -> None:
        """Collective over the live processes (those holding a rank left unmasked; a process whose ranks are all
        masked applies the mask on its own). Each waits for its calls on the buffer, then they exchange the list and
        their last completed call through the JAX distributed key-value store: the lists must agree, and every rank
        continues from the latest call any of them completed, so sequence numbers line up again after a timeout
        (every signal any of them stored is then older than the next call). Having read every participant's entry,
        a process knows every participant is idle on this buffer, so it may start calling at once."""
        settle_order_token(self.handle)
        states = self._mask_states()
        open_calls = [(s["group"], s["rank"], s["open_seq"]) for s in states if s["open_seq"]]
        if open_calls:
            raise RuntimeError(
                f"mask_ranks: (group, rank, seq) {open_calls} have a split call open; finish it with its receive "
                "half first"
            )
        seq = max(int(s["seq"]) for s in states)
        self._mask_rounds += 1
        me = jax.process_index()
        participants = sorted({p for r, owners in self._owners.items() if r not in ranks for p in owners})
        if len(participants) > 1 or participants != [me]:
            seq = self._agree(ranks, seq, participants, me)
        self._set_mask(ranks, seq)
        self._agreed_mask = ranks

    def live_processes(self) -> list[int]:
        """The processes holding a rank the last mask_ranks left unmasked: those that collective teardown waits for
        (a process whose ranks were all masked may be gone)."""
        return sorted({p for r, owners in self._owners.items() if r not in self._agreed_mask for p in owners})

    def _agree(self, ranks: tuple[int, ...], seq: int, participants: list[int], me: int) -> int:
        client = distributed_client()
        if client is None:
            raise RuntimeError("mask_ranks: the buffer spans several processes but jax.distributed is not running")
        key = f"jax_ll_ep/{self.name}/{self.handle}/mask/{self._mask_rounds}"
        client.key_value_set(f"{key}/{me}", json.dumps({"ranks": list(ranks), "seq": seq}))
        if me not in participants:
            return seq  # all of this process's ranks are masked: nobody waits for them, and they wait for nobody
        seen = {}
        for p in participants:
            try:
                seen[p] = json.loads(client.blocking_key_value_get(f"{key}/{p}", _MASK_TIMEOUT_MS))
            except Exception as exc:  # noqa: BLE001 - name the process that did not take part
                raise RuntimeError(
                    f"mask_ranks({list(ranks)}): process {p} holds a rank left unmasked but did not call mask_ranks "
                    f"within {_MASK_TIMEOUT_MS // 1000} s; every live process must call it with the same list (mask "
                    "the ranks of a process that is gone)"
                ) from exc
        differ = {p: v["ranks"] for p, v in seen.items() if v["ranks"] != list(ranks)}
        if differ:
            raise ValueError(
                f"mask_ranks: processes disagree on the ranks to mask: this process {list(ranks)}, others {differ}; "
                "every live process must pass the same list"
            )
        return max(int(v["seq"]) for v in seen.values())

    # ----------------------------------------------------------------------------------------------------------
    # The FFI calls, each ordered after the previous call on the buffer
    # ----------------------------------------------------------------------------------------------------------
    def _dispatch_result_avals(self, like, fp8: Fp8Options | None) -> list:
        c = self.config
        e_l, rows, h = c.num_local_experts, c.recv_rows, c.hidden
        if fp8 is None:
            data_dtype, scale = jnp.bfloat16, aval(like, (1,), jnp.float32)  # (an unused placeholder result)
        else:
            scale_dtype = jnp.float8_e8m0fnu if fp8.scale_format == "ue8m0" else jnp.float32
            data_dtype, scale = jnp.float8_e4m3fn, aval(like, (e_l, rows, h // SCALE_BLOCK), scale_dtype)
        return [
            aval(like, (e_l, rows, h), data_dtype),
            scale,
            aval(like, (e_l,), jnp.int32),
            aval(like, (e_l, rows), jnp.int32),
            aval(like, (e_l, c.num_ranks, 2), jnp.int32),
            aval(like, (e_l, rows), jnp.int32),
        ]

    @staticmethod
    def _dispatch_results(outs, fp8: Fp8Options | None):
        recv_x, recv_scale, recv_count, src_info, layout_range, src_topk_pos = outs
        if fp8 is not None:
            recv_x = Fp8Array(recv_x, recv_scale)
        return recv_x, recv_count, DispatchHandle(src_info, layout_range, src_topk_pos)

    def raw_dispatch(self, x, topk_idx, fp8: Fp8Options | None):
        """The fused dispatch call (no derivative rule: see :meth:`dispatch`)."""
        outs = native_call(
            "jax_ll_ep_dispatch",
            [x, topk_idx],
            self._dispatch_result_avals(x, fp8),
            buffer_id=self.handle,
            fp8_mode=np.int32(fp8_mode_code(fp8)),
        )
        return self._dispatch_results(outs, fp8)

    def raw_combine(self, y, topk_idx, topk_weights, handle: DispatchHandle):
        """The fused combine call (no derivative rule: see :meth:`combine`)."""
        (out,) = native_call(
            "jax_ll_ep_combine",
            [y, handle.src_info, handle.layout_range, handle.src_topk_pos, topk_idx, topk_weights],
            [aval(y, (topk_idx.shape[0], self.config.hidden), jnp.bfloat16)],
            buffer_id=self.handle,
        )
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Backend ops
    # ----------------------------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, fp8: Fp8Options | None):
        return autodiff.dispatch(self, x, topk_idx, fp8)

    def combine(self, y, topk_idx, topk_weights, handle: DispatchHandle):
        return autodiff.combine(self, y, topk_idx, topk_weights, handle)

    def dispatch_send(self, x, topk_idx, fp8: Fp8Options | None) -> DispatchPending:
        (ticket,) = native_call(
            "jax_ll_ep_dispatch_send",
            [x, topk_idx],
            [aval(x, (1,), jnp.int32)],
            buffer_id=self.handle,
            fp8_mode=np.int32(fp8_mode_code(fp8)),
        )
        return DispatchPending(ticket, fp8)

    def dispatch_recv(self, pending: DispatchPending):
        outs = native_call(
            "jax_ll_ep_dispatch_recv",
            [pending.ticket],
            self._dispatch_result_avals(pending.ticket, pending.fp8),
            buffer_id=self.handle,
            fp8_mode=np.int32(fp8_mode_code(pending.fp8)),
        )
        return self._dispatch_results(outs, pending.fp8)

    def combine_send(self, y, topk_idx, topk_weights, handle: DispatchHandle) -> CombinePending:
        (ticket,) = native_call(
            "jax_ll_ep_combine_send",
            [y, handle.src_info, handle.layout_range, handle.src_topk_pos],
            [aval(y, (1,), jnp.int32)],
            buffer_id=self.handle,
        )
        return CombinePending(ticket, topk_idx, topk_weights)

    def combine_recv(self, pending: CombinePending):
        n = pending.topk_idx.shape[0]
        (out,) = native_call(
            "jax_ll_ep_combine_recv",
            [pending.ticket, pending.topk_idx, pending.topk_weights],
            [aval(pending.topk_weights, (n, self.config.hidden), jnp.bfloat16)],
            buffer_id=self.handle,
        )
        return out
