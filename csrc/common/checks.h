// Shared helpers for the torch-free kernels: argument checks and a strided tensor view.
// Kernels receive raw pointers, shapes and element strides from Python (tensor.data_ptr()).
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

// LF_CHECK(cond, "message " << value): throws std::invalid_argument, which pybind11 maps to ValueError.
#define LF_CHECK(cond, msg)                                              \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::ostringstream lf_oss_;                                        \
      lf_oss_ << msg;                                                    \
      throw std::invalid_argument(lf_oss_.str());                        \
    }                                                                    \
  } while (0)

namespace lf {

// dtype codes shared with Python (lengen_fast/backends.py: DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A 3-D strided view (T, H, D) with element strides; the common layout of q, k, v.
template <typename T>
struct View3 {
  T* ptr;
  int64_t n0, n1, n2;
  int64_t s0, s1, s2;
  inline T& operator()(int64_t i, int64_t j, int64_t k) const { return ptr[i * s0 + j * s1 + k * s2]; }
};

// Pointer passed from Python as an integer.
template <typename T>
inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace lf
