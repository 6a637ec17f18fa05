// pybind11 registration for the attention CPU kernels. Pointers arrive as integers (tensor.data_ptr()), strides in
// elements; Python (lengen_fast/attention/api.py) validates shapes, dtypes and devices before calling.
#include <pybind11/pybind11.h>

#include "attention/varlen_attention_cpu.h"
#include "common/checks.h"

namespace py = pybind11;
using lf::attn::Problem;
using lf::attn::Strides3;

namespace {

Problem make_problem(uintptr_t cu_q, uintptr_t cu_k, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv,
                     int64_t D, int dtype, bool causal, double scale, int64_t left, int64_t right, double softcap) {
  LF_CHECK(B >= 0 && Tq >= 0 && Tk >= 0, "negative sizes");
  LF_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "H (" << H << ") must be a positive multiple of H_kv (" << Hkv << ")");
  LF_CHECK(D > 0 && D <= 512, "head dim " << D << " out of range");
  LF_CHECK(dtype == lf::kFloat32 || dtype == lf::kFloat16 || dtype == lf::kBFloat16, "unsupported dtype code " << dtype);
  return Problem{B, Tq, Tk, H, Hkv, D, lf::as_ptr<const int32_t>(cu_q), lf::as_ptr<const int32_t>(cu_k), dtype,
                 static_cast<float>(scale), left, causal ? 0 : right, static_cast<float>(softcap)};
}

Strides3 st(const py::tuple& t) {
  LF_CHECK(t.size() == 3, "expected 3 strides");
  return Strides3{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()};
}

}  // namespace

void register_attention(py::module_& m) {
  m.def(
      "attention_fwd_cpu",
      [](uintptr_t q, py::tuple sq, uintptr_t k, py::tuple sk, uintptr_t v, py::tuple sv, uintptr_t out,
         uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv,
         int64_t D, int dtype, bool causal, double scale, int64_t left, int64_t right, double softcap) {
        const Problem p = make_problem(cu_q, cu_k, B, Tq, Tk, H, Hkv, D, dtype, causal, scale, left, right, softcap);
        const Strides3 a = st(sq), b = st(sk), c = st(sv);
        py::gil_scoped_release nogil;
        lf::attn::forward(p, lf::as_ptr<const void>(q), a, lf::as_ptr<const void>(k), b, lf::as_ptr<const void>(v), c,
                          lf::as_ptr<void>(out), lf::as_ptr<float>(lse));
      },
      "Varlen attention forward: out (Tq, H, D) contiguous, lse (H, Tq) fp32 contiguous.");
  m.def(
      "attention_bwd_cpu",
      [](uintptr_t dout, py::tuple sdo, uintptr_t q, py::tuple sq, uintptr_t k, py::tuple sk, uintptr_t v,
         py::tuple sv, uintptr_t out, py::tuple so, uintptr_t lse, uintptr_t dq, uintptr_t dk,
         uintptr_t dv, uintptr_t cu_q, uintptr_t cu_k, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv,
         int64_t D, int dtype, bool causal, double scale, int64_t left, int64_t right, double softcap) {
        const Problem p = make_problem(cu_q, cu_k, B, Tq, Tk, H, Hkv, D, dtype, causal, scale, left, right, softcap);
        const Strides3 a = st(sdo), b = st(sq), c = st(sk), d = st(sv), e = st(so);
        py::gil_scoped_release nogil;
        lf::attn::backward(p, lf::as_ptr<const void>(dout), a, lf::as_ptr<const void>(q), b, lf::as_ptr<const void>(k),
                           c, lf::as_ptr<const void>(v), d, lf::as_ptr<const void>(out), e,
                           lf::as_ptr<const float>(lse), lf::as_ptr<void>(dq),
                           lf::as_ptr<void>(dk), lf::as_ptr<void>(dv));
      },
      "Varlen attention backward: dq (Tq, H, D), dk / dv (Tk, Hkv, D) contiguous. "
      "Deterministic.");
}
