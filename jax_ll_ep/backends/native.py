"""What the two native backends (cpu and cuda) share: their ops as ordered FFI calls (the targets of
xla_ffi/ffi/targets.h, the same names on both platforms), the mesh's groups, and the typed exception for the error
records their extension modules return (worded by xla_ffi/include/jax_ll_ep/errors.h)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import autodiff
from .._extension import SCALE_BLOCK
from .._jax_internals import aval, native_call
from ..config import BufferConfig, Fp8Options, fp8_mode_code
from ..errors import JaxLlEpError, ProtocolTimeoutError, RoutingError, SequenceMismatchError
from ..types import CombinePending, DispatchHandle, DispatchPending, Fp8Array


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
    "buffer_unusable": 5,
}


def exception(backend: str, records: list[dict]) -> JaxLlEpError:
    """The typed exception for the error records of one or more ranks (root cause first). A record is what the
    extension modules return: code, op, seq, count, missing, message (xla_ffi/ffi/records.h)."""
    records = sorted(records, key=lambda rec: _ROOT_CAUSE_FIRST.get(rec["code"], 5))  # stable: then (group, rank)
    first = records[0]
    lines = [rec["message"] + (f" (+{rec['count'] - 1} later errors)" if rec["count"] > 1 else "") for rec in records]
    message = f"jax_ll_ep {backend} backend: " + "; ".join(lines)
    code = first["code"]
    if code == "timeout":
        missing = sorted({tuple(pair) for rec in records if rec["code"] == "timeout" for pair in rec["missing"]})
        return ProtocolTimeoutError(message, op=first["op"], seq=int(first["seq"]), missing=tuple(missing))
    if code == "sequence_mismatch":
        return SequenceMismatchError(message)
    if code in ("invalid_expert", "duplicate_expert"):
        return RoutingError(message)
    return JaxLlEpError(message)


class NativeBackend:
    """The ops of a native backend. A subclass sets ``name`` and owns the memory the handle names."""

    name = ""

    def __init__(self, config: BufferConfig, handle: int):
        self.config = config
        self.handle = handle

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
