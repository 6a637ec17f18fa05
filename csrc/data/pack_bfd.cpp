// Best-fit-decreasing bin packing in O(N log C): items sorted by length (counting sort, ties by
// document), bins grouped by remaining space r in per-r stacks, and a range-min segment tree
// over r in [0, C] that answers "smallest r >= length with a bin" in O(log C).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"

namespace py = pybind11;

namespace {

// Range-min over leaves 0..n-1; leaf r holds r when some bin has exactly r free, else INF.
struct MinTree {
  int64_t size;
  std::vector<int32_t> t;
  static constexpr int32_t INF = std::numeric_limits<int32_t>::max();
  explicit MinTree(int64_t n) : size(1) {
    while (size < n) size <<= 1;
    t.assign(2 * size, INF);
  }
  void set(int64_t i, int32_t v) {
    i += size;
    t[i] = v;
    for (i >>= 1; i; i >>= 1) t[i] = std::min(t[2 * i], t[2 * i + 1]);
  }
  // min over [lo, size)
  int32_t query_from(int64_t lo) const {
    int32_t res = INF;
    int64_t l = lo + size, r = 2 * size;
    while (l < r) {
      if (l & 1) res = std::min(res, t[l++]);
      if (r & 1) res = std::min(res, t[--r]);
      l >>= 1;
      r >>= 1;
    }
    return res;
  }
};

}  // namespace

// lengths: (N,) int64; returns (bin, doc, start, length) int64 arrays sorted by bin, num_bins,
// truncated_tokens. Documents longer than capacity are split into full bins (split_long) or
// truncated to their first capacity tokens.
py::tuple data_pack_bfd(py::array_t<int64_t, py::array::c_style> lengths, int64_t capacity, bool split_long) {
  LF_CHECK(capacity >= 1 && capacity < (int64_t(1) << 30), "capacity must be in [1, 2^30), got " << capacity);
  const int64_t n = lengths.shape(0);
  const int64_t* L = lengths.data();
  for (int64_t i = 0; i < n; ++i) LF_CHECK(L[i] >= 0, "lengths must be non-negative (document " << i << ")");

  std::vector<int64_t> rec_bin, rec_doc, rec_start, rec_len;
  int64_t truncated = 0, num_bins = 0;
  py::array_t<int64_t> out_bin, out_doc, out_start, out_len;
  {
    py::gil_scoped_release nogil;
    // Full bins of split documents come first, in document order.
    int64_t n_full = 0, n_items = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = L[i];
      if (l > capacity) {
        if (split_long) {
          n_full += l / capacity;
          n_items += (l % capacity) != 0;
        } else {
          n_items += 1;
        }
      } else {
        n_items += l > 0;
      }
    }
    const int64_t n_rec = n_full + n_items;
    rec_bin.resize(n_rec); rec_doc.resize(n_rec); rec_start.resize(n_rec); rec_len.resize(n_rec);
    // Counting sort of the BFD items by length, descending, ties by document index.
    std::vector<int64_t> cnt(capacity + 2, 0);
    int64_t r = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = L[i];
      if (l > capacity && split_long) {
        for (int64_t j = 0; j < l / capacity; ++j) {
          rec_bin[r] = num_bins++; rec_doc[r] = i; rec_start[r] = j * capacity; rec_len[r] = capacity; ++r;
        }
        if (l % capacity) cnt[l % capacity] += 1;
      } else if (l > capacity) {
        cnt[capacity] += 1;
        truncated += l - capacity;
      } else if (l > 0) {
        cnt[l] += 1;
      }
    }
    // offs[len]: first slot of that length in descending order
    std::vector<int64_t> offs(capacity + 2, 0);
    int64_t run = 0;
    for (int64_t l = capacity; l >= 1; --l) { offs[l] = run; run += cnt[l]; }
    std::vector<int64_t> item_doc(n_items), item_start(n_items);
    std::vector<int32_t> item_len(n_items);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = L[i];
      int64_t len, st;
      if (l > capacity && split_long) {
        len = l % capacity; st = l - len;
        if (!len) continue;
      } else if (l > capacity) {
        len = capacity; st = 0;
      } else if (l > 0) {
        len = l; st = 0;
      } else {
        continue;
      }
      const int64_t p = offs[len]++;
      item_doc[p] = i; item_start[p] = st; item_len[p] = static_cast<int32_t>(len);
    }
    // Bins by remaining space: head[rem] -> bin, nxt[bin] -> next bin with the same rem.
    MinTree tree(capacity + 1);
    std::vector<int64_t> head(capacity + 1, -1);
    std::vector<int64_t> nxt;
    nxt.reserve(n_items / 2 + 16);
    const int64_t first_bfd_bin = num_bins;
    for (int64_t j = 0; j < n_items; ++j) {
      const int32_t len = item_len[j];
      const int32_t rem = tree.query_from(len);
      int64_t bin;
      int64_t left;
      if (rem == MinTree::INF) {
        bin = num_bins++;
        nxt.push_back(-1);
        left = capacity - len;
      } else {
        bin = head[rem];
        head[rem] = nxt[bin - first_bfd_bin];
        if (head[rem] < 0) tree.set(rem, MinTree::INF);
        left = rem - len;
      }
      if (left > 0) {
        nxt[bin - first_bfd_bin] = head[left];
        if (head[left] < 0) tree.set(left, static_cast<int32_t>(left));
        head[left] = bin;
      }
      rec_bin[r] = bin; rec_doc[r] = item_doc[j]; rec_start[r] = item_start[j]; rec_len[r] = len; ++r;
    }
  }
  // Stable counting sort of the records by bin.
  const int64_t n_rec = static_cast<int64_t>(rec_bin.size());
  out_bin = py::array_t<int64_t>(n_rec);
  out_doc = py::array_t<int64_t>(n_rec);
  out_start = py::array_t<int64_t>(n_rec);
  out_len = py::array_t<int64_t>(n_rec);
  int64_t *ob = out_bin.mutable_data(), *od = out_doc.mutable_data(), *os = out_start.mutable_data(),
          *ol = out_len.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> off(num_bins + 1, 0);
    for (int64_t i = 0; i < n_rec; ++i) off[rec_bin[i] + 1] += 1;
    for (int64_t b = 0; b < num_bins; ++b) off[b + 1] += off[b];
    for (int64_t i = 0; i < n_rec; ++i) {
      const int64_t p = off[rec_bin[i]]++;
      ob[p] = rec_bin[i]; od[p] = rec_doc[i]; os[p] = rec_start[i]; ol[p] = rec_len[i];
    }
  }
  return py::make_tuple(out_bin, out_doc, out_start, out_len, num_bins, truncated);
}
