"""The ``cuda`` backend: the protocol's CUDA kernels over one region per rank, reached through one of two transports
(``CudaOptions.transport``):

  nvshmem  one process per GPU (``jax.distributed.initialize(local_device_ids=[i])``; several processes may share one
           GPU under the CUDA MPS daemon): regions are NVSHMEM symmetric memory, peers are reached through
           ``nvshmem_ptr`` pointers (load/store) or NVSHMEM device puts. The default whenever the mesh spans several
           processes, and with ``force_put``.
  peer     one process driving every GPU of the mesh (NVSHMEM cannot: one PE per process): each rank's region is a
           plain allocation on its GPU, peer access is enabled between all of them, and the kernels use the
           allocations as peer pointers. The default when the mesh lives in this one process; it needs no nvshmem4py
           initialization.

NVSHMEM bootstrap (collective over every process, outside jit):
  1. The first nvshmem buffer of the process initializes NVSHMEM: rank 0 creates the unique id and broadcasts it
     through the JAX distributed key-value store; every process initializes nvshmem4py in UID mode (host library
     only); then the CUDA module registers its own device-side NVSHMEM state (``nvshmemx_init_attr``, reference
     counted, see docs/cuda.md). The CUDA module is loaded, and its FFI targets registered for platform "CUDA",
     before that.
  2. Every buffer: each process checks that its GPU has room for the region (the result is exchanged, so either all
     allocate or all raise), allocates ``region_bytes`` collectively (``nvshmem.core.buffer``), zeroes it, builds its
     peer table (``nvshmem_ptr`` pointers for load/store-reachable peers, NVSHMEM device puts for the others, or for
     every peer with ``force_put``) and waits for everyone before any kernel may write to a peer.
  3. Teardown: ``close()`` frees the region collectively; at exit the module's ``nvshmem_finalize`` runs, then the
     remaining regions are freed, then nvshmem4py's ``finalize``. Idempotent. Once ``mask_ranks`` has left out every
     rank of some process (a process that died), the collective steps would wait for it forever: ``close()`` then waits
     only for the live processes and keeps the region (freed when the process exits), and the exit skips NVSHMEM's
     collective finalize.

The processes' NVSHMEM PE index is their JAX process index. The native registry holds one entry per (buffer, CUDA
device); an FFI call finds its entry by the device XLA runs it on.
"""

from __future__ import annotations

import atexit
import logging
import threading

import jax
import numpy as np
from jax.sharding import Mesh

from .._extension import cuda_module, region_bytes
from .._jax_internals import distributed_client, settle_order_token
from ..config import BufferConfig, CudaOptions
from .native import NativeBackend, barrier_among, device_groups, exception

log = logging.getLogger("jax_ll_ep")

_BOOTSTRAP_TIMEOUT_MS = 120_000

_MEMORY_HINT = (
    "JAX preallocates 75% of GPU memory by default: set XLA_PYTHON_CLIENT_PREALLOCATE=false or lower "
    "XLA_CLIENT_MEM_FRACTION (e.g. 0.5) before JAX starts; NVSHMEM's symmetric heap is sized by "
    "NVSHMEM_SYMMETRIC_SIZE (it grows on demand up to NVSHMEM_MAX_MEMORY_PER_GPU)"
)


def choose_transport(options: CudaOptions, processes_in_mesh: int) -> str:
    """``peer`` when this process holds every GPU of the mesh (and puts are not forced), else ``nvshmem``; an
    explicit ``options.transport`` must suit the mesh."""
    if options.transport == "peer" and processes_in_mesh != 1:
        raise ValueError(
            "CudaOptions(transport='peer') needs one process holding every GPU of the mesh; the mesh spans "
            f"{processes_in_mesh} processes (use 'nvshmem' or 'auto')"
        )
    if options.transport != "auto":
        return options.transport
    return "peer" if processes_in_mesh == 1 and not options.force_put else "nvshmem"


# ---------------------------------------------------------------------------------------------------------------
# The process-wide NVSHMEM lifecycle
# ---------------------------------------------------------------------------------------------------------------
_lock = threading.RLock()
_nvshmem_ready = False
_live: list[CudaBackend] = []
_process_gone = False  # mask_ranks left out every rank of some process: NVSHMEM's collective teardown would hang


def _cuda_device(ordinal: int):
    try:
        from cuda.core import Device
    except ImportError:  # older cuda.core
        from cuda.core.experimental import Device
    return Device(ordinal)


def _init_nvshmem(ordinal: int) -> None:
    """Collective over all processes, once per process (step 1 of the module docstring)."""
    global _nvshmem_ready
    if _nvshmem_ready:
        return
    import nvshmem.core as nvshmem

    module = cuda_module()
    rank, nranks = jax.process_index(), jax.process_count()
    device = _cuda_device(ordinal)
    device.set_current()
    if nranks == 1:
        uid = nvshmem.get_unique_id()
    else:
        client = distributed_client()
        if client is None:
            raise RuntimeError("backend='cuda' with several processes needs jax.distributed.initialize() first")
        key = "jax_ll_ep/cuda/nvshmem_uid"
        if rank == 0:
            uid = nvshmem.get_unique_id()
            client.key_value_set_bytes(key, np.asarray(uid._data).tobytes())
        else:
            uid = nvshmem.get_unique_id(empty=True)
            view = np.asarray(uid._data)
            view[:] = np.frombuffer(client.blocking_key_value_get_bytes(key, _BOOTSTRAP_TIMEOUT_MS), dtype=view.dtype)
    nvshmem.init(device=device, uid=uid, rank=rank, nranks=nranks, initializer_method="uid")
    rc = module.nvshmem_init()
    if rc != 0:
        nvshmem.finalize()
        raise RuntimeError(f"jax_ll_ep: the CUDA module's nvshmemx_init_attr returned {rc}")
    if nvshmem.my_pe() != rank:
        raise RuntimeError(f"jax_ll_ep: NVSHMEM PE {nvshmem.my_pe()} != JAX process index {rank}")
    _nvshmem_ready = True
    atexit.register(_finalize_at_exit)
    log.info("jax_ll_ep: NVSHMEM initialized (PE %d of %d, GPU %d)", rank, nranks, ordinal)


def _finalize_at_exit() -> None:
    """Registered after jax.distributed's own exit handler, so it runs first (LIFO): close what is still open, in
    the documented order (module finalize, free, nvshmem4py finalize)."""
    global _nvshmem_ready
    with _lock:
        if not _nvshmem_ready:
            return
        _nvshmem_ready = False
        import nvshmem.core as nvshmem

        if _process_gone:
            log.warning("jax_ll_ep: a process of the job is gone (masked): skipping NVSHMEM's collective finalize")
            return

        for backend in reversed(list(_live)):
            try:
                backend._unregister()
            except Exception as exc:  # noqa: BLE001 - teardown at exit must go on
                log.warning("jax_ll_ep: releasing cuda buffer %d at exit: %s", backend.handle, exc)
        cuda_module().nvshmem_finalize()
        for backend in reversed(list(_live)):
            try:
                backend._free()
            except Exception as exc:  # noqa: BLE001
                log.warning("jax_ll_ep: freeing cuda buffer %d at exit: %s", backend.handle, exc)
        nvshmem.finalize()


# ---------------------------------------------------------------------------------------------------------------
# One buffer
# ---------------------------------------------------------------------------------------------------------------
class _Rank:
    """One rank of the buffer held by this process: its place in the mesh, its GPU and its region."""

    def __init__(self, group: int, rank: int, ordinal: int):
        self.group, self.rank, self.ordinal = group, rank, ordinal
        self.region = 0  # device address
        self.registered = False


class CudaBackend(NativeBackend):
    """This process's share of a ``cuda`` buffer: one rank per GPU it holds (see the module docstring)."""

    name = "cuda"

    def __init__(self, config: BufferConfig, mesh: Mesh, handle: int, options: CudaOptions):
        groups = device_groups(mesh, config.axis_name)
        super().__init__(config, handle, groups)
        self.options = options
        self._closed = False
        self._buffer = None  # nvshmem transport: the symmetric allocation
        me = jax.process_index()
        processes = sorted({int(d.process_index) for d in groups.flat})
        mine = [(g, r) for (g, r), d in np.ndenumerate(groups) if d.process_index == me]
        self.transport = choose_transport(options, len(processes))
        if self.transport == "nvshmem":
            if len(mine) != 1:
                raise ValueError(
                    f"backend='cuda' with several processes needs exactly one GPU of the mesh per process (NVSHMEM's "
                    f"rule: one PE per process), but process {me} owns {len(mine)}; start one process per GPU with "
                    "jax.distributed.initialize(..., local_device_ids=[i]), or drive every GPU from one process"
                )
            if processes != list(range(jax.process_count())):
                raise ValueError(
                    f"backend='cuda' allocates NVSHMEM memory collectively over all {jax.process_count()} processes, "
                    f"but the mesh covers processes {processes}; build the buffer on a mesh of every process's GPU"
                )
        self._ranks = [_Rank(g, r, int(groups[g, r].local_hardware_id)) for g, r in mine]
        ordinals = [x.ordinal for x in self._ranks]
        if len(set(ordinals)) != len(ordinals):
            raise ValueError(f"backend='cuda' needs distinct GPUs for the mesh's devices, got CUDA devices {ordinals}")
        module = cuda_module()
        self._module = module
        if config.num_experts > module.MAX_EXPERTS:
            raise ValueError(
                f"num_experts={config.num_experts} is more than the cuda backend supports ({module.MAX_EXPERTS})"
            )
        self.region_bytes = region_bytes(
            config.num_ranks, config.num_experts, config.max_tokens_per_rank, config.hidden
        )
        with _lock:
            if self.transport == "nvshmem":
                _init_nvshmem(self._ranks[0].ordinal)
            self._check_memory()
            allocate = self._allocate_nvshmem if self.transport == "nvshmem" else self._allocate_peer
            allocate(groups)
            _live.append(self)
        log.info(
            "jax_ll_ep: cuda buffer %d (%s transport): %d bytes of region per rank, ranks %s, peers %s",
            self.handle,
            self.transport,
            self.region_bytes,
            [(x.group, x.rank, x.ordinal) for x in self._ranks],
            self._peer_summary,
        )

    # ----------------------------------------------------------------------------------------------------------
    def _key(self, what: str) -> str:
        # Buffers are created collectively in the same order everywhere: the handle names the same buffer.
        return f"jax_ll_ep/cuda/{self.handle}/{what}"

    def _barrier(self, what: str) -> None:
        if self.transport == "nvshmem" and jax.process_count() > 1:
            live = self.live_processes()  # (every process, unless mask_ranks left one out: not waited for)
            if jax.process_index() not in live:
                return
            barrier_among(distributed_client(), self._key(what), live, _BOOTSTRAP_TIMEOUT_MS)

    def _process_left_out(self) -> bool:
        return self.transport == "nvshmem" and self.live_processes() != list(range(jax.process_count()))

    def mask_ranks(self, ranks: tuple[int, ...]) -> None:
        global _process_gone
        super().mask_ranks(ranks)
        if self._process_left_out():
            _process_gone = True

    def _check_memory(self) -> None:
        """Every process checks its GPUs' free memory; all raise together if any is short (an NVSHMEM allocation
        is collective, so a lone failure would leave the others waiting)."""
        need = self.region_bytes + (64 << 20)  # region + workspace and NVSHMEM's own bookkeeping, roughly
        status = "ok"
        for x in self._ranks:
            free, _ = self._module.mem_get_info(x.ordinal)
            if free < need:
                status = f"GPU {x.ordinal} has {free} bytes free, needs about {need}"
        statuses = [status]
        if self.transport == "nvshmem" and jax.process_count() > 1:
            client = distributed_client()
            client.key_value_set(self._key(f"mem/{jax.process_index()}"), status)
            statuses = [
                client.blocking_key_value_get(self._key(f"mem/{p}"), _BOOTSTRAP_TIMEOUT_MS)
                for p in range(jax.process_count())
            ]
        short = [f"process {p}: {s}" for p, s in enumerate(statuses) if s != "ok"]
        if short:
            raise MemoryError(
                f"jax_ll_ep: not enough GPU memory for cuda buffer {self.handle} ({self.region_bytes} bytes of "
                f"region per rank): {'; '.join(short)}. {_MEMORY_HINT}."
            )

    def _register(self, x: _Rank, peers: list[int], pes: list[int]) -> None:
        c = self.config
        self._module.register_buffer(
            handle=self.handle,
            device=x.ordinal,
            group=x.group,
            rank=x.rank,
            num_ranks=c.num_ranks,
            num_experts=c.num_experts,
            max_tokens=c.max_tokens_per_rank,
            hidden=c.hidden,
            region=x.region,
            peer_regions=peers,
            peer_pes=pes,
            timeout_s=float(c.timeout_s),
            on_timeout_mask=c.on_timeout == "mask",
            trace=self.options.trace,
        )
        x.registered = True

    def _allocate_nvshmem(self, groups: np.ndarray) -> None:
        import nvshmem.core as nvshmem
        from nvshmem import bindings as nvshmem_bindings

        try:
            self._buffer = nvshmem.buffer(self.region_bytes)
        except Exception as exc:
            raise MemoryError(
                f"jax_ll_ep: NVSHMEM could not allocate {self.region_bytes} bytes of symmetric memory for cuda "
                f"buffer {self.handle}: {exc}. {_MEMORY_HINT}."
            ) from exc
        x = self._ranks[0]
        x.region = int(self._buffer.handle)
        pes = [int(d.process_index) for d in groups[x.group]]
        peers = [0 if self.options.force_put else int(nvshmem_bindings.ptr(x.region, pe)) for pe in pes]
        self._peer_summary = ", ".join(f"{r}:{'load/store' if p else 'put'}" for r, p in enumerate(peers))
        self._register(x, peers, pes)
        # Every region is zeroed and registered before any rank's kernel may write into a peer's.
        self._barrier("ready")

    def _allocate_peer(self, groups: np.ndarray) -> None:
        """One process, every GPU of the mesh: a plain allocation per GPU, peer access between all of them, and
        each rank's peer table made of its group's allocations (the kernels are the same)."""
        del groups
        ordinals = [x.ordinal for x in self._ranks]
        if len(ordinals) > 1:
            self._module.enable_peer_access(ordinals)
        try:
            for x in self._ranks:
                x.region = int(self._module.alloc_region(x.ordinal, self.region_bytes))
        except RuntimeError as exc:
            self._free()
            raise MemoryError(
                f"jax_ll_ep: could not allocate {self.region_bytes} bytes for cuda buffer {self.handle}: {exc}. "
                f"{_MEMORY_HINT}."
            ) from exc
        by_place = {(x.group, x.rank): x for x in self._ranks}
        num_ranks = self.config.num_ranks
        for x in self._ranks:
            peers = [by_place[(x.group, r)].region for r in range(num_ranks)]
            self._register(x, peers, [0] * num_ranks)  # (zeroes the region and waits for it)
        self._peer_summary = f"load/store through peer access between CUDA devices {ordinals}"

    # ----------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raises the first error this process's ranks recorded since the last check (after waiting for their
        enqueued calls; the root cause first), then clears them."""
        settle_order_token(self.handle)  # a failed call's ordering token would fail every later call
        records = [self._module.take_error(self.handle, x.ordinal) for x in self._ranks]
        records = [record for record in records if record is not None]
        if records:
            raise exception(self.name, records)

    def _mask_states(self) -> list[dict]:
        return [
            {"group": x.group, "rank": x.rank, **self._module.mask_state(self.handle, x.ordinal)} for x in self._ranks
        ]

    def _set_mask(self, ranks: tuple[int, ...], seq: int) -> None:
        for x in self._ranks:
            self._module.set_mask(self.handle, x.ordinal, list(ranks), seq)

    def close(self) -> None:
        """Collective and idempotent."""
        with _lock:
            if self._closed:
                return
            settle_order_token(self.handle)
            self._unregister()
            self._barrier("close")  # every rank's kernels are done before anyone frees
            if self._process_left_out():
                # nvshmem's free is collective: it would wait for the process that is gone. The region stays
                # allocated until this process exits.
                log.warning("jax_ll_ep: cuda buffer %d: a process is gone; its region is kept until exit", self.handle)
                self._buffer = None
                if self in _live:
                    _live.remove(self)
                return
            self._free()

    def trace(self) -> tuple[bytes, int]:
        """Benchmarks (``CudaOptions(trace=True)``): the first local rank's phase trace rows (launch.h) and its last
        completed call."""
        ordinal = self._ranks[0].ordinal
        return self._module.read_trace(self.handle, ordinal), int(self._module.sequence_number(self.handle, ordinal))

    # ----------------------------------------------------------------------------------------------------------
    def _unregister(self) -> None:
        if not self._closed:
            self._closed = True
            for x in self._ranks:
                if x.registered:
                    x.registered = False
                    self._module.unregister_buffer(self.handle, x.ordinal)  # waits for the device's work

    def _free(self) -> None:
        if self._buffer is not None:
            import nvshmem.core as nvshmem

            buffer, self._buffer = self._buffer, None
            nvshmem.free(buffer)
        if self.transport == "peer":
            for x in self._ranks:
                if x.region:
                    region, x.region = x.region, 0
                    self._module.free_region(x.ordinal, region)
        if self in _live:
            _live.remove(self)
