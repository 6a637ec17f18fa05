// pybind11 registration for the attention CPU kernels.
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_attention(py::module_& m) {
  (void)m;
}
