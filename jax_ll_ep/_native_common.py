"""What the two native backends (cpu and cuda) share: the mesh's groups, the JAX key-value client, the error
record decoding and the ordering-token settle after a failed call."""

from __future__ import annotations

import numpy as np

from .errors import JaxLlEpError, ProtocolTimeoutError, RoutingError, SequenceMismatchError

# ErrorCode in layout.h
_OK, _TIMEOUT, _MISMATCH, _INVALID_EXPERT, _DUPLICATE_EXPERT, _SPLIT_MISUSE, _INVALID_HANDLE, _UNUSABLE = range(8)
_KIND_NAMES = {1: "dispatch", 2: "combine"}


def device_groups(mesh, axis_name: str) -> np.ndarray:
    """[G, R] array of the mesh's devices: row g is group g (a slice of the mesh along the other axes, in mesh
    order), column r is rank r on ``axis_name``."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
    return devices.reshape(-1, mesh.shape[axis_name])


def distributed_client():
    from jax._src import distributed

    return distributed.global_state.client


def settle_order_token(handle: int) -> None:
    """Waits until every program dispatched on the buffer (by this thread) has finished on all local devices; if the
    last one failed, forgets its ordering token.

    JAX threads one runtime token per ordered effect through the programs that carry it (_ffi.BufferOrderEffect, one
    per buffer). When a program fails (a timeout, a routing error), that token holds the failure, and JAX would
    refuse every later call on the buffer with it, and print it again at exit. The failure has already been raised
    where the program's results were awaited, and the protocol state is consistent after routing errors and split
    misuse (and a timed-out buffer says so itself), so the token is dropped once the failed program has finished on
    every device. Uses JAX internals (jax._src.dispatch.runtime_tokens).
    """
    from jax._src import dispatch

    from ._ffi import BufferOrderEffect

    tokens = dispatch.runtime_tokens
    effect = BufferOrderEffect(handle)
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


def describe(rec: dict) -> str:
    op = _KIND_NAMES.get(rec["kind"], "call")
    where = f"rank {rec['rank']} of group {rec['group']}, {op} call seq={rec['seq']}"
    code = rec["code"]
    if code == _TIMEOUT:
        pairs = ", ".join(f"(rank {r}, local expert {e})" for r, e in rec["missing"])
        return f"{where}: timed out; signals never came from {pairs}"
    if code == _MISMATCH:
        signal = rec["signal"]
        seen = _KIND_NAMES.get((signal >> 28) & 0xF, "none")
        return (
            f"{where}: rank {rec['token']} signalled local expert {rec['topk_pos']} for its call "
            f"seq={signal >> 32} ({seen}); the ranks issued different sequences of calls on this buffer"
        )
    if code == _INVALID_EXPERT:
        return (
            f"{where}: topk_idx[{rec['token']}, {rec['topk_pos']}] = {rec['detail']} is outside [-1, num_experts); "
            "the entry was treated as -1"
        )
    if code == _DUPLICATE_EXPERT:
        return (
            f"{where}: topk_idx[{rec['token']}, {rec['topk_pos']}] = {rec['detail']} repeats an earlier expert of "
            "the token; the repeat was treated as -1"
        )
    if code == _SPLIT_MISUSE:
        return (
            f"{where}: split send/recv used out of order (a send while a call was open, or a receive without its "
            "send); nothing was sent"
        )
    if code == _INVALID_HANDLE:
        return (
            f"{where}: the dispatch handle passed to combine does not match the receive layout or topk_idx "
            "(pass the handle returned by the matching dispatch unchanged)"
        )
    if code == _UNUSABLE:
        cause = "timed out" if rec["detail"] == _TIMEOUT else "saw a sequence mismatch"
        return (
            f"{where}: refused, nothing sent: an earlier call on this buffer {cause}, so the ranks' calls can no "
            "longer be matched; close the buffer and create a new one"
        )
    return f"{where}: error code {code}"


# Which record check() raises when several ranks hold one: the root cause first. A rank that detected a sequence
# mismatch explains why its peers timed out; timeouts are the least specific.
_PRIORITY = {
    _MISMATCH: 0,
    _INVALID_EXPERT: 1,
    _DUPLICATE_EXPERT: 1,
    _INVALID_HANDLE: 2,
    _SPLIT_MISUSE: 3,
    _TIMEOUT: 4,
    _UNUSABLE: 5,
}


def exception(backend: str, records: list[dict]) -> JaxLlEpError:
    """The typed exception for the error records of one or more ranks (root cause first)."""
    records = sorted(records, key=lambda rec: _PRIORITY.get(rec["code"], 5))  # stable: then by (group, rank)
    first = records[0]
    lines = [describe(rec) + (f" (+{rec['count'] - 1} later errors)" if rec["count"] > 1 else "") for rec in records]
    message = f"jax_ll_ep {backend} backend: " + "; ".join(lines)
    code = first["code"]
    if code == _TIMEOUT:
        missing = sorted({pair for rec in records if rec["code"] == _TIMEOUT for pair in rec["missing"]})
        return ProtocolTimeoutError(
            message, op=_KIND_NAMES.get(first["kind"], ""), seq=int(first["seq"]), missing=tuple(missing)
        )
    if code == _MISMATCH:
        return SequenceMismatchError(message)
    if code in (_INVALID_EXPERT, _DUPLICATE_EXPERT):
        return RoutingError(message)
    return JaxLlEpError(message)
