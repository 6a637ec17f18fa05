// How do the CPU and CUDA rope kernels find a token's position and its angles? The document search over
// cu_seqlens, and fp32 sincos of position * inv_freq without a cache, accurate for angles up to 6.5e6 rad.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "rope/rope_args.h"

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lf {
namespace rope {

#if defined(__CUDA_ARCH__)
LF_HD float fma_(float a, float b, float c) { return __fmaf_rn(a, b, c); }
LF_HD float mul_(float a, float b) { return __fmul_rn(a, b); }  // never contracted, even with fast math
LF_HD float round_(float x) { return rintf(x); }
#else
LF_HD float fma_(float a, float b, float c) { return std::fma(a, b, c); }
LF_HD float mul_(float a, float b) { return a * b; }
// nearest integer for |x| < 2^22 by the 1.5 * 2^23 trick: GCC vectorizes this, but not floorf
// without -fno-trapping-math
LF_HD float round_(float x) { return (x + 12582912.0f) - 12582912.0f; }
#endif

// A quiet NaN on host and device.
LF_HD float qnan_() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

// The accurate range (reference.ROPE_MAX_POSITION / ROPE_MAX_ANGLE): outside it sincos_pf returns NaN, never a
// wrong rotation.
constexpr float kMaxPosition = 16777216.0f;  // 2^24: |p| < 2^24 are exact in fp32 (2^24 + 1 rounds to 2^24)
constexpr float kMaxAngle = 6.5e6f;

// cos and sin of the angle p * f where p (an integer position, exact in fp32) and f are fp32,
// for |p * f| <= 6.5e6 (positions up to ~6M at inv_freq <= 1) and |p| < 2^24; NaN outside that range.
// The product is formed in fp32 like the Hugging Face reference, and its rounding error is carried
// (fma residual) into the reduced argument, so the result is the sincos of the exact product.
// Range reduction: Cody-Waite with pi/2 in three fp32 parts; minimax polynomials on [-pi/4, pi/4].
LF_HD void sincos_pf(float p, float f, float* s_out, float* c_out) {
  const float x0 = mul_(p, f);
  const bool ok = p < kMaxPosition && p > -kMaxPosition && x0 <= kMaxAngle && x0 >= -kMaxAngle;
  const float x = ok ? x0 : 0.0f;  // keeps the float -> int conversion below in range
  const float err = ok ? fma_(p, f, -x) : 0.0f;
  const float k = round_(x * 0.636619772367581343f);
  float r = fma_(-k, 1.5707963705062866f, x);
  r = fma_(-k, -4.371138828673793e-08f, r);
  r = fma_(-k, -1.7151245100058819e-15f, r);
  r = r + err;
  const float z = r * r;
  const float sp = r + r * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float cp = 1.0f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                                              4.166664568298827e-2f);
  const int q = static_cast<int>(k) & 3;
  const float s1 = (q & 1) ? cp : sp;
  const float c1 = (q & 1) ? sp : cp;
  *s_out = ok ? ((q & 2) ? -s1 : s1) : qnan_();
  *c_out = ok ? (((q + 1) & 2) ? -c1 : c1) : qnan_();
}

// Index of the document holding token t: the largest d in [0, n_seq) with cu[d] <= t (empty documents
// are skipped; tokens past cu[n_seq] stay in the last document, as reference.positions_from_cu_seqlens).
LF_HD int64_t find_doc(const int32_t* cu, int64_t n_seq, int64_t t) {
  int64_t lo = 0, hi = n_seq - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Position of token (b, s) of a call, by its position mode.
LF_HD int64_t position(const Args& a, int64_t b, int64_t s) {
  int64_t p;
  if (a.pos_mode == PosMode::kCuSeqlens) p = s - a.cu[find_doc(a.cu, a.n_seq, s)];
  else if (a.pos_mode == PosMode::kPositionIds) p = a.pos[b * a.psb + s * a.pss];
  else p = s;
  return p + a.offset;
}

}  // namespace rope
}  // namespace lf
