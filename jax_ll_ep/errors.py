"""Typed exceptions raised by jax_ll_ep."""

from __future__ import annotations


class JaxLlEpError(RuntimeError):
    """Base class of every error jax_ll_ep raises at run time."""


class ProtocolTimeoutError(JaxLlEpError):
    """A wait for peer signals ran past ``timeout_s``.

    ``missing`` lists the ``(rank, local_expert)`` pairs whose signal never came; ``op`` is ``"dispatch"`` or
    ``"combine"`` and ``seq`` the call's sequence number on the buffer.
    """

    def __init__(self, message: str, *, op: str = "", seq: int = 0, missing: tuple[tuple[int, int], ...] = ()):
        super().__init__(message)
        self.op = op
        self.seq = seq
        self.missing = missing


class RanksMaskedError(ProtocolTimeoutError):
    """With ``Buffer(..., on_timeout="mask")``: a wait ran past ``timeout_s`` and the silent ranks were masked
    instead of failing the call. The call completed without them and the buffer stays usable; ``masked`` lists the
    ranks (``buf.masked_ranks`` holds them from then on). Raised by ``buf.check()`` only: it reports, it does not stop
    anything.
    """

    def __init__(self, message: str, *, masked: tuple[int, ...] = (), **kwargs):
        super().__init__(message, **kwargs)
        self.masked = masked


class SequenceMismatchError(JaxLlEpError):
    """Ranks issued different sequences of calls on one buffer (detected by the epoch check)."""


class RoutingError(JaxLlEpError):
    """``topk_idx`` held an id outside ``[-1, num_experts)`` or repeated an expert within a token's row."""


class BufferClosedError(JaxLlEpError):
    """A buffer was used after ``close()``."""
