"""jax_ll_ep: low-latency expert-parallel (MoE) dispatch and combine for JAX.

Importing loads the CPU extension module and registers its FFI targets (the CUDA module is loaded, and its targets
registered, by the first ``cuda`` buffer) and does nothing else.
"""

from . import _extension as _extension  # registers the CPU targets
from .buffers import Buffer
from .config import CudaOptions, Fp8Options
from .errors import (
    BufferClosedError,
    JaxLlEpError,
    ProtocolTimeoutError,
    RanksMaskedError,
    RoutingError,
    SequenceMismatchError,
)
from .experts import GroupedMatmulConfig, grouped_matmul, swiglu, swiglu_mlp
from .ops import (
    combine,
    combine_recv,
    combine_send,
    dispatch,
    dispatch_recv,
    dispatch_send,
)
from .types import CombinePending, DispatchHandle, DispatchPending, DroppedPairs, Fp8Array

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "BufferClosedError",
    "CombinePending",
    "CudaOptions",
    "DispatchHandle",
    "DispatchPending",
    "DroppedPairs",
    "Fp8Array",
    "Fp8Options",
    "GroupedMatmulConfig",
    "JaxLlEpError",
    "ProtocolTimeoutError",
    "RanksMaskedError",
    "RoutingError",
    "SequenceMismatchError",
    "combine",
    "combine_recv",
    "combine_send",
    "dispatch",
    "dispatch_recv",
    "dispatch_send",
    "grouped_matmul",
    "swiglu",
    "swiglu_mlp",
]
