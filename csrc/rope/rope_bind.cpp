// pybind11 registration for the rope CPU launcher (lengen_fast._C); its arguments are rope_args.h's.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "rope/rope_args.h"

namespace py = pybind11;

void register_rope(py::module_& m) {
  lf::rope::with_arg_names([&](auto... names) {
    m.def("rope_apply_cpu", &lf::rope::Entry::cpu, py::call_guard<py::gil_scoped_release>(),
          "Rotate q (B,S,Hq,D) and k (B,S,Hk,D) into q_out/k_out (may alias) by fp32 angles pos * inv_freq.",
          py::arg(names)...);
  });
}
