// Fused RoPE on the CPU: q and k rotated in one pass, angles in fp32 from positions (no cos/sin cache).
//
// Shapes (element strides passed explicitly, any layout):
//   q (B, S, Hq, D), k (B, S, Hk, D) and their outputs (may alias the inputs: in place);
//   inv_freq (R/2,) fp32 (negated for the backward / inverse rotation);
//   positions: mode 0 arange over S, 1 pos[b * psb + s * pss] int32, 2 cu_seqlens (n_seq + 1,) int32 (B == 1).
// Work is split by token over OpenMP threads; per token the R/2 sin/cos are computed once into a
// small buffer, then every head of q and k is rotated by a vectorizable loop over the pairs.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/half.h"
#include "rope/rope_math.h"
#include "rope/rope_strides.h"

namespace lf {
namespace {

struct F32 {
  using T = float;
  static inline float ld(T v) { return v; }
  static inline T st(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static inline float ld(T v) { return f16_to_f32(v); }
  static inline T st(float v) { return f32_to_f16(v); }
};
struct BF16 {
  using T = uint16_t;
  static inline float ld(T v) { return bf16_to_f32(v); }
  static inline T st(float v) { return f32_to_bf16(v); }
};

struct Args {
  uintptr_t q, k, qo, ko;
  int64_t B, S, Hq, Hk, D, R;
  Strides4 qs, qos, ks, kos;
  const float* inv_freq;
  int pos_mode;
  const int32_t* pos;
  int64_t psb, pss;
  const int32_t* cu;
  int64_t n_seq, offset;
  float af;
  bool interleaved;
};

// Rotate one head: x (D elements at stride sd) -> y (stride sdo); c, s: (R/2,) cos and sin.
// UNIT: both strides are 1 (the common case; lets the compiler vectorize the loads).
template <class Ty, bool INTERLEAVED, bool UNIT>
inline void rotate_head(const typename Ty::T* x, typename Ty::T* y, int64_t sd, int64_t sdo, int64_t half,
                        int64_t D, const float* c, const float* s, bool copy_tail) {
  const int64_t si = UNIT ? 1 : sd, so = UNIT ? 1 : sdo;
  if (INTERLEAVED) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = Ty::ld(x[(2 * i) * si]), b = Ty::ld(x[(2 * i + 1) * si]);
      y[(2 * i) * so] = Ty::st(a * c[i] - b * s[i]);
      y[(2 * i + 1) * so] = Ty::st(b * c[i] + a * s[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = Ty::ld(x[i * si]), b = Ty::ld(x[(i + half) * si]);
      y[i * so] = Ty::st(a * c[i] - b * s[i]);
      y[(i + half) * so] = Ty::st(b * c[i] + a * s[i]);
    }
  }
  if (copy_tail)
    for (int64_t d = 2 * half; d < D; ++d) y[d * so] = x[d * si];
}

// c[i], s[i] = af * (cos, sin)(p * inv_freq[i]) for the R/2 pairs of one token (vectorized).
inline void sincos_row(float p, const float* __restrict inv_freq, float af, int64_t half, float* __restrict c,
                       float* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    float sn, cn;
    rope::sincos_pf(p, inv_freq[i], &sn, &cn);
    c[i] = cn * af;
    s[i] = sn * af;
  }
}

template <class Ty, bool INTERLEAVED, bool UNIT>
void run(const Args& a) {
  using T = typename Ty::T;
  const int64_t half = a.R / 2, n_tok = a.B * a.S;
  const T* q = as_ptr<const T>(a.q);
  const T* k = as_ptr<const T>(a.k);
  T* qo = as_ptr<T>(a.qo);
  T* ko = as_ptr<T>(a.ko);
  const bool copy_q = a.q != a.qo && a.R < a.D, copy_k = a.k != a.ko && a.R < a.D;
#pragma omp parallel
  {
    std::vector<float> cs(2 * half);
    float* c = cs.data();
    float* s = cs.data() + half;
#pragma omp for schedule(dynamic, 32)  // dynamic: robust to a descheduled thread on shared CPUs
    for (int64_t t = 0; t < n_tok; ++t) {
      const int64_t b = t / a.S, si = t % a.S;
      const float p = static_cast<float>(
          rope::position(a.pos_mode, b, si, a.pos, a.psb, a.pss, a.cu, a.n_seq, a.offset));
      sincos_row(p, a.inv_freq, a.af, half, c, s);
      for (int64_t h = 0; h < a.Hq; ++h)
        rotate_head<Ty, INTERLEAVED, UNIT>(q + b * a.qs.b + si * a.qs.s + h * a.qs.h,
                                           qo + b * a.qos.b + si * a.qos.s + h * a.qos.h, a.qs.d, a.qos.d, half,
                                           a.D, c, s, copy_q);
      for (int64_t h = 0; h < a.Hk; ++h)
        rotate_head<Ty, INTERLEAVED, UNIT>(k + b * a.ks.b + si * a.ks.s + h * a.ks.h,
                                           ko + b * a.kos.b + si * a.kos.s + h * a.kos.h, a.ks.d, a.kos.d, half,
                                           a.D, c, s, copy_k);
    }
  }
}

template <class Ty>
void dispatch_layout(const Args& a) {
  const bool unit = a.qs.d == 1 && a.qos.d == 1 && a.ks.d == 1 && a.kos.d == 1;
  if (a.interleaved) {
    if (unit) run<Ty, true, true>(a); else run<Ty, true, false>(a);
  } else {
    if (unit) run<Ty, false, true>(a); else run<Ty, false, false>(a);
  }
}

}  // namespace

void rope_apply_cpu(uintptr_t q, uintptr_t k, uintptr_t qo, uintptr_t ko, int dtype, int64_t B, int64_t S,
                    int64_t Hq, int64_t Hk, int64_t D, int64_t R, const std::vector<int64_t>& q_strides,
                    const std::vector<int64_t>& qo_strides, const std::vector<int64_t>& k_strides,
                    const std::vector<int64_t>& ko_strides, uintptr_t inv_freq, int pos_mode, uintptr_t pos,
                    int64_t pos_stride_b, int64_t pos_stride_s, uintptr_t cu_seqlens, int64_t n_seq, int64_t offset,
                    double attention_factor, bool interleaved) {
  LF_CHECK(R > 0 && R % 2 == 0 && R <= D, "rope: rotary_dim=" << R << " must be even and <= head_dim=" << D);
  LF_CHECK(pos_mode >= 0 && pos_mode <= 2, "rope: pos_mode=" << pos_mode << " must be 0, 1 or 2");
  LF_CHECK(pos_mode != 2 || (B == 1 && n_seq >= 1 && cu_seqlens != 0), "rope: cu_seqlens needs B == 1, n_seq >= 1");
  LF_CHECK(pos_mode != 1 || pos != 0, "rope: position_ids pointer is null");
  Args a{q, k, qo, ko, B, S, Hq, Hk, D, R,
         strides4(q_strides, "q"), strides4(qo_strides, "q_out"), strides4(k_strides, "k"),
         strides4(ko_strides, "k_out"), as_ptr<const float>(inv_freq), pos_mode, as_ptr<const int32_t>(pos),
         pos_stride_b, pos_stride_s, as_ptr<const int32_t>(cu_seqlens), n_seq, offset,
         static_cast<float>(attention_factor), interleaved};
  if (B * S == 0) return;
  switch (dtype) {
    case kFloat32: dispatch_layout<F32>(a); break;
    case kFloat16: dispatch_layout<F16>(a); break;
    case kBFloat16: dispatch_layout<BF16>(a); break;
    default: LF_CHECK(false, "rope: the cpu backend supports float32, float16 and bfloat16, got dtype code " << dtype);
  }
}

}  // namespace lf
