"""The ``cpu`` backend: the low-latency protocol in C++ over host memory (xla_ffi/cpu/), run by XLA FFI handlers.

Ranks are the devices of the buffer's mesh. When they all belong to this process, the regions are private memory
shared by XLA's device threads. When the mesh spans several processes (``jax.distributed``, one host), process 0
of the mesh creates a POSIX shared-memory segment under a unique name, broadcasts the name through the JAX
distributed key-value store, and every process maps it; once everyone has mapped it the name is unlinked, so
nothing is left behind in /dev/shm even if a process dies. Every slice of the mesh along the axes other than the
buffer's is an independent group of ``R`` ranks (its own regions).

Region (group g, rank r) lies at ``(g * R + r) * region_bytes`` of the allocation; the native side computes every
offset inside a region from layout.h.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping

import jax
import numpy as np

from . import _native
from ._native_common import device_groups, distributed_client, exception, settle_order_token

log = logging.getLogger("jax_ll_ep")

_BOOTSTRAP_TIMEOUT_MS = 120_000  # key-value store and barrier waits of collective create/close

# HookPoint in xla_ffi/cpu/test_hooks.h
HOOK_POINTS = ("before_send", "before_signal", "before_recv")


class CpuImpl:
    """One process's share of a ``cpu`` buffer (see the module docstring)."""

    name = "cpu"

    def __init__(self, buf):
        self._mod = _native.require_cpu_module()
        cfg = buf.config
        self._handle = buf.handle
        self._num_ranks = cfg.num_ranks
        groups = device_groups(buf.mesh, cfg.axis_name)
        self._num_groups = groups.shape[0]
        self._region_bytes = int(
            self._mod.region_bytes(cfg.num_ranks, cfg.num_experts, cfg.max_tokens_per_rank, cfg.hidden)
        )
        me = jax.process_index()
        local = [(int(d.id), g, r) for (g, r), d in np.ndenumerate(groups) if d.process_index == me]
        if not local:
            raise ValueError(
                f"this process (index {me}) owns no device of the buffer's mesh; only the processes whose devices "
                "are in the mesh construct a Buffer"
            )
        self._processes = sorted({int(d.process_index) for d in groups.flat})
        self._multiprocess = len(self._processes) > 1
        self._closed = False
        create = dict(
            handle=self._handle,
            num_ranks=cfg.num_ranks,
            num_experts=cfg.num_experts,
            max_tokens=cfg.max_tokens_per_rank,
            hidden=cfg.hidden,
            timeout_s=float(cfg.timeout_s),
            num_groups=self._num_groups,
            devices=local,
        )
        if self._multiprocess:
            self._create_shared(create)
        else:
            self._mod.create_buffer(**create, shm_name="")

    # ----------------------------------------------------------------------------------------------------------
    # Multi-process bootstrap
    # ----------------------------------------------------------------------------------------------------------
    def _key(self, what: str) -> str:
        # Buffers are created collectively in the same order everywhere, so the handle names the same buffer in
        # every process.
        return f"jax_ll_ep/cpu/{self._handle}/{what}"

    def _barrier(self, client, what: str) -> None:
        everyone = self._processes == list(range(jax.process_count()))
        client.wait_at_barrier(self._key(what), _BOOTSTRAP_TIMEOUT_MS, None if everyone else self._processes)

    def _create_shared(self, create: dict) -> None:
        client = distributed_client()
        if client is None:
            raise RuntimeError(
                "the buffer's mesh spans several processes; call jax.distributed.initialize() in every process "
                "before creating the Buffer"
            )
        me = jax.process_index()
        creator = self._processes[0]
        total = self._region_bytes * self._num_groups * self._num_ranks
        error, created = "", False
        if me == creator:
            name = f"/jax_ll_ep_{os.getpid()}_{self._handle}_{secrets.token_hex(6)}"
            try:
                self._mod.shm_create(name, total)
                created = True
            except RuntimeError as exc:
                error = str(exc)
            # The name is published even on failure, so that nobody waits for it; the status below says why.
            client.key_value_set(self._key("shm_name"), name)
        else:
            name = client.blocking_key_value_get(self._key("shm_name"), _BOOTSTRAP_TIMEOUT_MS)
        if not error:
            try:
                self._mod.create_buffer(**create, shm_name=name)
            except RuntimeError as exc:
                error = str(exc)
        client.key_value_set(self._key(f"status/{me}"), error or "ok")
        self._barrier(client, "mapped")  # everyone has mapped the segment (or failed to)
        if created:
            self._mod.shm_unlink(name)  # the mappings keep the memory; nothing is left in /dev/shm
        failures = []
        for p in self._processes:
            status = client.blocking_key_value_get(self._key(f"status/{p}"), _BOOTSTRAP_TIMEOUT_MS)
            if status != "ok":
                failures.append(f"process {p}: {status}")
        if failures:
            self._mod.destroy_buffer(self._handle)
            raise RuntimeError(
                f"creating cpu buffer {self._handle} ({total} bytes of shared memory) failed: " + "; ".join(failures)
            )

    # ----------------------------------------------------------------------------------------------------------
    # BackendImpl
    # ----------------------------------------------------------------------------------------------------------
    def region_bytes(self) -> int:
        return self._region_bytes

    def check(self) -> None:
        """Waits for the calls dispatched on the buffer to finish, then raises the first error recorded by this
        process's ranks since the last check (and clears them all)."""
        settle_order_token(self._handle)
        records = self._mod.errors(self._handle, True)
        if records:
            raise exception("cpu", records)

    def close(self) -> None:
        """Collective (a barrier over the mesh's processes) and idempotent."""
        if self._closed:
            return
        self._closed = True
        settle_order_token(self._handle)
        barrier_error = None
        if self._multiprocess:
            client = distributed_client()
            if client is not None:  # None at exit once jax.distributed has shut down: nothing to wait for
                try:
                    self._barrier(client, "close")
                except Exception as exc:  # noqa: BLE001 - free our memory anyway, then report
                    barrier_error = exc
        self._mod.destroy_buffer(self._handle)
        if barrier_error is not None:
            raise RuntimeError(f"closing cpu buffer {self._handle}: the close barrier failed") from barrier_error


# ---------------------------------------------------------------------------------------------------------------
# Test hooks (private; used by tests/test_cpu_backend.py and tests/multiprocess/)
# ---------------------------------------------------------------------------------------------------------------
def set_test_delays(
    buf, delays: Mapping[tuple[int, str], float | tuple[float, float]], seed: int = 0, *, skip_ranks=()
) -> None:
    """Injects delays into every call on ``buf``: ``{(rank, point): seconds or (min_s, max_s)}`` with ``point`` in
    HOOK_POINTS; each call's delay is drawn uniformly from the range, deterministically from ``seed``. Ranks in
    ``skip_ranks`` behave as ranks that never make any call (their handlers return at once). Applies to every
    group. Replaces earlier hooks; ``clear_test_hooks`` removes them."""
    impl = _impl_of(buf)
    entries = []
    for (rank, point), value in delays.items():
        if point not in HOOK_POINTS:
            raise ValueError(f"test delay point {point!r} is not one of {HOOK_POINTS}")
        lo, hi = (value, value) if isinstance(value, (int, float)) else value
        entries.append((int(rank), HOOK_POINTS.index(point), float(lo), float(hi)))
    impl._mod.set_test_hooks(impl._handle, impl._num_groups, impl._num_ranks, int(seed), entries, list(skip_ranks))


def clear_test_hooks(buf) -> None:
    impl = _impl_of(buf)
    impl._mod.clear_test_hooks(impl._handle)


def test_stamps(buf) -> np.ndarray:
    """[G, R, 2, 3] int64 steady-clock nanoseconds (CLOCK_MONOTONIC: comparable across the processes of a host) of
    each local rank's most recent dispatch ([..., 0, :]) and combine ([..., 1, :]) since the hooks were installed:
    (entered, signalling: about to store its first signal, returned); 0 where nothing was recorded (non-local
    ranks, or no call yet). Needs hooks installed (``set_test_delays``, possibly with no delays)."""
    impl = _impl_of(buf)
    return np.asarray(impl._mod.test_stamps(impl._handle, impl._num_groups, impl._num_ranks), dtype=np.int64)


test_stamps.__test__ = False  # not a pytest test despite the name


def sequence_numbers(buf) -> dict[tuple[int, int], tuple[int, int]]:
    """{(group, rank): (seq, open_seq)} of this process's ranks: calls completed, and the open split call (0: none)."""
    impl = _impl_of(buf)
    settle_order_token(impl._handle)
    return {(g, r): (seq, open_seq) for g, r, seq, open_seq in impl._mod.sequence_numbers(impl._handle)}


def _impl_of(buf) -> CpuImpl:
    buf.ensure_open()
    impl = buf._impl
    if not isinstance(impl, CpuImpl):
        raise TypeError(f"test hooks need a cpu buffer, got backend {buf.backend!r}")
    return impl
