// The CPU backend's XLA FFI handler symbols (defined in cpu_handlers.cc, registered by cpu_module.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxLlEpCpuCombineRecv);
