// pybind11 registration for the attention CUDA launchers (compiled into lengen_fast._cuda).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_attention_cuda(py::module_& m) {
  (void)m;
}
