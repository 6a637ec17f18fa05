// pybind11 registration for the rope CPU kernels.
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_rope(py::module_& m) {
  (void)m;
}
