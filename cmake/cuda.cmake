# The optional CUDA module. Owned by the cuda backend (issue 4); until its sources exist this only reports.
file(GLOB JAX_LL_EP_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/xla_ffi/cuda/*.cu")
if(JAX_LL_EP_CUDA STREQUAL "OFF" OR NOT JAX_LL_EP_CUDA_SOURCES)
  message(STATUS "jax_ll_ep: CPU-only build (JAX_LL_EP_CUDA=${JAX_LL_EP_CUDA})")
  return()
endif()
