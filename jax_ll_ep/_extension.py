"""The native extension modules: loading them, registering their FFI targets, and the constants and error texts they
define (xla_ffi/include/jax_ll_ep/: limits.h, layout.h, errors.h), so that Python keeps no copies of them.

The CPU module is part of the package (``pip install .`` and ``scripts/dev.sh build`` compile it); it is loaded, and
its targets registered for platform "cpu", when jax_ll_ep is imported, and its constants serve every backend. The CUDA
module is loaded, and its targets registered for "CUDA", by the first ``cuda`` buffer (:func:`cuda_module`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading

import jax

try:
    from . import _jax_ll_ep_cpu as cpu_module  # type: ignore[attr-defined]
except ImportError as exc:
    raise ImportError(
        f"jax_ll_ep: its native extension is not built or does not load ({exc}); build it with `pip install .` or, "
        "in a source checkout, `scripts/dev.sh build` (see README)"
    ) from exc

for _name, _capsule in cpu_module.ffi_handlers().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

MAX_TOPK: int = cpu_module.MAX_TOPK  # largest K (limits.h)
SCALE_BLOCK: int = cpu_module.SCALE_BLOCK  # channels per fp8 scale
HIDDEN_MULTIPLE: int = cpu_module.HIDDEN_MULTIPLE  # hidden must be a multiple of it
FP8_MODES: dict[str, int] = dict(cpu_module.FP8_MODES)  # Fp8Mode by name: "none", "float", "pow2", "ue8m0"
ERROR_NAMES: tuple[str, ...] = tuple(cpu_module.ERROR_NAMES)  # ErrorCode by value: "ok", "timeout", ...
HOOK_POINTS: tuple[str, ...] = tuple(cpu_module.HOOK_POINTS)  # the cpu test hooks' delay points, in protocol order


def region_bytes(num_ranks: int, num_experts: int, max_tokens: int, hidden: int) -> int:
    """Bytes of one rank's region: make_layout of layout.h, the same layout on both platforms."""
    return int(cpu_module.region_bytes(num_ranks, num_experts, max_tokens, hidden))


def describe_routing_error(
    code: str, *, group: int, rank: int, expert: int, token: int, topk_pos: int, num_experts: int
) -> str:
    """The sentence errors.h gives a routing error ``code`` ("invalid_expert" or "duplicate_expert")."""
    return cpu_module.describe_routing_error(code, group, rank, expert, token, topk_pos, num_experts)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA module
# ---------------------------------------------------------------------------------------------------------------
_cuda_lock = threading.Lock()
_cuda_module = None


def cuda_available() -> bool:
    """Whether the CUDA module is built and nvshmem4py / cuda.core are importable (nothing is loaded)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None for name in ("jax_ll_ep._jax_ll_ep_cuda", "nvshmem", "cuda.core")
        )
    except (ImportError, ValueError):
        return False


def cuda_module():
    """The CUDA module, loaded (after making libnvshmem_host.so.3 resolvable) and its FFI targets registered."""
    global _cuda_module
    with _cuda_lock:
        if _cuda_module is not None:
            return _cuda_module
        import nvidia.nvshmem

        # The JAX CUDA plugin normally has this library loaded already; loading it by path is a no-op then, and
        # otherwise makes the module's NEEDED entry resolve to the wheel's copy (one NVSHMEM host state).
        lib = os.path.join(list(nvidia.nvshmem.__path__)[0], "lib", "libnvshmem_host.so.3")
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        from . import _jax_ll_ep_cuda as module  # type: ignore[attr-defined]

        for name, capsule in module.ffi_handlers().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _cuda_module = module
        return module
