"""Frozen configuration objects, validated on construction with messages that name the bad value."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal

from ._extension import FP8_MODES, HIDDEN_MULTIPLE, SCALE_BLOCK

BACKENDS = ("auto", "cuda", "cpu", "xla")
ON_TIMEOUT = ("raise", "mask")
FP8_SCALE_FORMATS = tuple(name for name in FP8_MODES if name != "none")


@dataclasses.dataclass(frozen=True)
class Fp8Options:
    """FP8 (e4m3) dispatch with one scale per 128 channels of each token.

    ``scale_format``:
      - ``"float"``: float32 scale ``amax / 448`` (amax floored at 1e-4);
      - ``"pow2"``: float32 scale rounded up to a power of two;
      - ``"ue8m0"``: the power-of-two scale delivered as its UE8M0 exponent (dtype ``float8_e8m0fnu``).

    ``recv_x`` then is an :class:`Fp8Array` ``(data [E_l, R*T, H] float8_e4m3fn, scale [E_l, R*T, H/128])``, and
    the original value is ``data * scale`` per 128-channel block. FP8 dispatch is forward-only.
    """

    scale_format: Literal["float", "pow2", "ue8m0"] = "float"

    def __post_init__(self):
        if self.scale_format not in FP8_SCALE_FORMATS:
            raise ValueError(
                f"Fp8Options.scale_format={self.scale_format!r} is not supported; allowed: {FP8_SCALE_FORMATS}"
            )

    @property
    def mode_code(self) -> int:
        """The Fp8Mode the native backends receive (layout.h)."""
        return FP8_MODES[self.scale_format]


def fp8_mode_code(fp8: Fp8Options | None) -> int:
    return FP8_MODES["none"] if fp8 is None else fp8.mode_code


# ---------------------------------------------------------------------------------------------------------------
# Options of the cuda backend
# ---------------------------------------------------------------------------------------------------------------
CUDA_TRANSPORTS = ("auto", "nvshmem", "peer")
TRANSPORT_ENV = "JAX_LL_EP_CUDA_TRANSPORT"  # the default of CudaOptions.transport
FORCE_PUT_ENV = "JAX_LL_EP_FORCE_PUT"  # "1": the default of CudaOptions.force_put is True
TRACE_ENV = "JAX_LL_EP_TRACE"  # "1": the default of CudaOptions.trace is True


@functools.cache
def environment_defaults() -> dict:
    """CudaOptions' defaults from the environment, read once per process (the first CudaOptions made reads them)."""
    transport = os.environ.get(TRANSPORT_ENV, "auto")
    if transport not in CUDA_TRANSPORTS:
        raise ValueError(f"{TRANSPORT_ENV}={transport!r} is not a cuda transport; allowed: {CUDA_TRANSPORTS}")
    return dict(
        transport=transport,
        force_put=os.environ.get(FORCE_PUT_ENV, "") not in ("", "0"),
        trace=os.environ.get(TRACE_ENV, "") == "1",
    )


@dataclasses.dataclass(frozen=True)
class CudaOptions:
    """Options of the ``cuda`` backend (``Buffer(..., cuda=CudaOptions(...))``); other backends ignore them.

    ``transport``:
      - ``"auto"``: ``"peer"`` when this process holds every GPU of the mesh (and puts are not forced), else
        ``"nvshmem"``;
      - ``"nvshmem"``: NVSHMEM symmetric memory, one process per GPU (several may share one GPU under CUDA MPS);
      - ``"peer"``: one process driving every GPU of the mesh: plain allocations reached through CUDA peer access.
    ``force_put``: reach every peer (self included) through NVSHMEM device puts, even where load/store would do
    (the nvshmem transport; tests and measurements of the network path).
    ``trace``: record the kernels' phase trace of recent calls (performance work; see benchmarks/).

    A field left out takes its default from the environment, read once per process: JAX_LL_EP_CUDA_TRANSPORT,
    JAX_LL_EP_FORCE_PUT=1, JAX_LL_EP_TRACE=1 (else "auto", False, False).
    """

    transport: Literal["auto", "nvshmem", "peer"] = dataclasses.field(
        default_factory=lambda: environment_defaults()["transport"]
    )
    force_put: bool = dataclasses.field(default_factory=lambda: environment_defaults()["force_put"])
    trace: bool = dataclasses.field(default_factory=lambda: environment_defaults()["trace"])

    def __post_init__(self):
        if self.transport not in CUDA_TRANSPORTS:
            raise ValueError(f"CudaOptions.transport={self.transport!r} is not supported; allowed: {CUDA_TRANSPORTS}")
        for name in ("force_put", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CudaOptions.{name}={getattr(self, name)!r} must be a bool")
        if self.transport == "peer" and self.force_put:
            raise ValueError(
                "CudaOptions(transport='peer', force_put=True): the peer transport has no NVSHMEM puts; force_put "
                "needs transport='nvshmem' or 'auto'"
            )


# ---------------------------------------------------------------------------------------------------------------
# The buffer's static configuration
# ---------------------------------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """Static description of one expert-parallel exchange: what every call on a buffer must agree with."""

    axis_name: str
    num_ranks: int
    num_experts: int
    max_tokens_per_rank: int
    hidden: int
    backend: str = "auto"
    timeout_s: float = 100.0
    on_timeout: str = "raise"

    def __post_init__(self):
        _positive_int("num_ranks (size of the buffer's mesh axis)", self.num_ranks)
        _positive_int("num_experts", self.num_experts)
        _positive_int("max_tokens_per_rank", self.max_tokens_per_rank)
        _positive_int("hidden", self.hidden)
        if self.num_experts % self.num_ranks:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by the size of mesh axis "
                f"{self.axis_name!r} ({self.num_ranks}); allowed: a multiple of {self.num_ranks}"
            )
        if self.hidden % HIDDEN_MULTIPLE:
            raise ValueError(
                f"hidden={self.hidden} must be a multiple of {HIDDEN_MULTIPLE} (of {SCALE_BLOCK} for fp8 dispatch)"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 86400):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a number of seconds in (0, 86400]")
        if self.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout={self.on_timeout!r} is not one of {ON_TIMEOUT}")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def recv_rows(self) -> int:
        """Rows per local expert in the receive layout: R * T."""
        return self.num_ranks * self.max_tokens_per_rank
