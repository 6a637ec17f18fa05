// Fused RoPE on the CPU: q and k rotated in one pass, angles in fp32 from positions (no cos/sin cache).
//
// Shapes (element strides passed explicitly, any layout):
//   q (B, S, Hq, D), k (B, S, Hk, D) and their outputs (may alias the inputs: in place);
//   inv_freq (R/2,) fp32 (negated for the backward / inverse rotation);
//   positions by rope::PosMode (rope_args.h): arange over S, pos[b * psb + s * pss] int32, or cu_seqlens
//   (n_seq + 1,) int32 (B == 1).
// Work is split by token over OpenMP threads; per token the R/2 sin/cos are computed once into a
// small buffer, then every head of q and k is rotated by a vectorizable loop over the pairs.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/half.h"
#include "rope/rope_args.h"
#include "rope/rope_math.h"

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

using rope::Args;

template <class Ty, bool INTERLEAVED, bool UNIT>
void run(const Args& a) {
  using T = typename Ty::T;
  const int64_t half = a.R / 2, n_tok = a.B * a.S;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  T* qo = static_cast<T*>(a.qo);
  T* ko = static_cast<T*>(a.ko);
#pragma omp parallel
  {
    std::vector<float> cs(2 * half);
    float* c = cs.data();
    float* s = cs.data() + half;
#pragma omp for schedule(dynamic, 32)  // dynamic: robust to a descheduled thread on shared CPUs
    for (int64_t t = 0; t < n_tok; ++t) {
      const int64_t b = t / a.S, si = t % a.S;
      const float p = static_cast<float>(rope::position(a, b, si));
      sincos_row(p, a.inv_freq, a.af, half, c, s);
      for (int64_t h = 0; h < a.Hq; ++h)
        rotate_head<Ty, INTERLEAVED, UNIT>(q + b * a.qs.b + si * a.qs.s + h * a.qs.h,
                                           qo + b * a.qos.b + si * a.qos.s + h * a.qos.h, a.qs.d, a.qos.d, half,
                                           a.D, c, s, a.copy_q_tail);
      for (int64_t h = 0; h < a.Hk; ++h)
        rotate_head<Ty, INTERLEAVED, UNIT>(k + b * a.ks.b + si * a.ks.s + h * a.ks.h,
                                           ko + b * a.kos.b + si * a.kos.s + h * a.kos.h, a.ks.d, a.kos.d, half,
                                           a.D, c, s, a.copy_k_tail);
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

void rope::rope_apply_cpu(const Args& a) {
  if (a.B * a.S == 0) return;
  switch (a.dtype) {
    case kFloat32: dispatch_layout<F32>(a); break;
    case kFloat16: dispatch_layout<F16>(a); break;
    case kBFloat16: dispatch_layout<BF16>(a); break;
    default:
      LF_CHECK(false, "rope: the cpu backend supports float32, float16 and bfloat16, got dtype code " << a.dtype);
  }
}

}  // namespace lf
