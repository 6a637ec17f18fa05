// Dataset decomposition (Pouransari et al. 2024): every document of length L is cut into
// L / max_len pieces of max_len, then one piece per set bit of L % max_len (largest first).
// Bits below min_len are dropped or kept as one remainder piece.
// Two passes over the documents: count pieces per (thread, bucket), then fill, so each
// bucket keeps document order and threads never share output ranges.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/checks.h"

namespace py = pybind11;

namespace {

constexpr int kMaxBuckets = 64;

inline int ilog2(int64_t x) { return 63 - __builtin_clzll(static_cast<uint64_t>(x)); }

}  // namespace

// lengths: (N,) int64. Returns (doc_arrays, start_arrays, rem_doc, rem_start, rem_len, dropped_tokens,
// dropped_pieces, total_tokens, empty_docs) with one (doc, start) array pair per bucket k (piece length min_len << k), int32
// when all indices fit, else int64.
py::tuple data_decompose(py::array_t<int64_t, py::array::c_style> lengths, int64_t min_len,
                         int64_t max_len, bool remainder) {
  LF_CHECK(min_len >= 1 && (min_len & (min_len - 1)) == 0, "min_len must be a power of two, got " << min_len);
  LF_CHECK(max_len >= 1 && (max_len & (max_len - 1)) == 0, "max_len must be a power of two, got " << max_len);
  LF_CHECK(min_len <= max_len, "min_len (" << min_len << ") must be <= max_len (" << max_len << ")");
  const int64_t n = lengths.shape(0);
  const int64_t* L = lengths.data();
  const int lmin = ilog2(min_len), lmax = ilog2(max_len);
  const int K = lmax - lmin + 1;  // buckets; index K is the remainder bucket
  const int64_t low_mask = min_len - 1;
  int nt = 1;
#ifdef _OPENMP
  nt = omp_get_max_threads();
  if (n < 100000) nt = 1;
#endif
  // counts[t * (K + 1) + k]: pieces of bucket k found by thread t; then exclusive offsets.
  std::vector<int64_t> counts(static_cast<size_t>(nt) * (K + 1), 0);
  std::vector<int64_t> dtok(nt, 0), dpieces(nt, 0), maxl(nt, 0), sum(nt, 0), empty(nt, 0);
  bool bad = false;
#pragma omp parallel num_threads(nt)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    // Thread-local counters: the shared counts rows sit on common cache lines (false sharing),
    // and a local array lets the compiler keep them out of memory traffic aliasing L.
    int64_t c[kMaxBuckets + 1] = {};
    int64_t dt = 0, dp = 0, mx = 0, sm = 0, ne = 0, neg = 0;
    // Blocks that stay in L1, one branch-free (vectorizable) loop per statistic and bit:
    // random lengths would mispredict a per-document set-bit loop.
    constexpr int64_t kBlock = 2048;
    for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
      const int64_t i1 = std::min(hi, i0 + kBlock);
      int64_t top = 0, has = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t l = L[i];
        neg |= l;
        mx = std::max(mx, l);
        sm += l;
        ne += l == 0;
        top += l >> lmax;
        const int64_t low = l & low_mask;
        dt += low;
        has += low != 0;
      }
      c[K - 1] += top;
      c[K] += has;
      for (int k = 0; k < K - 1; ++k) {
        const int sh = lmin + k;
        int64_t cnt = 0;
        for (int64_t i = i0; i < i1; ++i) cnt += (L[i] >> sh) & 1;
        c[k] += cnt;
      }
    }
    dp = c[K];
    const bool b = neg < 0;
    if (remainder) { dt = 0; dp = 0; } else c[K] = 0;
    std::copy(c, c + K + 1, &counts[static_cast<size_t>(t) * (K + 1)]);
    dtok[t] = dt; dpieces[t] = dp; maxl[t] = mx; sum[t] = sm; empty[t] = ne;
    if (b) {
#pragma omp critical
      bad = true;
    }
  }
  LF_CHECK(!bad, "lengths must be non-negative");
  std::vector<int64_t> total(K + 1, 0);
  for (int k = 0; k <= K; ++k) {
    int64_t run = 0;
    for (int t = 0; t < nt; ++t) {
      int64_t v = counts[static_cast<size_t>(t) * (K + 1) + k];
      counts[static_cast<size_t>(t) * (K + 1) + k] = run;
      run += v;
    }
    total[k] = run;
  }
  // Index arrays are int32 when every document index and offset fits: half the output bytes,
  // and writing (page-faulting) the output is most of the cost.
  int64_t max_len_doc = 0;
  for (int t = 0; t < nt; ++t) max_len_doc = std::max(max_len_doc, maxl[t]);
  const bool narrow = n < (int64_t(1) << 31) && max_len_doc < (int64_t(1) << 31);
  py::list dl, sl;
  py::object rd, rs, rlen;
  auto run = [&](auto tag) {
    using I = decltype(tag);
    std::vector<py::array_t<I>> docs, starts;
    std::vector<I*> dptr(K + 1), sptr(K + 1);
    for (int k = 0; k <= K; ++k) {
      docs.emplace_back(total[k]);
      starts.emplace_back(total[k]);
      dptr[k] = docs[k].mutable_data();
      sptr[k] = starts[k].mutable_data();
    }
    py::array_t<I> rem_len(total[K]);
    I* rl = rem_len.mutable_data();
    {
      py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
      {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        // Thread-local write cursors and base pointers (see the counting pass).
        int64_t pos[kMaxBuckets + 1], end[kMaxBuckets + 1];  // end: first slot of the next thread
        I* dp_[kMaxBuckets + 1];
        I* sp_[kMaxBuckets + 1];
        for (int k = 0; k <= K; ++k) {
          pos[k] = counts[static_cast<size_t>(t) * (K + 1) + k];
          end[k] = t + 1 < nt ? counts[static_cast<size_t>(t + 1) * (K + 1) + k] : total[k];
          dp_[k] = dptr[k];
          sp_[k] = sptr[k];
        }
        I scratch[2];
        I* d_top = dp_[K - 1];
        I* s_top = sp_[K - 1];
        constexpr int64_t kBlock = 2048;
        for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
          const int64_t i1 = std::min(hi, i0 + kBlock);
          // Pieces are laid out largest first, so the piece for bit k starts where the bits
          // above k end: l with bits 0..k cleared. One branch-free loop per bucket over an
          // L1-resident block (random bits mispredict a set-bit loop; the cursor stays in a
          // register).
          for (int b = 0; b < K - 1; ++b) {
            const int sh = b + lmin, k1 = sh + 1;
            I* db = dp_[b];
            I* sb = sp_[b];
            int64_t pb = pos[b];
            if (pb + (i1 - i0) <= end[b]) {
              // Every slot this block can touch is this thread's: write unconditionally and
              // advance only on a set bit (a later piece overwrites a clear bit's write).
              for (int64_t i = i0; i < i1; ++i) {
                const int64_t l = L[i];
                db[pb] = static_cast<I>(i);
                sb[pb] = static_cast<I>((l >> k1) << k1);
                pb += (l >> sh) & 1;
              }
            } else {
              for (int64_t i = i0; i < i1; ++i) {
                const int64_t l = L[i];
                const int64_t bit = (l >> sh) & 1;
                // Near the end of the thread's range a clear bit writes to a scratch slot, chosen
                // by mask: the compiler turns `bit ? a : b` into a branch.
                const uintptr_t m = static_cast<uintptr_t>(-bit);
                const uintptr_t s0 = reinterpret_cast<uintptr_t>(scratch);
                I* dd = reinterpret_cast<I*>(s0 ^ ((reinterpret_cast<uintptr_t>(db + pb) ^ s0) & m));
                I* ss = reinterpret_cast<I*>((s0 + sizeof(I)) ^
                                             ((reinterpret_cast<uintptr_t>(sb + pb) ^ (s0 + sizeof(I))) & m));
                *dd = static_cast<I>(i);
                *ss = static_cast<I>((l >> k1) << k1);
                pb += bit;
              }
            }
            pos[b] = pb;
          }
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t l = L[i];
            const int64_t q = l >> lmax;
            for (int64_t j = 0; j < q; ++j) {
              d_top[pos[K - 1]] = static_cast<I>(i);
              s_top[pos[K - 1]++] = static_cast<I>(j << lmax);
            }
            if (!remainder) continue;
            const int64_t low = l & low_mask;
            if (low) {
              dp_[K][pos[K]] = static_cast<I>(i);
              sp_[K][pos[K]] = static_cast<I>(l - low);
              rl[pos[K]++] = static_cast<I>(low);
            }
          }
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      dl.append(docs[k]);
      sl.append(starts[k]);
    }
    rd = docs[K];
    rs = starts[K];
    rlen = rem_len;
  };
  if (narrow) run(int32_t{}); else run(int64_t{});
  int64_t dt = 0, dp = 0, sm = 0, ne = 0;
  for (int t = 0; t < nt; ++t) { dt += dtok[t]; dp += dpieces[t]; sm += sum[t]; ne += empty[t]; }
  return py::make_tuple(dl, sl, rd, rs, rlen, dt, dp, sm, ne);
}
