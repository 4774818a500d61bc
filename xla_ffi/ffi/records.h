// Error records as Python objects: both extension modules hand their ranks' records to buf.check()
// (jax_ll_ep/backends/native.py) in this form, worded by the one table of errors.h.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "jax_ll_ep/errors.h"

namespace jax_ll_ep {

namespace nb = nanobind;

// {"group", "rank", "code" (ErrorName::name), "op", "seq", "count", "missing" [(rank, local expert)], "message"}
inline nb::dict record_to_python(const ErrorRecord& r) {
  nb::dict d;
  d["group"] = r.group;
  d["rank"] = r.rank;
  d["code"] = error_name(static_cast<uint32_t>(r.code)).name;
  d["op"] = op_name(r.kind);
  d["seq"] = r.seq;
  d["count"] = r.count;
  nb::list missing;
  for (const auto& [rank, local_expert] : r.missing) missing.append(nb::make_tuple(rank, local_expert));
  d["missing"] = missing;
  d["message"] = describe(r);
  return d;
}

}  // namespace jax_ll_ep
