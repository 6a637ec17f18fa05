// pybind11 registration for the data CPU kernels (decompose, BFD packing, batch gather).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common/isa.h"
namespace py = pybind11;

py::tuple data_decompose(py::array_t<int64_t, py::array::c_style> lengths, int64_t min_len, int64_t max_len,
                         bool remainder, bool simd);
py::tuple data_pack_bfd(py::array_t<int64_t, py::array::c_style> lengths, int64_t capacity, bool split_long);
int64_t data_gather(uintptr_t doc_addr, uintptr_t mask_addr, int tok_code, uintptr_t pdoc, uintptr_t pstart,
                    uintptr_t plen, uintptr_t offs, int64_t n_pieces, uintptr_t ids, uintptr_t labels,
                    uintptr_t pos, int64_t N, int64_t ignore_index, int64_t pad_id, int64_t vocab);

void register_data(py::module_& m) {
  m.def("data_decompose", &data_decompose, py::arg("lengths"), py::arg("min_len"), py::arg("max_len"),
        py::arg("remainder"), py::arg("simd") = true, "Dataset decomposition into power-of-two buckets (see decompose.cpp)");
  m.def("cpu_isa", []() { return std::string(lf::isa_name(lf::cpu_isa())); },
        "The instruction set the data kernels use now: the CPU's best (portable, avx2, avx512) or LENGEN_CPU_ISA");
  m.def("cpu_isa_detected", []() { return std::string(lf::isa_name(lf::cpu_isa_detected())); },
        "The best instruction set this CPU supports, ignoring LENGEN_CPU_ISA");
  m.def("data_pack_bfd", &data_pack_bfd, py::arg("lengths"), py::arg("capacity"), py::arg("split_long"),
        "Best-fit-decreasing packing with a segment tree, O(N log capacity)");
  m.def("data_gather", &data_gather, "Assemble a flat batch from document pieces (see gather.cpp)");
}
