// pybind11 registration for the data CPU kernels.
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_data(py::module_& m) {
  (void)m;
}
