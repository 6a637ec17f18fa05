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
#include "common/isa.h"
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
    case kFloat32: dispatch_isa<F32>(a); break;
    case kFloat16: dispatch_isa<F16>(a); break;
    case kBFloat16: dispatch_isa<BF16>(a); break;
    default: LF_CHECK(false, "rope: the cpu backend supports float32, float16 and bfloat16, got dtype code " << dtype);
  }
}

}  // namespace lf
