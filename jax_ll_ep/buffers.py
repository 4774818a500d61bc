"""The buffer registry: collective allocation outside jit, integer handles inside it.

A :class:`Buffer` owns one process's share of the symmetric memory of one expert-parallel exchange. Traced code
carries only ``buffer.handle`` (a small int, baked into the HLO as an attribute); the native side resolves it in its
own registry. Buffers are context managers; ``close()`` is collective, idempotent, and also runs at interpreter exit
(in reverse creation order).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
from typing import Protocol

import jax
from jax.sharding import Mesh

from .config import BufferConfig
from .errors import BufferClosedError, RoutingError

log = logging.getLogger("jax_ll_ep")


class BackendImpl(Protocol):
    """What a backend provides to a Buffer. Implemented in _cpu_backend.py and _cuda_backend.py."""

    name: str

    def region_bytes(self) -> int:
        """Bytes of symmetric memory per rank."""

    def check(self) -> None:
        """Raises the first error recorded by the protocol since the last check (and clears it)."""

    def close(self) -> None:
        """Collective free; idempotent."""


class _XlaImpl:
    """The pure-JAX backend holds no memory outside XLA. Its dispatch reports routing errors (bad ids are treated
    as -1) through a host callback; ``check()`` raises the first one."""

    name = "xla"

    def __init__(self):
        self._errors_lock = threading.Lock()
        self._routing_errors: list[tuple[int, int]] = []

    def region_bytes(self) -> int:
        return 0

    def record_routing_error(self, code: int, expert_id: int) -> None:
        with self._errors_lock:
            self._routing_errors.append((code, expert_id))

    def check(self) -> None:
        from .reference import INVALID_EXPERT

        jax.effects_barrier()  # the host callbacks of calls already dispatched have run
        with self._errors_lock:
            errors, self._routing_errors = self._routing_errors, []
        if errors:
            code, expert_id = errors[0]
            what = "outside [-1, num_experts)" if code == INVALID_EXPERT else "repeated within a token's row"
            more = f" (+{len(errors) - 1} more calls with errors)" if len(errors) > 1 else ""
            raise RoutingError(
                f"jax_ll_ep xla backend: topk_idx held expert id {expert_id}, {what}; the entry was treated as -1{more}"
            )

    def close(self) -> None:
        pass


_lock = threading.Lock()
_registry: dict[int, Buffer] = {}
_next_handle = itertools.count(1)


def lookup(handle: int) -> Buffer:
    with _lock:
        buf = _registry.get(handle)
    if buf is None:
        raise BufferClosedError(f"buffer handle {handle} is not open (closed, or never created in this process)")
    return buf


def _platform_of(mesh: Mesh) -> str:
    platforms = {d.platform for d in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"the buffer's mesh mixes device platforms {sorted(platforms)}; use one platform")
    return platforms.pop()


def resolve_backend(requested: str, platform: str) -> str:
    """``auto``: cuda on GPUs, else cpu when the native module is built, else xla."""
    if requested == "auto":
        if platform == "gpu":
            from . import _cuda_backend

            return "cuda" if _cuda_backend.available() else "xla"
        from . import _native

        return "cpu" if platform == "cpu" and _native.cpu_module_available() else "xla"
    if requested == "cuda" and platform != "gpu":
        raise ValueError(f"backend='cuda' needs a mesh of GPU devices; this mesh's devices are {platform!r}")
    if requested == "cpu" and platform != "cpu":
        raise ValueError(f"backend='cpu' needs a mesh of CPU devices; this mesh's devices are {platform!r}")
    return requested


class Buffer:
    """Symmetric communication memory for dispatch/combine over one mesh axis.

    Collective: every process that owns devices of ``mesh`` must construct it, in the same order as its other
    buffers, outside jit. Use it inside ``jax.shard_map`` over ``mesh`` with ``axis_name`` manual.

    Args:
      mesh: the device mesh; ``axis_name`` is its expert-parallel axis. Every slice of the mesh along the other axes
        is an independent group of ``mesh.shape[axis_name]`` ranks.
      axis_name: the expert-parallel mesh axis.
      num_experts: E, divisible by the axis size R.
      max_tokens_per_rank: T, the most tokens any rank passes to one call.
      hidden: H, a multiple of 8 (of 128 for fp8 dispatch).
      backend: ``"auto"`` (cuda on GPUs, cpu on CPUs when the native module is built, else xla), ``"cuda"``,
        ``"cpu"`` or ``"xla"``.
      timeout_s: bound on every wait for peers; a call that runs past it raises ProtocolTimeoutError naming the
        (rank, local expert) pairs whose signals never came.
    """

    def __init__(
        self,
        mesh: Mesh,
        axis_name: str,
        *,
        num_experts: int,
        max_tokens_per_rank: int,
        hidden: int,
        backend: str = "auto",
        timeout_s: float = 100.0,
    ):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
        self.mesh = mesh
        self.config = BufferConfig(
            axis_name=axis_name,
            num_ranks=mesh.shape[axis_name],
            num_experts=num_experts,
            max_tokens_per_rank=max_tokens_per_rank,
            hidden=hidden,
            backend=backend,
            timeout_s=float(timeout_s),
        )
        self.backend = resolve_backend(backend, _platform_of(mesh))
        with _lock:
            self.handle = next(_next_handle)
        self._closed = False
        self._impl: BackendImpl = self._open_impl()
        with _lock:
            _registry[self.handle] = self
        log.info("jax_ll_ep: %r", self)

    def _open_impl(self) -> BackendImpl:
        if self.backend == "xla":
            return _XlaImpl()
        if self.backend == "cpu":
            from . import _cpu_backend

            return _cpu_backend.CpuImpl(self)
        from . import _cuda_backend

        return _cuda_backend.CudaImpl(self)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def axis_name(self) -> str:
        return self.config.axis_name

    @property
    def num_ranks(self) -> int:
        return self.config.num_ranks

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def max_tokens_per_rank(self) -> int:
        return self.config.max_tokens_per_rank

    @property
    def hidden(self) -> int:
        return self.config.hidden

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nbytes_per_rank(self) -> int:
        """Symmetric memory held per rank (0 for the xla backend)."""
        return self._impl.region_bytes()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Buffer(handle={self.handle}, backend={self.backend!r}, axis={c.axis_name!r}, ranks={c.num_ranks}, "
            f"experts={c.num_experts}, max_tokens_per_rank={c.max_tokens_per_rank}, hidden={c.hidden}, "
            f"bytes_per_rank={self.nbytes_per_rank}{', closed' if self._closed else ''})"
        )

    def ensure_open(self) -> None:
        if self._closed:
            raise BufferClosedError(f"{self!r} is closed; create a new Buffer")

    def check(self) -> None:
        """Raises the first error the protocol recorded since the last check (timeouts, routing errors,
        mismatched call sequences), then clears it."""
        self.ensure_open()
        self._impl.check()

    def close(self) -> None:
        """Frees the buffer. Collective; idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        with _lock:
            _registry.pop(self.handle, None)
        self._impl.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all_at_exit() -> None:
    with _lock:
        buffers = sorted(_registry.values(), key=lambda b: -b.handle)
    for buf in buffers:
        try:
            buf.close()
        except Exception as exc:  # noqa: BLE001 - teardown at exit must not mask the real exit status
            log.warning("jax_ll_ep: closing %r at exit failed: %s", buf, exc)


def local_devices_of(mesh: Mesh) -> list[jax.Device]:
    """The mesh's devices owned by this process."""
    pid = jax.process_index()
    return [d for d in mesh.devices.flat if d.process_index == pid]
