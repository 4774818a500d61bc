"""Frozen configuration objects, validated on construction with messages that name the bad value."""

from __future__ import annotations

import dataclasses
from typing import Literal

MAX_TOPK = 32  # mirrors kMaxTopk in xla_ffi/include/jax_ll_ep/layout.h
SCALE_BLOCK = 128  # channels per fp8 scale; mirrors kScaleBlock
BACKENDS = ("auto", "cuda", "cpu", "xla")
FP8_SCALE_FORMATS = ("float", "pow2", "ue8m0")

# Wire codes of Fp8Mode in layout.h.
_FP8_MODE_CODES = {None: 0, "float": 1, "pow2": 2, "ue8m0": 3}


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
        return _FP8_MODE_CODES[self.scale_format]


def fp8_mode_code(fp8: Fp8Options | None) -> int:
    return 0 if fp8 is None else fp8.mode_code


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
        if self.hidden % 8:
            raise ValueError(f"hidden={self.hidden} must be a multiple of 8 (of 128 for fp8 dispatch)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 86400):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a number of seconds in (0, 86400]")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def recv_rows(self) -> int:
        """Rows per local expert in the receive layout: R * T."""
        return self.num_ranks * self.max_tokens_per_rank
