"""Test instrumentation of the ``cpu`` backend (xla_ffi/cpu/test_hooks.h): injected delays that force arrival
orders, a rank that never makes its calls, and per-call timestamps. Nothing here runs unless a test installs it; in
normal operation a call's hooks are absent and cost one branch."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .._extension import HOOK_POINTS
from .._jax_internals import settle_order_token
from ..backends.cpu import CpuBackend

__all__ = ["HOOK_POINTS", "clear_test_hooks", "sequence_numbers", "set_test_delays", "test_stamps"]


def _backend_of(buf) -> CpuBackend:
    buf.ensure_open()
    if not isinstance(buf.backend, CpuBackend):
        raise TypeError(f"test hooks need a cpu buffer, got backend {buf.backend.name!r}")
    return buf.backend


def set_test_delays(
    buf, delays: Mapping[tuple[int, str], float | tuple[float, float]], seed: int = 0, *, skip_ranks=()
) -> None:
    """Injects delays into every call on ``buf``: ``{(rank, point): seconds or (min_s, max_s)}`` with ``point`` in
    HOOK_POINTS; each call's delay is drawn uniformly from the range, deterministically from ``seed``. Ranks in
    ``skip_ranks`` behave as ranks that never make any call (their handlers return at once). Applies to every
    group. Replaces earlier hooks; :func:`clear_test_hooks` removes them."""
    backend = _backend_of(buf)
    entries = []
    for (rank, point), value in delays.items():
        if point not in HOOK_POINTS:
            raise ValueError(f"test delay point {point!r} is not one of {HOOK_POINTS}")
        lo, hi = (value, value) if isinstance(value, (int, float)) else value
        entries.append((int(rank), HOOK_POINTS.index(point), float(lo), float(hi)))
    backend.module.set_test_hooks(
        backend.handle, backend.num_groups, backend.config.num_ranks, int(seed), entries, list(skip_ranks)
    )


def clear_test_hooks(buf) -> None:
    backend = _backend_of(buf)
    backend.module.clear_test_hooks(backend.handle)


def test_stamps(buf) -> np.ndarray:
    """[G, R, 2, 3] int64 steady-clock nanoseconds (CLOCK_MONOTONIC: comparable across the processes of a host) of
    each local rank's most recent dispatch ([..., 0, :]) and combine ([..., 1, :]) since the hooks were installed:
    (entered, signalling: about to store its first signal, returned); 0 where nothing was recorded (non-local
    ranks, or no call yet). Needs hooks installed (``set_test_delays``, possibly with no delays)."""
    backend = _backend_of(buf)
    stamps = backend.module.test_stamps(backend.handle, backend.num_groups, backend.config.num_ranks)
    return np.asarray(stamps, dtype=np.int64)


test_stamps.__test__ = False  # not a pytest test despite the name


def sequence_numbers(buf) -> dict[tuple[int, int], tuple[int, int]]:
    """{(group, rank): (seq, open_seq)} of this process's ranks: calls completed, and the open split call (0: none)."""
    backend = _backend_of(buf)
    settle_order_token(backend.handle)
    return {(g, r): (seq, open_seq) for g, r, seq, open_seq in backend.module.sequence_numbers(backend.handle)}
