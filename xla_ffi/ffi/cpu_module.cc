// Placeholder: the CPU module's registration table (replaced by the cpu backend).
#include <nanobind/nanobind.h>
namespace nb = nanobind;
NB_MODULE(_jax_ll_ep_cpu, m) {
  m.def("ffi_handlers", []() { return nb::dict(); });
}
