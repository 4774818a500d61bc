"""The ``cuda`` backend: the protocol's CUDA kernels over one region per rank, reached through one of two transports.

Transports (chosen per buffer, ``JAX_LL_EP_CUDA_TRANSPORT=nvshmem|peer`` overrides):
  nvshmem  one process per GPU (``jax.distributed.initialize(local_device_ids=[i])``; several processes may share one
           GPU under the CUDA MPS daemon): regions are NVSHMEM symmetric memory, peers are reached through
           ``nvshmem_ptr`` pointers (load/store) or NVSHMEM device puts. The default whenever the mesh spans several
           processes, and with ``JAX_LL_EP_FORCE_PUT=1``.
  peer     one process driving every GPU of the mesh (NVSHMEM cannot: one PE per process): each rank's region is a
           plain allocation on its GPU, peer access is enabled between all of them, and the kernels use the
           allocations as peer pointers. The default when the mesh lives in this one process; it needs no nvshmem4py
           initialization.

NVSHMEM bootstrap (collective over every process, outside jit; DESIGN.md section 5):
  1. The first nvshmem buffer of the process initializes NVSHMEM: rank 0 creates the unique id and broadcasts it
     through the JAX distributed key-value store; every process initializes nvshmem4py in UID mode (host library
     only); then the CUDA module registers its own device-side NVSHMEM state (``nvshmemx_init_attr``, reference
     counted). The CUDA module is loaded, and its FFI targets registered for platform "CUDA", before that.
  2. Every buffer: each process checks that its GPU has room for the region (the result is exchanged, so either all
     allocate or all raise), allocates ``region_bytes`` collectively (``nvshmem.core.buffer``), zeroes it, builds its
     peer table (``nvshmem_ptr`` pointers for load/store-reachable peers, NVSHMEM device puts for the others, or for
     every peer with ``JAX_LL_EP_FORCE_PUT=1``) and waits for everyone before any kernel may write to a peer.
  3. Teardown: ``close()`` frees the region collectively; at exit the module's ``nvshmem_finalize`` runs, then the
     remaining regions are freed, then nvshmem4py's ``finalize``. Idempotent.

The processes' NVSHMEM PE index is their JAX process index. The native registry holds one entry per (buffer, CUDA
device); an FFI call finds its entry by the device XLA runs it on.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import threading

import jax
import numpy as np

from ._native_common import device_groups, distributed_client, exception, settle_order_token

log = logging.getLogger("jax_ll_ep")

FORCE_PUT_ENV = "JAX_LL_EP_FORCE_PUT"  # "1": reach every peer (self included) through NVSHMEM device puts
TRANSPORT_ENV = "JAX_LL_EP_CUDA_TRANSPORT"  # "auto" (default), "nvshmem" or "peer"
_BOOTSTRAP_TIMEOUT_MS = 120_000


_MEMORY_HINT = (
    "JAX preallocates 75% of GPU memory by default: set XLA_PYTHON_CLIENT_PREALLOCATE=false or lower "
    "XLA_CLIENT_MEM_FRACTION (e.g. 0.5) before JAX starts; NVSHMEM's symmetric heap is sized by "
    "NVSHMEM_SYMMETRIC_SIZE (it grows on demand up to NVSHMEM_MAX_MEMORY_PER_GPU)"
)


def available() -> bool:
    """Whether the CUDA module is built and nvshmem4py / cuda.core are importable (nothing is loaded)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None for name in ("jax_ll_ep._jax_ll_ep_cuda", "nvshmem", "cuda.core")
        )
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# The CUDA module and the process-wide NVSHMEM lifecycle
# ---------------------------------------------------------------------------------------------------------------
_lock = threading.RLock()
_module = None
_nvshmem_ready = False
_live: list[CudaImpl] = []


def _load_module():
    """Imports the CUDA module (after making libnvshmem_host.so.3 resolvable) and registers its FFI targets."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        import nvidia.nvshmem

        # The JAX CUDA plugin normally has this library loaded already; loading it by path is a no-op then, and
        # otherwise makes the module's NEEDED entry resolve to the wheel's copy (one NVSHMEM host state).
        lib = os.path.join(list(nvidia.nvshmem.__path__)[0], "lib", "libnvshmem_host.so.3")
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        from . import _jax_ll_ep_cuda as module  # type: ignore[attr-defined]

        for name, capsule in module.ffi_handlers().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _module = module
        return module


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

    module = _load_module()
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

        for impl in reversed(list(_live)):
            try:
                impl._unregister()
            except Exception as exc:  # noqa: BLE001 - teardown at exit must go on
                log.warning("jax_ll_ep: releasing cuda buffer %d at exit: %s", impl._handle, exc)
        _module.nvshmem_finalize()
        for impl in reversed(list(_live)):
            try:
                impl._free()
            except Exception as exc:  # noqa: BLE001
                log.warning("jax_ll_ep: freeing cuda buffer %d at exit: %s", impl._handle, exc)
        nvshmem.finalize()


# ---------------------------------------------------------------------------------------------------------------
# One buffer
# ---------------------------------------------------------------------------------------------------------------
def choose_transport(processes_in_mesh: int) -> str:
    """``peer`` when this process holds every GPU of the mesh (and puts are not forced), else ``nvshmem``;
    JAX_LL_EP_CUDA_TRANSPORT=nvshmem|peer overrides."""
    forced = os.environ.get(TRANSPORT_ENV, "auto")
    if forced not in ("auto", "nvshmem", "peer"):
        raise ValueError(f"{TRANSPORT_ENV}={forced!r}: use 'auto', 'nvshmem' or 'peer'")
    force_put = os.environ.get(FORCE_PUT_ENV, "") not in ("", "0")
    if forced == "peer" and (processes_in_mesh != 1 or force_put):
        raise ValueError(
            f"{TRANSPORT_ENV}=peer needs one process holding every GPU of the mesh and no {FORCE_PUT_ENV}; the mesh "
            f"spans {processes_in_mesh} process(es)"
        )
    if forced != "auto":
        return forced
    return "peer" if processes_in_mesh == 1 and not force_put else "nvshmem"


class _Rank:
    """One rank of the buffer held by this process: its place in the mesh, its GPU and its region."""

    def __init__(self, group: int, rank: int, ordinal: int):
        self.group, self.rank, self.ordinal = group, rank, ordinal
        self.region = 0  # device address
        self.registered = False


class CudaImpl:
    """This process's share of a ``cuda`` buffer: one rank per GPU it holds (see the module docstring)."""

    name = "cuda"

    def __init__(self, buf):
        cfg = buf.config
        self._handle = buf.handle
        self._closed = False
        self._buffer = None  # nvshmem transport: the symmetric allocation
        me = jax.process_index()
        groups = device_groups(buf.mesh, cfg.axis_name)
        processes = sorted({int(d.process_index) for d in groups.flat})
        mine = [(g, r) for (g, r), d in np.ndenumerate(groups) if d.process_index == me]
        self._transport = choose_transport(len(processes))
        if self._transport == "nvshmem":
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
        self._num_ranks = cfg.num_ranks
        module = _load_module()
        self._module = module
        if cfg.num_experts > module.max_experts():
            raise ValueError(
                f"num_experts={cfg.num_experts} is more than the cuda backend supports ({module.max_experts()})"
            )
        self._region_bytes = int(
            module.region_bytes(cfg.num_ranks, cfg.num_experts, cfg.max_tokens_per_rank, cfg.hidden)
        )
        with _lock:
            if self._transport == "nvshmem":
                _init_nvshmem(self._ranks[0].ordinal)
            self._check_memory()
            allocate = self._allocate_nvshmem if self._transport == "nvshmem" else self._allocate_peer
            allocate(cfg, groups)
            _live.append(self)
        log.info(
            "jax_ll_ep: cuda buffer %d (%s transport): %d bytes of region per rank, ranks %s, peers %s",
            self._handle,
            self._transport,
            self._region_bytes,
            [(x.group, x.rank, x.ordinal) for x in self._ranks],
            self._peer_summary,
        )

    # ----------------------------------------------------------------------------------------------------------
    def _key(self, what: str) -> str:
        # Buffers are created collectively in the same order everywhere: the handle names the same buffer.
        return f"jax_ll_ep/cuda/{self._handle}/{what}"

    def _barrier(self, what: str) -> None:
        if self._transport == "nvshmem" and jax.process_count() > 1:
            distributed_client().wait_at_barrier(self._key(what), _BOOTSTRAP_TIMEOUT_MS)

    def _check_memory(self) -> None:
        """Every process checks its GPUs' free memory; all raise together if any is short (an NVSHMEM allocation
        is collective, so a lone failure would leave the others waiting)."""
        need = self._region_bytes + (64 << 20)  # region + workspace and NVSHMEM's own bookkeeping, roughly
        status = "ok"
        for x in self._ranks:
            free, _ = self._module.mem_get_info(x.ordinal)
            if free < need:
                status = f"GPU {x.ordinal} has {free} bytes free, needs about {need}"
        statuses = [status]
        if self._transport == "nvshmem" and jax.process_count() > 1:
            client = distributed_client()
            client.key_value_set(self._key(f"mem/{jax.process_index()}"), status)
            statuses = [
                client.blocking_key_value_get(self._key(f"mem/{p}"), _BOOTSTRAP_TIMEOUT_MS)
                for p in range(jax.process_count())
            ]
        short = [f"process {p}: {s}" for p, s in enumerate(statuses) if s != "ok"]
        if short:
            raise MemoryError(
                f"jax_ll_ep: not enough GPU memory for cuda buffer {self._handle} ({self._region_bytes} bytes of "
                f"region per rank): {'; '.join(short)}. {_MEMORY_HINT}."
            )

    def _register(self, x: _Rank, cfg, peers: list[int], pes: list[int]) -> None:
        self._module.register_buffer(
            handle=self._handle,
            device=x.ordinal,
            num_ranks=cfg.num_ranks,
            num_experts=cfg.num_experts,
            max_tokens=cfg.max_tokens_per_rank,
            hidden=cfg.hidden,
            rank=x.rank,
            region=x.region,
            peer_regions=peers,
            peer_pes=pes,
            timeout_s=float(cfg.timeout_s),
        )
        x.registered = True

    def _allocate_nvshmem(self, cfg, groups: np.ndarray) -> None:
        import nvshmem.core as nvshmem
        from nvshmem import bindings as nvshmem_bindings

        try:
            self._buffer = nvshmem.buffer(self._region_bytes)
        except Exception as exc:
            raise MemoryError(
                f"jax_ll_ep: NVSHMEM could not allocate {self._region_bytes} bytes of symmetric memory for cuda "
                f"buffer {self._handle}: {exc}. {_MEMORY_HINT}."
            ) from exc
        x = self._ranks[0]
        x.region = int(self._buffer.handle)
        force_put = os.environ.get(FORCE_PUT_ENV, "") not in ("", "0")
        pes = [int(d.process_index) for d in groups[x.group]]
        peers = [0 if force_put else int(nvshmem_bindings.ptr(x.region, pe)) for pe in pes]
        self._peer_summary = ", ".join(f"{r}:{'load/store' if p else 'put'}" for r, p in enumerate(peers))
        self._register(x, cfg, peers, pes)
        # Every region is zeroed and registered before any rank's kernel may write into a peer's.
        self._barrier("ready")

    def _allocate_peer(self, cfg, groups: np.ndarray) -> None:
        """One process, every GPU of the mesh: a plain allocation per GPU, peer access between all of them, and
        each rank's peer table made of its group's allocations (the kernels are the same)."""
        ordinals = [x.ordinal for x in self._ranks]
        if len(ordinals) > 1:
            self._module.enable_peer_access(ordinals)
        try:
            for x in self._ranks:
                x.region = int(self._module.alloc_region(x.ordinal, self._region_bytes))
        except RuntimeError as exc:
            self._free()
            raise MemoryError(
                f"jax_ll_ep: could not allocate {self._region_bytes} bytes for cuda buffer {self._handle}: {exc}. "
                f"{_MEMORY_HINT}."
            ) from exc
        by_place = {(x.group, x.rank): x for x in self._ranks}
        for x in self._ranks:
            peers = [by_place[(x.group, r)].region for r in range(cfg.num_ranks)]
            self._register(x, cfg, peers, [0] * cfg.num_ranks)  # (zeroes the region and waits for it)
        self._peer_summary = f"load/store through peer access between CUDA devices {ordinals}"

    # ----------------------------------------------------------------------------------------------------------
    # BackendImpl
    # ----------------------------------------------------------------------------------------------------------
    def region_bytes(self) -> int:
        return self._region_bytes

    def check(self) -> None:
        """Raises the first error this process's ranks recorded since the last check (after waiting for their
        enqueued calls; the root cause first), then clears them."""
        settle_order_token(self._handle)  # a failed call's ordering token would fail every later call
        records = []
        for x in self._ranks:
            state = self._module.read_state(self._handle, x.ordinal)
            if state["error_code"] != 0:
                self._module.clear_error(self._handle, x.ordinal)
                records.append(self._record(x, state))
        if records:
            raise exception("cuda", records)

    def close(self) -> None:
        """Collective and idempotent."""
        with _lock:
            if self._closed:
                return
            settle_order_token(self._handle)
            self._unregister()
            self._barrier("close")  # every rank's kernels are done before anyone frees
            self._free()

    # Benchmarks (JAX_LL_EP_TRACE=1): the first local rank's phase trace rows and its last completed call.
    def trace(self) -> tuple[bytes, int]:
        x = self._ranks[0]
        return self._module.read_trace(self._handle, x.ordinal), int(
            self._module.read_state(self._handle, x.ordinal)["seq"]
        )

    # ----------------------------------------------------------------------------------------------------------
    def _unregister(self) -> None:
        if not self._closed:
            self._closed = True
            for x in self._ranks:
                if x.registered:
                    x.registered = False
                    self._module.unregister_buffer(self._handle, x.ordinal)  # waits for the device's work

    def _free(self) -> None:
        if self._buffer is not None:
            import nvshmem.core as nvshmem

            buffer, self._buffer = self._buffer, None
            nvshmem.free(buffer)
        if self._transport == "peer":
            for x in self._ranks:
                if x.region:
                    region, x.region = x.region, 0
                    self._module.free_region(x.ordinal, region)
        if self in _live:
            _live.remove(self)

    def _record(self, x: _Rank, state: dict) -> dict:
        missing = np.frombuffer(state["missing"], dtype=np.uint8)
        num_ranks = state["num_ranks"]
        return dict(
            rank=x.rank,
            group=x.group,
            kind=state["error_kind"],
            seq=state["error_seq"],
            code=state["error_code"],
            token=state["error_token"],
            topk_pos=state["error_topk_pos"],
            detail=state["error_detail"],
            signal=state["error_signal"],
            count=state["error_count"],
            missing=[(int(p) % num_ranks, int(p) // num_ranks) for p in np.flatnonzero(missing)],
        )
