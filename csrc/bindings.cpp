// lengen_fast._C: the CPU kernels. Each op registers its own functions (csrc/<op>/<op>_bind.cpp).
#include <pybind11/pybind11.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
void register_data(py::module_& m);
void register_rope(py::module_& m);
void register_attention(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "lengen_fast CPU kernels (torch-free C++17 + OpenMP)";
  m.def("num_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  register_data(m);
  register_rope(m);
  register_attention(m);
}
