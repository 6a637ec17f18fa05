// Varlen document-masked attention on the CPU (FA2-style, fp32 accumulation, OpenMP).
//
// Work units: the forward is (document, head, q tile of BQ rows); the backward is one pass over (document, kv head,
// chunk of key tiles), which recomputes P and dP - delta once per (q tile, key tile) pair and accumulates dq, dk
// and dv from them (FA2's loop order). Each unit owns its dk/dv rows; dq of a document with several chunks goes
// through per-chunk partial slices summed in chunk order. No atomics, and the split depends only on the document
// lengths, so results do not depend on the thread count or schedule (the backward is always deterministic). Units
// are sorted by cost (visible keys x rows) and handed out dynamically, so one long document does not leave threads
// idle while many short ones finish.
//
// fp32 inputs contiguous along D (with D a multiple of 16) are read in place by the micro-kernels; other tiles are
// converted to fp32 in per-thread scratch (row-major (rows, Dp) or transposed (Dp, width), Dp = D rounded up to
// 16). The micro-kernels use GCC/Clang vector extensions of VW floats (one register of the ISA) with 4 rows x NB
// vectors of accumulators held in registers, and skip, per block of 4 rows, the columns or contraction indices
// that the mask removes for all 4 rows (half of a diagonal tile).
//
// The kernels live in varlen_attention_cpu_kernels.inc, compiled here once per ISA: the portable baseline (SSE2
// on x86-64: 4-float vectors), AVX2+FMA (8) and AVX-512 (16), chosen per call by lf::cpu_isa() (LENGEN_CPU_ISA
// forces one), so one wheel runs everywhere and still uses the wide units. #pragma GCC target applies to every
// function of its region, OpenMP's outlined bodies included. FMA contraction makes the paths differ by rounding.
// Outputs of 8 MiB or more are written with non-temporal stores (vstream: no read-for-ownership of lines that would
// not stay in cache anyway).
#include "attention/varlen_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/half.h"
#include "common/isa.h"

#ifdef _OPENMP
#include <omp.h>  // omp_get_num_threads (prefetch_distance)
#endif
#if LF_X86
#include <immintrin.h>  // _mm*_stream_ps, _mm_sfence (vstream)
#endif

namespace lf {
namespace attn {

// LF_ATTN_STREAM: the width of the non-temporal store of each variant (vstream), 0 where there is none.
#define LF_ATTN_STREAM (LF_X86 ? 128 : 0)
namespace portable {
constexpr int VW = 4, NB = 2;  // SSE2: 4 rows x 2 vectors of accumulators = 8 of 16 xmm
#include "attention/varlen_attention_cpu_kernels.inc"
}  // namespace portable

#if LF_X86 && defined(__GNUC__) && !defined(__clang__)
#define LF_ATTN_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")  // = LF_TARGET_AVX2 (common/isa.h)
#undef LF_ATTN_STREAM
#define LF_ATTN_STREAM 256
namespace avx2 {
constexpr int VW = 8, NB = 2;  // 8 of 16 ymm
#include "attention/varlen_attention_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,bmi,bmi2,popcnt")  // = LF_TARGET_AVX512
#undef LF_ATTN_STREAM
#define LF_ATTN_STREAM 512
namespace avx512 {
constexpr int VW = 16, NB = 4;  // 16 of 32 zmm
#include "attention/varlen_attention_cpu_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

void forward(const Problem& p, const void* q, Strides3 sq, const void* k, Strides3 sk, const void* v, Strides3 sv,
             void* out, float* lse) {
#ifdef LF_ATTN_SIMD
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512::forward(p, q, sq, k, sk, v, sv, out, lse);
    case Isa::kAvx2: return avx2::forward(p, q, sq, k, sk, v, sv, out, lse);
    default: break;
  }
#endif
  portable::forward(p, q, sq, k, sk, v, sv, out, lse);
}

void backward(const Problem& p, const void* dout, Strides3 sdo, const void* q, Strides3 sq, const void* k,
              Strides3 sk, const void* v, Strides3 sv, const void* out, Strides3 so, const float* lse, void* dq,
              void* dk, void* dv) {
#ifdef LF_ATTN_SIMD
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512::backward(p, dout, sdo, q, sq, k, sk, v, sv, out, so, lse, dq, dk, dv);
    case Isa::kAvx2: return avx2::backward(p, dout, sdo, q, sq, k, sk, v, sv, out, so, lse, dq, dk, dv);
    default: break;
  }
#endif
  portable::backward(p, dout, sdo, q, sq, k, sk, v, sv, out, so, lse, dq, dk, dv);
}

}  // namespace attn
}  // namespace lf
