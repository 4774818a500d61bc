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

import jax
import numpy as np
from jax.sharding import Mesh

from .._extension import cpu_module, region_bytes
from .._jax_internals import distributed_client, settle_order_token
from ..config import BufferConfig
from .native import NativeBackend, barrier_among, device_groups, exception

log = logging.getLogger("jax_ll_ep")

_BOOTSTRAP_TIMEOUT_MS = 120_000  # key-value store and barrier waits of collective create/close


class CpuBackend(NativeBackend):
    """One process's share of a ``cpu`` buffer (see the module docstring)."""

    name = "cpu"
    module = cpu_module  # the extension module holding the buffer (its test hooks too: jax_ll_ep/testing/)

    def __init__(self, config: BufferConfig, mesh: Mesh, handle: int):
        groups = device_groups(mesh, config.axis_name)
        super().__init__(config, handle, groups)
        self.num_groups = groups.shape[0]
        self.region_bytes = region_bytes(
            config.num_ranks, config.num_experts, config.max_tokens_per_rank, config.hidden
        )
        me = jax.process_index()
        local = [(int(d.id), g, r) for (g, r), d in np.ndenumerate(groups) if d.process_index == me]
        if not local:
            raise ValueError(
                f"this process (index {me}) owns no device of the buffer's mesh; only the processes whose devices "
                "are in the mesh construct a Buffer"
            )
        self._processes = sorted({int(d.process_index) for d in groups.flat})
        self.multiprocess = len(self._processes) > 1
        self._closed = False
        create = dict(
            handle=handle,
            num_ranks=config.num_ranks,
            num_experts=config.num_experts,
            max_tokens=config.max_tokens_per_rank,
            hidden=config.hidden,
            timeout_s=float(config.timeout_s),
            on_timeout_mask=config.on_timeout == "mask",
            num_groups=self.num_groups,
            devices=local,
        )
        if self.multiprocess:
            self._create_shared(create)
        else:
            cpu_module.create_buffer(**create, shm_name="")

    # ----------------------------------------------------------------------------------------------------------
    # Multi-process bootstrap
    # ----------------------------------------------------------------------------------------------------------
    def _key(self, what: str) -> str:
        # Buffers are created collectively in the same order everywhere, so the handle names the same buffer in
        # every process.
        return f"jax_ll_ep/cpu/{self.handle}/{what}"

    def _barrier(self, client, what: str, processes: list[int] | None = None) -> None:
        processes = self._processes if processes is None else processes
        barrier_among(client, self._key(what), processes, _BOOTSTRAP_TIMEOUT_MS)

    def _create_shared(self, create: dict) -> None:
        client = distributed_client()
        if client is None:
            raise RuntimeError(
                "the buffer's mesh spans several processes; call jax.distributed.initialize() in every process "
                "before creating the Buffer"
            )
        me = jax.process_index()
        creator = self._processes[0]
        total = self.region_bytes * self.num_groups * self.config.num_ranks
        error, created = "", False
        if me == creator:
            name = f"/jax_ll_ep_{os.getpid()}_{self.handle}_{secrets.token_hex(6)}"
            try:
                cpu_module.shm_create(name, total)
                created = True
            except RuntimeError as exc:
                error = str(exc)
            # The name is published even on failure, so that nobody waits for it; the status below says why.
            client.key_value_set(self._key("shm_name"), name)
        else:
            name = client.blocking_key_value_get(self._key("shm_name"), _BOOTSTRAP_TIMEOUT_MS)
        if not error:
            try:
                cpu_module.create_buffer(**create, shm_name=name)
            except RuntimeError as exc:
                error = str(exc)
        client.key_value_set(self._key(f"status/{me}"), error or "ok")
        self._barrier(client, "mapped")  # everyone has mapped the segment (or failed to)
        if created:
            cpu_module.shm_unlink(name)  # the mappings keep the memory; nothing is left in /dev/shm
        failures = []
        for p in self._processes:
            status = client.blocking_key_value_get(self._key(f"status/{p}"), _BOOTSTRAP_TIMEOUT_MS)
            if status != "ok":
                failures.append(f"process {p}: {status}")
        if failures:
            cpu_module.destroy_buffer(self.handle)
            raise RuntimeError(
                f"creating cpu buffer {self.handle} ({total} bytes of shared memory) failed: " + "; ".join(failures)
            )

    # ----------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Waits for the calls dispatched on the buffer to finish, then raises the first error recorded by this
        process's ranks since the last check (and clears them all)."""
        settle_order_token(self.handle)
        records = cpu_module.errors(self.handle, True)
        if records:
            raise exception(self.name, records)

    def _mask_states(self) -> list[dict]:
        return cpu_module.mask_states(self.handle)

    def _set_mask(self, ranks: tuple[int, ...], seq: int) -> None:
        cpu_module.set_mask(self.handle, list(ranks), seq)

    def close(self) -> None:
        """Collective (a barrier over the mesh's processes) and idempotent."""
        if self._closed:
            return
        self._closed = True
        settle_order_token(self.handle)
        barrier_error = None
        if self.multiprocess:
            client = distributed_client()
            live = self.live_processes()  # (a process whose ranks mask_ranks masked may be gone: not waited for)
            if client is not None and jax.process_index() in live:  # (None at exit after jax.distributed's shutdown)
                try:
                    self._barrier(client, "close", live)
                except Exception as exc:  # noqa: BLE001 - free our memory anyway, then report
                    barrier_error = exc
        cpu_module.destroy_buffer(self.handle)
        if barrier_error is not None:
            raise RuntimeError(f"closing cpu buffer {self.handle}: the close barrier failed") from barrier_error
