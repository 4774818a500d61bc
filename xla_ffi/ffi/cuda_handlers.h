// The CUDA platform's handlers of the FFI targets (ffi/targets.h), and the benchmarks' timestamp target, for
// cuda_module.cc to register.
#pragma once

#include <array>

#include "ffi/targets.h"

namespace jax_ll_ep::cuda {

std::array<TargetHandler, kNumTargets> cuda_target_handlers();
TargetHandler cuda_timestamp_handler();

}  // namespace jax_ll_ep::cuda
