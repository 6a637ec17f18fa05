// lengen_fast._cuda: the CUDA kernels. Each op registers its launchers (csrc/<op>/<op>_cuda_bind.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;
void register_rope_cuda(py::module_& m);
void register_attention_cuda(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lengen_fast CUDA kernels (torch-free; pointers, strides and a stream handle)";
  register_rope_cuda(m);
  register_attention_cuda(m);
}
