"""The ``cuda`` backend: CUDA kernels over NVSHMEM symmetric memory, one process per GPU.

Bootstrap (collective over every process, outside jit; DESIGN.md section 5):
  1. The first cuda buffer of the process initializes NVSHMEM: rank 0 creates the unique id and broadcasts it
     through the JAX distributed key-value store; every process initializes nvshmem4py in UID mode (host library
     only); then the CUDA module registers its own device-side NVSHMEM state (``nvshmemx_init_attr``, reference
     counted). The CUDA module is loaded, and its six FFI targets registered for platform "CUDA", at that point.
  2. Every buffer: each process checks that its GPU has room for the region (the result is exchanged, so either all
     allocate or all raise), allocates ``region_bytes`` collectively (``nvshmem.core.buffer``), zeroes it, builds its
     peer table (``nvshmem_ptr`` pointers for load/store-reachable peers, NVSHMEM device puts for the others, or for
     every peer with ``JAX_LL_EP_FORCE_PUT=1``) and waits for everyone before any kernel may write to a peer.
  3. Teardown: ``close()`` frees the region collectively; at exit the module's ``nvshmem_finalize`` runs, then the
     remaining regions are freed, then nvshmem4py's ``finalize``. Idempotent.

The processes' NVSHMEM PE index is their JAX process index; each process owns exactly one GPU of the mesh
(``jax.distributed.initialize(local_device_ids=[i])``). For tests, several processes may share one GPU under the
CUDA MPS daemon (NVSHMEM "MPG" mode).
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
class CudaImpl:
    """This process's share of a ``cuda`` buffer: one rank of one group (see the module docstring)."""

    name = "cuda"

    def __init__(self, buf):
        cfg = buf.config
        self._handle = buf.handle
        self._closed = False
        self._buffer = None
        me = jax.process_index()
        groups = device_groups(buf.mesh, cfg.axis_name)
        mine = [(g, r) for (g, r), d in np.ndenumerate(groups) if d.process_index == me]
        if len(mine) != 1:
            raise ValueError(
                f"backend='cuda' needs exactly one GPU of the mesh per process (NVSHMEM's rule: one PE per process), "
                f"but process {me} owns {len(mine)}; start one process per GPU with "
                "jax.distributed.initialize(..., local_device_ids=[i])"
            )
        processes = sorted({int(d.process_index) for d in groups.flat})
        if processes != list(range(jax.process_count())):
            raise ValueError(
                f"backend='cuda' allocates NVSHMEM memory collectively over all {jax.process_count()} processes, "
                f"but the mesh covers processes {processes}; build the buffer on a mesh of every process's GPU"
            )
        self._group, self._rank = mine[0]
        device = groups[self._group, self._rank]
        self._ordinal = int(device.local_hardware_id)
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
            _init_nvshmem(self._ordinal)
            self._check_memory()
            self._allocate(cfg, groups)
            _live.append(self)
        log.info(
            "jax_ll_ep: cuda buffer %d: %d bytes of symmetric memory per rank (rank %d of group %d, peers %s)",
            self._handle,
            self._region_bytes,
            self._rank,
            self._group,
            self._peer_summary,
        )

    # ----------------------------------------------------------------------------------------------------------
    def _key(self, what: str) -> str:
        # Buffers are created collectively in the same order everywhere: the handle names the same buffer.
        return f"jax_ll_ep/cuda/{self._handle}/{what}"

    def _barrier(self, what: str) -> None:
        if jax.process_count() > 1:
            distributed_client().wait_at_barrier(self._key(what), _BOOTSTRAP_TIMEOUT_MS)

    def _check_memory(self) -> None:
        """Every process checks its GPU's free memory; all raise together if any is short (the allocation that
        follows is collective, so a lone failure would leave the others waiting)."""
        free, _ = self._module.mem_get_info(self._ordinal)
        need = self._region_bytes + (64 << 20)  # region + workspace and NVSHMEM's own bookkeeping, roughly
        status = "ok" if free >= need else f"GPU {self._ordinal} has {free} bytes free, needs about {need}"
        statuses = [status]
        if jax.process_count() > 1:
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
                f"symmetric memory per rank): {'; '.join(short)}. {_MEMORY_HINT}."
            )

    def _allocate(self, cfg, groups: np.ndarray) -> None:
        import nvshmem.core as nvshmem
        from nvshmem import bindings as nvshmem_bindings

        try:
            self._buffer = nvshmem.buffer(self._region_bytes)
        except Exception as exc:
            raise MemoryError(
                f"jax_ll_ep: NVSHMEM could not allocate {self._region_bytes} bytes of symmetric memory for cuda "
                f"buffer {self._handle}: {exc}. {_MEMORY_HINT}."
            ) from exc
        region = int(self._buffer.handle)
        force_put = os.environ.get(FORCE_PUT_ENV, "") not in ("", "0")
        pes = [int(d.process_index) for d in groups[self._group]]
        peers = [0 if force_put else int(nvshmem_bindings.ptr(region, pe)) for pe in pes]
        self._peer_summary = ", ".join(f"{r}:{'load/store' if p else 'put'}" for r, p in enumerate(peers))
        self._module.register_buffer(
            handle=self._handle,
            device=self._ordinal,
            num_ranks=cfg.num_ranks,
            num_experts=cfg.num_experts,
            max_tokens=cfg.max_tokens_per_rank,
            hidden=cfg.hidden,
            rank=self._rank,
            region=region,
            peer_regions=peers,
            peer_pes=pes,
            timeout_s=float(cfg.timeout_s),
        )
        # Every region is zeroed and registered before any rank's kernel may write into a peer's.
        self._barrier("ready")

    # ----------------------------------------------------------------------------------------------------------
    # BackendImpl
    # ----------------------------------------------------------------------------------------------------------
    def region_bytes(self) -> int:
        return self._region_bytes

    def check(self) -> None:
        """Raises the first error this rank recorded since the last check (after waiting for its enqueued calls),
        then clears it."""
        settle_order_token(self._handle)  # a failed call's ordering token would fail every later call
        state = self._module.read_state(self._handle)
        if state["error_code"] == 0:
            return
        self._module.clear_error(self._handle)
        raise exception("cuda", [self._record(state)])

    def close(self) -> None:
        """Collective and idempotent."""
        with _lock:
            if self._closed:
                return
            settle_order_token(self._handle)
            self._unregister()
            self._barrier("close")  # every rank's kernels are done before anyone frees
            self._free()

    # ----------------------------------------------------------------------------------------------------------
    def _unregister(self) -> None:
        if not self._closed:
            self._closed = True
            self._module.unregister_buffer(self._handle)  # waits for this process's work on the device

    def _free(self) -> None:
        if self._buffer is not None:
            import nvshmem.core as nvshmem

            buffer, self._buffer = self._buffer, None
            nvshmem.free(buffer)
        if self in _live:
            _live.remove(self)

    def _record(self, state: dict) -> dict:
        missing = np.frombuffer(state["missing"], dtype=np.uint8)
        num_ranks = state["num_ranks"]
        return dict(
            rank=self._rank,
            group=self._group,
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
