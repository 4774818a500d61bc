"""Loads the CPU extension module and registers its FFI targets for the "cpu" platform.

The CPU module is always built (pip install compiles it); if it is missing (a source checkout that was never built),
the ``cpu`` backend is unavailable and ``backend="auto"`` falls back to ``xla`` on CPU meshes. The CUDA module is
separate and is loaded only when a ``cuda`` buffer is created (_cuda_backend.py).
"""

from __future__ import annotations

import jax

TARGETS = (
    "jax_ll_ep_dispatch",
    "jax_ll_ep_dispatch_send",
    "jax_ll_ep_dispatch_recv",
    "jax_ll_ep_combine",
    "jax_ll_ep_combine_send",
    "jax_ll_ep_combine_recv",
)

try:
    from . import _jax_ll_ep_cpu as cpu_module  # type: ignore[attr-defined]
except ImportError as _exc:  # not built: the cpu backend is unavailable, and says why when asked for
    cpu_module = None
    _import_error: ImportError | None = _exc
else:
    _import_error = None
    for _name, _capsule in cpu_module.ffi_handlers().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def cpu_module_available() -> bool:
    return cpu_module is not None


def require_cpu_module():
    if cpu_module is None:
        raise RuntimeError(
            "the jax_ll_ep CPU extension is not built, so backend='cpu' is unavailable "
            f"({_import_error}); install the package with `pip install .` (see README)"
        )
    return cpu_module
