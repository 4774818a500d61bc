"""The backends. Each is one object per buffer that carries the buffer's lifecycle (its memory, ``check``, ``close``)
and its ops (fused and split), so that ``jax_ll_ep.ops`` validates the arguments and calls ``buf.backend``:

  xla.py     pure JAX over ``jax.lax.all_to_all``: the portable fallback and the baseline (holds no memory)
  cpu.py     the protocol in C++ over host memory (xla_ffi/cpu/), threads or processes of one host
  cuda.py    the protocol's CUDA kernels over NVSHMEM or peer memory (xla_ffi/cuda/)
  native.py  what cpu and cuda share: the ops as ordered FFI calls, the error records

:func:`open_backend` is the one place a buffer's backend is chosen.
"""

from __future__ import annotations

from typing import Protocol

from jax.sharding import Mesh

from .. import _extension
from ..config import BufferConfig, CudaOptions, Fp8Options
from ..types import CombinePending, DispatchHandle, DispatchPending


class Backend(Protocol):
    """What a buffer's backend provides. The ops run inside ``shard_map`` over the buffer's axis on this rank's local
    shard, after jax_ll_ep.ops has validated their arguments (shapes and dtypes as documented there)."""

    name: str  # "xla", "cpu" or "cuda"

    @property
    def region_bytes(self) -> int:
        """Bytes of communication memory per rank (0 for the xla backend)."""

    def check(self) -> None:
        """Raises the first error recorded since the last check (and clears it)."""

    def close(self) -> None:
        """Frees the memory; collective and idempotent."""

    def mask_ranks(self, ranks: tuple[int, ...]) -> None:
        """Sets the mask (validated, sorted, unique ranks); collective over the live processes."""

    def masked_ranks(self) -> tuple[int, ...]:
        """The ranks this process's ranks treat as masked."""

    def dropped_pairs(self) -> dict:
        """{(group, rank): DroppedPairs} of this process's ranks."""

    def dispatch(self, x, topk_idx, fp8: Fp8Options | None): ...

    def combine(self, y, topk_idx, topk_weights, handle: DispatchHandle): ...

    def dispatch_send(self, x, topk_idx, fp8: Fp8Options | None) -> DispatchPending: ...

    def dispatch_recv(self, pending: DispatchPending): ...

    def combine_send(self, y, topk_idx, topk_weights, handle: DispatchHandle) -> CombinePending: ...

    def combine_recv(self, pending: CombinePending): ...


def _platform_of(mesh: Mesh) -> str:
    platforms = {d.platform for d in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"the buffer's mesh mixes device platforms {sorted(platforms)}; use one platform")
    return platforms.pop()


def resolve(requested: str, mesh: Mesh) -> str:
    """The backend a buffer gets: ``auto`` is cuda on GPUs (when the CUDA module and NVSHMEM are there), cpu on CPUs,
    else xla; an explicit choice must suit the mesh's devices."""
    platform = _platform_of(mesh)
    if requested == "auto":
        if platform == "gpu":
            return "cuda" if _extension.cuda_available() else "xla"
        return "cpu" if platform == "cpu" else "xla"
    if requested == "cuda" and platform != "gpu":
        raise ValueError(f"backend='cuda' needs a mesh of GPU devices; this mesh's devices are {platform!r}")
    if requested == "cpu" and platform != "cpu":
        raise ValueError(f"backend='cpu' needs a mesh of CPU devices; this mesh's devices are {platform!r}")
    return requested


def open_backend(config: BufferConfig, mesh: Mesh, handle: int, cuda: CudaOptions) -> Backend:
    """Creates the buffer's backend (collective for the native ones: it allocates their memory)."""
    name = resolve(config.backend, mesh)
    if name == "xla":
        from .xla import XlaBackend

        return XlaBackend(config, mesh)
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(config, mesh, handle)
    from .cuda import CudaBackend

    return CudaBackend(config, mesh, handle, cuda)
