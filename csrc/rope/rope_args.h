// What does a RoPE launcher take? The contract between the bindings and the CPU (rope_cpu.cpp) and CUDA
// (rope.cu) kernels, written once: the position mode, the one argument struct, the flat argument list Python
// passes (lengen_fast/rope/op.py: ext_args), its checks, and the launcher prototypes.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace lf {
namespace rope {

// Where positions come from; mirrored by lengen_fast.rope.op.PosMode (same values), which Triton gets as
// constexprs.
enum class PosMode : int {
  kArange = 0,       // s, the index along S (no positions given)
  kPositionIds = 1,  // pos[b * psb + s * pss]
  kCuSeqlens = 2,    // s - cu[doc of s]: positions restart in every document (B == 1)
};

// element strides of a (B, S, H, D) view
struct Strides4 {
  int64_t b, s, h, d;
};

inline Strides4 strides4(const std::vector<int64_t>& v, const char* name) {
  LF_CHECK(v.size() == 4, "rope: " << name << " strides must have 4 entries (B, S, H, D), got " << v.size());
  return {v[0], v[1], v[2], v[3]};
}

// One RoPE call. Shapes (element strides explicit, any layout):
//   q (B, S, Hq, D), k (B, S, Hk, D) and their outputs qo, ko (may alias the inputs: in place);
//   inv_freq (R/2,) fp32 (negated for the backward / inverse rotation); positions per pos_mode, from
//   pos (B or 1, S) int32 at strides (psb, pss) or cu (n_seq + 1,) int32.
struct Args {
  const void* q;
  const void* k;
  void* qo;
  void* ko;
  int dtype;                      // common/checks.h DType
  int64_t B, S, Hq, Hk, D, R;     // R: rotary_dim, even and <= D; dims past it pass through
  Strides4 qs, qos, ks, kos;
  const float* inv_freq;
  PosMode pos_mode;
  const int32_t* pos;
  int64_t psb, pss;
  const int32_t* cu;
  int64_t n_seq, offset;          // offset is added to every position
  float af;                       // attention factor: cos and sin are scaled by it
  bool interleaved;               // GPT-J pairs (2i, 2i+1) instead of NeoX (i, i + R/2)
  bool copy_q_tail, copy_k_tail;  // out of place with R < D: copy dims [R, D)
};

// The flat arguments Python passes, in this order (names in kArgNames), checked and packed into Args.
inline Args make_args(uintptr_t q, uintptr_t k, uintptr_t qo, uintptr_t ko, int dtype, int64_t B, int64_t S,
                      int64_t Hq, int64_t Hk, int64_t D, int64_t R, const std::vector<int64_t>& q_strides,
                      const std::vector<int64_t>& qo_strides, const std::vector<int64_t>& k_strides,
                      const std::vector<int64_t>& ko_strides, uintptr_t inv_freq, int pos_mode, uintptr_t pos,
                      int64_t pos_stride_b, int64_t pos_stride_s, uintptr_t cu_seqlens, int64_t n_seq,
                      int64_t offset, double attention_factor, bool interleaved) {
  LF_CHECK(R > 0 && R % 2 == 0 && R <= D, "rope: rotary_dim=" << R << " must be even and <= head_dim=" << D);
  LF_CHECK(pos_mode >= 0 && pos_mode <= 2, "rope: pos_mode=" << pos_mode << " must be 0, 1 or 2");
  const PosMode mode = static_cast<PosMode>(pos_mode);
  LF_CHECK(mode != PosMode::kCuSeqlens || (B == 1 && n_seq >= 1 && cu_seqlens != 0),
           "rope: cu_seqlens needs B == 1, n_seq >= 1");
  LF_CHECK(mode != PosMode::kPositionIds || pos != 0, "rope: position_ids pointer is null");
  return Args{as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<void>(qo), as_ptr<void>(ko), dtype,
              B, S, Hq, Hk, D, R,
              strides4(q_strides, "q"), strides4(qo_strides, "q_out"), strides4(k_strides, "k"),
              strides4(ko_strides, "k_out"), as_ptr<const float>(inv_freq), mode, as_ptr<const int32_t>(pos),
              pos_stride_b, pos_stride_s, as_ptr<const int32_t>(cu_seqlens), n_seq, offset,
              static_cast<float>(attention_factor), interleaved, q != qo && R < D, k != ko && R < D};
}

inline constexpr const char* kArgNames[] = {
    "q", "k", "q_out", "k_out", "dtype", "B", "S", "Hq", "Hk", "D", "R", "q_strides", "q_out_strides",
    "k_strides", "k_out_strides", "inv_freq", "pos_mode", "pos", "pos_stride_b", "pos_stride_s", "cu_seqlens",
    "n_seq", "offset", "attention_factor", "interleaved"};

// The launchers: rope_cpu.cpp (lengen_fast._C) and rope.cu (lengen_fast._cuda, on a cudaStream_t handle).
void rope_apply_cpu(const Args& a);
void rope_apply_cuda(const Args& a, uintptr_t stream);

// What the bindings expose: make_args' flat parameters (+ the stream for CUDA) -> check, pack, launch.
template <class Sig>
struct Flat;
template <class... A>
struct Flat<Args (*)(A...)> {
  static void cpu(A... a) { rope_apply_cpu(make_args(a...)); }
  static void cuda(A... a, uintptr_t stream) { rope_apply_cuda(make_args(a...), stream); }
};
using Entry = Flat<decltype(&make_args)>;

// def(kArgNames[0], ..., kArgNames[n - 1]): lets a binding name the arguments without pybind11 in this header.
template <class Def, size_t... I>
void with_arg_names(Def&& def, std::index_sequence<I...>) {
  def(kArgNames[I]...);
}
template <class Def>
void with_arg_names(Def&& def) {
  with_arg_names(std::forward<Def>(def), std::make_index_sequence<sizeof(kArgNames) / sizeof(kArgNames[0])>());
}

}  // namespace rope
}  // namespace lf
