# The optional CUDA module (_jax_ll_ep_cuda): kernels over NVSHMEM symmetric memory plus their FFI handlers.
#
# JAX_LL_EP_CUDA=ON fails the configure if nvcc or the NVSHMEM headers are missing; AUTO builds only when both are
# found; OFF skips it. NVSHMEM comes from the nvidia-nvshmem-cu13 wheel (scripts/dev.sh passes -DNVSHMEM_DIR; under
# `pip install .` it is found through the build environment's `nvidia.nvshmem` package).
#
# Build recipe (why each step: docs/cuda.md):
#   - device code for sm_90a only, separable compilation, device-linked against libnvshmem_device.a inside a static
#     library (CUDA_RESOLVE_DEVICE_SYMBOLS), so the nanobind module itself is plain C++;
#   - libnvshmem_host.so.3 linked by file name and found at run time through the wheel's lib/ (rpath), or through
#     the copy the JAX CUDA plugin already loaded (same SONAME);
#   - CUDA runtime static; the static NVSHMEM symbols hidden from the export table (--exclude-libs,ALL), so another
#     extension's NVSHMEM device state cannot interpose ours.
if(JAX_LL_EP_CUDA STREQUAL "OFF")
  message(STATUS "jax_ll_ep: CPU-only build (JAX_LL_EP_CUDA=OFF)")
  return()
endif()

function(_jax_ll_ep_cuda_unavailable reason)
  if(JAX_LL_EP_CUDA STREQUAL "ON")
    message(FATAL_ERROR "jax_ll_ep: JAX_LL_EP_CUDA=ON but ${reason}")
  endif()
  message(STATUS "jax_ll_ep: CPU-only build (${reason})")
endfunction()

if(NOT NVSHMEM_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import nvidia.nvshmem as m; print(m.__path__[0])"
    OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE NVSHMEM_DIR ERROR_QUIET)
endif()
if(NOT NVSHMEM_DIR OR NOT EXISTS "${NVSHMEM_DIR}/include/nvshmem.h" OR NOT EXISTS "${NVSHMEM_DIR}/lib/libnvshmem_device.a"
   OR NOT EXISTS "${NVSHMEM_DIR}/lib/libnvshmem_host.so.3")
  _jax_ll_ep_cuda_unavailable("the NVSHMEM headers and libraries were not found (NVSHMEM_DIR='${NVSHMEM_DIR}'; install nvidia-nvshmem-cu13)")
  return()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  _jax_ll_ep_cuda_unavailable("no CUDA compiler (nvcc) was found")
  return()
endif()
enable_language(CUDA)
message(STATUS "jax_ll_ep: building the CUDA module (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, NVSHMEM ${NVSHMEM_DIR})")

file(GLOB JAX_LL_EP_CUDA_KERNEL_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/xla_ffi/cuda/*.cu")
# Host code: the registry and host resources (xla_ffi/cuda/*.cc), the FFI handlers and the nanobind module.
file(GLOB JAX_LL_EP_CUDA_GLUE_SOURCES CONFIGURE_DEPENDS
  "${CMAKE_CURRENT_SOURCE_DIR}/xla_ffi/cuda/*.cc"
  "${CMAKE_CURRENT_SOURCE_DIR}/xla_ffi/ffi/cuda_*.cc")

# Kernels, launchers and NVSHMEM device-state init, device-linked here.
add_library(jax_ll_ep_cuda_kernels STATIC ${JAX_LL_EP_CUDA_KERNEL_SOURCES})
set_target_properties(jax_ll_ep_cuda_kernels PROPERTIES
  CUDA_ARCHITECTURES "90a-real"
  CUDA_SEPARABLE_COMPILATION ON
  CUDA_RESOLVE_DEVICE_SYMBOLS ON
  CUDA_RUNTIME_LIBRARY Static
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden)
target_include_directories(jax_ll_ep_cuda_kernels PUBLIC
  "${JAX_LL_EP_INCLUDE_DIR}" "${CMAKE_CURRENT_SOURCE_DIR}/xla_ffi" "${NVSHMEM_DIR}/include")
# Bit-exact arithmetic: no contraction of multiply and add (the kernels also use explicit _rn intrinsics).
target_compile_options(jax_ll_ep_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false>)
# Line tables (no effect on the code): profilers (ncu source view, stall sampling) map samples to source lines.
target_compile_options(jax_ll_ep_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
target_link_directories(jax_ll_ep_cuda_kernels PUBLIC "${NVSHMEM_DIR}/lib")
# The device link step resolves nvshmem_* device functions and the module's nvshmemi_device_state_d from here.
target_link_libraries(jax_ll_ep_cuda_kernels PUBLIC nvshmem_device)

# The CUDA runtime, statically (the wheel's pip-installed toolkits ship no unversioned libcudart.so).
find_library(JAX_LL_EP_CUDART_STATIC cudart_static HINTS ${CMAKE_CUDA_IMPLICIT_LINK_DIRECTORIES} REQUIRED)

nanobind_add_module(_jax_ll_ep_cuda STABLE_ABI NB_STATIC ${JAX_LL_EP_CUDA_GLUE_SOURCES})
# The XLA and CUDA headers are system headers here: their warnings are not ours.
target_include_directories(_jax_ll_ep_cuda SYSTEM PRIVATE "${XLA_FFI_INCLUDE_DIR}" ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES})
target_compile_options(_jax_ll_ep_cuda PRIVATE -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)
target_link_libraries(_jax_ll_ep_cuda PRIVATE
  jax_ll_ep_cuda_kernels
  "${NVSHMEM_DIR}/lib/libnvshmem_device.a"
  "${NVSHMEM_DIR}/lib/libnvshmem_host.so.3"
  "${JAX_LL_EP_CUDART_STATIC}"
  Threads::Threads dl rt)
target_link_options(_jax_ll_ep_cuda PRIVATE "LINKER:--exclude-libs,ALL")
set_target_properties(_jax_ll_ep_cuda PROPERTIES
  BUILD_RPATH "${NVSHMEM_DIR}/lib"
  INSTALL_RPATH "$ORIGIN/../nvidia/nvshmem/lib")
install(TARGETS _jax_ll_ep_cuda LIBRARY DESTINATION ${JAX_LL_EP_INSTALL_DIR})
