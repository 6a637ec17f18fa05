// Host emulation of the CUDA runtime pieces csrc/rope/rope.cu uses (for csrc/rope/emu/check.sh only).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline thread_local int64_t* emu_smem = nullptr;
inline thread_local std::barrier<>* emu_bar = nullptr;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __syncthreads() emu_bar->arrive_and_wait()
using std::min;
typedef void* cudaStream_t;
typedef int cudaError_t;
const int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorString(cudaError_t) { return ""; }
template <class F, class... P>
void emu_launch(F kernel, unsigned blocks, int threads, size_t smem, const P&... p) {
  for (unsigned b = 0; b < blocks; ++b) {
    std::vector<int64_t> sm(smem / 8 + 1, 0x7ff8dead);
    std::barrier<> bar(threads);
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        threadIdx.x = t; blockIdx.x = b; blockDim.x = threads; emu_smem = sm.data(); emu_bar = &bar;
        kernel(p...);
      });
    for (auto& th : ts) th.join();
  }
}
