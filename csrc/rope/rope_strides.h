// Host-side argument helper shared by the CPU (rope_cpu.cpp) and CUDA (rope.cu) RoPE launchers.
#pragma once

#include <cstdint>
#include <vector>

#include "common/checks.h"

namespace lf {

// element strides of a (B, S, H, D) view
struct Strides4 {
  int64_t b, s, h, d;
};

inline Strides4 strides4(const std::vector<int64_t>& v, const char* name) {
  LF_CHECK(v.size() == 4, "rope: " << name << " strides must have 4 entries (B, S, H, D), got " << v.size());
  return {v[0], v[1], v[2], v[3]};
}

}  // namespace lf
