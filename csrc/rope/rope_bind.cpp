// pybind11 registration for the rope CPU kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace lf {
void rope_apply_cpu(uintptr_t q, uintptr_t k, uintptr_t qo, uintptr_t ko, int dtype, int64_t B, int64_t S,
                    int64_t Hq, int64_t Hk, int64_t D, int64_t R, const std::vector<int64_t>& q_strides,
                    const std::vector<int64_t>& qo_strides, const std::vector<int64_t>& k_strides,
                    const std::vector<int64_t>& ko_strides, uintptr_t inv_freq, int pos_mode, uintptr_t pos,
                    int64_t pos_stride_b, int64_t pos_stride_s, uintptr_t cu_seqlens, int64_t n_seq, int64_t offset,
                    double attention_factor, bool interleaved);
}

void register_rope(py::module_& m) {
  m.def("rope_apply_cpu", &lf::rope_apply_cpu, py::call_guard<py::gil_scoped_release>(),
        "Rotate q (B,S,Hq,D) and k (B,S,Hk,D) into q_out/k_out (may alias) by fp32 angles pos * inv_freq.",
        py::arg("q"), py::arg("k"), py::arg("q_out"), py::arg("k_out"), py::arg("dtype"), py::arg("B"), py::arg("S"),
        py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("R"), py::arg("q_strides"), py::arg("q_out_strides"),
        py::arg("k_strides"), py::arg("k_out_strides"), py::arg("inv_freq"), py::arg("pos_mode"), py::arg("pos"),
        py::arg("pos_stride_b"), py::arg("pos_stride_s"), py::arg("cu_seqlens"), py::arg("n_seq"),
        py::arg("offset"), py::arg("attention_factor"), py::arg("interleaved"));
}
