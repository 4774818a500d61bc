// The CPU platform's handlers of the FFI targets (ffi/targets.h), for cpu_module.cc to register.
#pragma once

#include <array>

#include "ffi/targets.h"

namespace jax_ll_ep::cpu {

std::array<TargetHandler, kNumTargets> cpu_target_handlers();

}  // namespace jax_ll_ep::cpu
