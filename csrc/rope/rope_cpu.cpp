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
#include "common/isa.h"
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

using rope::Args;

// The kernels twice: for the portable baseline and, on x86 with GCC, for AVX2+FMA+F16C (chosen per call by
// lf::cpu_isa(), so LENGEN_CPU_ISA=portable forces the first). #pragma GCC target applies to every function
// defined in its region, OpenMP's outlined bodies included. Without it (-march=x86-64) this kernel ran 2.5-3x
// slower than the -march=native build (notes/packaging.md). FMA contraction makes the two paths differ by
// rounding (one bf16 ulp), not bitwise.
namespace portable {
#include "rope/rope_cpu_kernels.inc"
}  // namespace portable
#if LF_X86 && defined(__GNUC__) && !defined(__clang__)
#define LF_ROPE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")  // = LF_TARGET_AVX2 (common/isa.h)
namespace avx2 {
#include "rope/rope_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

template <class Ty>
void dispatch_isa(const Args& a) {
#ifdef LF_ROPE_AVX2
  if (cpu_isa() != Isa::kPortable) return avx2::dispatch_layout<Ty>(a);
#endif
  portable::dispatch_layout<Ty>(a);
}

}  // namespace

void rope::rope_apply_cpu(const Args& a) {
  if (a.B * a.S == 0) return;
  switch (a.dtype) {
    case kFloat32: dispatch_isa<F32>(a); break;
    case kFloat16: dispatch_isa<F16>(a); break;
    case kBFloat16: dispatch_isa<BF16>(a); break;
    default:
      LF_CHECK(false, "rope: the cpu backend supports float32, float16 and bfloat16, got dtype code " << a.dtype);
  }
}

}  // namespace lf
