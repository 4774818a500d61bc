// The limits of an exchange, defined once for the CPU protocol, the CUDA kernels and the FFI handlers. Python reads
// them from the extension module (MAX_TOPK, SCALE_BLOCK, ...) instead of keeping copies.
#pragma once

#include <stdint.h>

namespace jax_ll_ep {

inline constexpr int kMaxTopk = 32;           // largest K accepted; the combine receive region has kMaxTopk rows/token
inline constexpr int kScaleBlock = 128;       // channels per fp8 scale; fp8 dispatch needs hidden % kScaleBlock == 0
inline constexpr int kHiddenMultiple = 8;     // hidden must be a multiple of this (16-byte bf16 rows)
inline constexpr int kMaxRanks = 4096;        // ranks of one expert-parallel group
inline constexpr int kMaxCudaExperts = 4096;  // experts (E_l x R signal pairs) the CUDA kernels' shared-memory
                                              // tables hold

}  // namespace jax_ll_ep
