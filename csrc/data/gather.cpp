// Batch assembly: copy document pieces straight from the (memory-mapped) Arrow value buffers
// into the flat batch tensors, building next-token labels and per-piece positions on the way.
// Layout: pieces are written back to back at offs[p]; [offs[n_pieces], N) is padding.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/checks.h"

namespace py = pybind11;

namespace {

enum TokCode : int { kI32 = 0, kI64 = 1, kU16 = 2, kU32 = 3, kU8 = 4 };
constexpr int64_t kParallelTokens = int64_t(1) << 21;

template <typename T>
void gather_impl(const uint64_t* doc_addr, const uint64_t* mask_addr, const int64_t* pdoc, const int64_t* pstart,
                 const int64_t* plen, const int64_t* offs, int64_t n_pieces, int64_t* ids, int64_t* labels,
                 int64_t* pos, int64_t N, int64_t ignore_index, int64_t pad_id, int64_t vocab,
                 std::atomic<int64_t>& bad_piece) {
  const int64_t hi_ok = vocab > 0 ? vocab : std::numeric_limits<int64_t>::max();
  // Threads only for big batches: one core already moves ~10 GB/s here, and a parallel region on
  // an oversubscribed machine can wait milliseconds for a descheduled thread.
  const bool par = n_pieces > 1 && offs[n_pieces] >= kParallelTokens;
#pragma omp parallel for schedule(dynamic, 4) if (par)
  for (int64_t p = 0; p < n_pieces; ++p) {
    const T* src = reinterpret_cast<const T*>(doc_addr[pdoc[p]]) + pstart[p];
    const int64_t n = plen[p], o = offs[p];
    int64_t* di = ids + o;
    int64_t* dl = labels + o;
    int64_t* dp = pos + o;
    bool bad = false;
    // One pass writes all three streams (labels read the next source token, not ids back).
    for (int64_t t = 0; t + 1 < n; ++t) {
      const int64_t v = static_cast<int64_t>(src[t]);
      bad |= (v < 0) | (v >= hi_ok);
      di[t] = v;
      dl[t] = static_cast<int64_t>(src[t + 1]);
      dp[t] = t;
    }
    if (n > 0) {
      const int64_t v = static_cast<int64_t>(src[n - 1]);
      bad |= (v < 0) | (v >= hi_ok);
      di[n - 1] = v;
      dl[n - 1] = ignore_index;
      dp[n - 1] = n - 1;
    }
    if (mask_addr) {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(mask_addr[pdoc[p]]) + pstart[p];
      for (int64_t t = 0; t + 1 < n; ++t)
        if (!m[t + 1]) dl[t] = ignore_index;
    }
    if (bad) {
      int64_t cur = bad_piece.load();
      while ((cur < 0 || p < cur) && !bad_piece.compare_exchange_weak(cur, p)) {
      }
    }
  }
  const int64_t tail = n_pieces ? offs[n_pieces] : 0;
#pragma omp parallel for schedule(static) if (N - tail >= kParallelTokens)
  for (int64_t t = tail; t < N; ++t) {
    ids[t] = pad_id;
    labels[t] = ignore_index;
    pos[t] = 0;
  }
}

}  // namespace

// Returns -1 on success, else the index of the first piece holding a token < 0 or >= vocab.
int64_t data_gather(uintptr_t doc_addr, uintptr_t mask_addr, int tok_code, uintptr_t pdoc, uintptr_t pstart,
                    uintptr_t plen, uintptr_t offs, int64_t n_pieces, uintptr_t ids, uintptr_t labels,
                    uintptr_t pos, int64_t N, int64_t ignore_index, int64_t pad_id, int64_t vocab) {
  LF_CHECK(n_pieces >= 0 && N >= 0, "n_pieces and N must be non-negative");
  const int64_t* of = lf::as_ptr<const int64_t>(offs);
  LF_CHECK(n_pieces == 0 || of[n_pieces] <= N, "pieces hold " << of[n_pieces] << " tokens but N=" << N);
  std::atomic<int64_t> bad(-1);
  py::gil_scoped_release nogil;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    gather_impl<T>(lf::as_ptr<const uint64_t>(doc_addr), lf::as_ptr<const uint64_t>(mask_addr),
                   lf::as_ptr<const int64_t>(pdoc), lf::as_ptr<const int64_t>(pstart), lf::as_ptr<const int64_t>(plen),
                   of, n_pieces, lf::as_ptr<int64_t>(ids), lf::as_ptr<int64_t>(labels), lf::as_ptr<int64_t>(pos), N,
                   ignore_index, pad_id, vocab, bad);
  };
  switch (tok_code) {
    case kI32: run(int32_t{}); break;
    case kI64: run(int64_t{}); break;
    case kU16: run(uint16_t{}); break;
    case kU32: run(uint32_t{}); break;
    case kU8: run(uint8_t{}); break;
    default: throw std::invalid_argument("unknown token dtype code");
  }
  return bad.load();
}
