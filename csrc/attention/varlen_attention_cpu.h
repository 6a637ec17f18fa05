// Varlen document-masked attention on the CPU: forward and backward (torch-free).
//
// Shapes (element strides given explicitly for the inputs; outputs are contiguous):
//   q, out, dout, dq : (Tq, H, D)        k, v, dk, dv : (Tk, Hkv, D), H % Hkv == 0
//   lse              : (H, Tq) fp32      cu_q, cu_k   : (B + 1,) int32, cu[0] = 0, non-decreasing
// Semantics are those of lengen_fast.reference.varlen_attention_ref (flash_attn_varlen_func).
#pragma once
#include <cstdint>

namespace lf {
namespace attn {

struct Strides3 {
  int64_t s0, s1, s2;
};

struct Problem {
  int64_t B, Tq, Tk, H, Hkv, D;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int dtype;             // lf::DType of q, k, v, out, dout, dq, dk, dv
  float scale;           // softmax scale
  int64_t left, right;   // window; -1 = unbounded; right is 0 when causal
  float softcap;         // 0 = off
};

// out (Tq, H, D) in dtype, lse (H, Tq) fp32. Tokens past cu_q[B] and rows with no visible key: out 0, lse +inf.
void forward(const Problem& p, const void* q, Strides3 sq, const void* k, Strides3 sk, const void* v,
             Strides3 sv, void* out, float* lse);

// dq (Tq, H, D), dk / dv (Tk, Hkv, D) in dtype. Deterministic for any thread count: every output element is
// summed in an order fixed by the document lengths (dk/dv by one unit, over the query heads of a GQA group, then
// over q tiles; dq of a long document per key chunk, the chunks' partial sums added in chunk order).
void backward(const Problem& p, const void* dout, Strides3 sdo, const void* q, Strides3 sq, const void* k,
              Strides3 sk, const void* v, Strides3 sv, const void* out, Strides3 so, const float* lse,
              void* dq, void* dk, void* dv);

}  // namespace attn
}  // namespace lf
