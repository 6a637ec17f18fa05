// Best-fit-decreasing bin packing in O(N log C): items sorted by length (counting sort, ties by
// document), bins grouped by remaining space r in per-r stacks, and a 64-ary segment tree of bits
// over r in [0, C] that answers "smallest r >= length with a bin" in O(log_64 C).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "common/checks.h"

namespace py = pybind11;

namespace {

// A 64-ary segment tree of bits over r in [0, C]: bit r is set when some bin has exactly r free.
// next(i) = smallest set r >= i in O(log_64 C) word operations (two levels for C <= 4095).
struct BitTree {
  std::vector<std::vector<uint64_t>> lv;  // lv[0]: one bit per r; lv[l + 1]: one bit per word of lv[l]
  explicit BitTree(int64_t n) {
    do {
      n = (n + 63) >> 6;
      lv.emplace_back(static_cast<size_t>(n), 0);
    } while (n > 1);
  }
  void set(int64_t i) {
    for (auto& w : lv) {
      const uint64_t old = w[i >> 6];
      w[i >> 6] = old | (uint64_t(1) << (i & 63));
      if (old) return;
      i >>= 6;
    }
  }
  void clear(int64_t i) {
    for (auto& w : lv) {
      w[i >> 6] &= ~(uint64_t(1) << (i & 63));
      if (w[i >> 6]) return;
      i >>= 6;
    }
  }
  int64_t next(int64_t i) const {
    size_t l = 0;
    for (;; ++l) {
      if (l == lv.size()) return -1;
      const int64_t w = i >> 6;
      if (w >= static_cast<int64_t>(lv[l].size())) return -1;
      const uint64_t m = lv[l][w] & (~uint64_t(0) << (i & 63));
      if (m) {
        i = (w << 6) | __builtin_ctzll(m);
        break;
      }
      i = w + 1;
    }
    while (l > 0) {
      --l;
      i = (i << 6) | __builtin_ctzll(lv[l][i]);
    }
    return i;
  }
};


struct Item {
  int64_t doc, start, len;
};

// Uninitialized scratch array on 2 MiB-aligned memory with transparent huge pages requested:
// the counting sorts below scatter over hundreds of MiB, and 4 KiB pages make them TLB-bound.
template <typename T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1));
    void* q = nullptr;
    if (posix_memalign(&q, size_t(1) << 21, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(q, bytes, MADV_HUGEPAGE);
#endif
    p = static_cast<T*>(q);
  }
  ~Scratch() { free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T& operator[](int64_t i) { return p[i]; }
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

  // Pass 1: full bins of split documents (they become bins 0..n_full-1, in document order) and
  // a histogram of the items left for BFD.
  int64_t n_full = 0, n_items = 0, truncated = 0;
  std::vector<int64_t> offs(capacity + 2, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = L[i];
    int64_t len = l;
    if (l > capacity) {
      if (split_long) {
        n_full += l / capacity;
        len = l % capacity;
      } else {
        truncated += l - capacity;
        len = capacity;
      }
    }
    if (len > 0) {
      offs[len] += 1;
      ++n_items;
    }
  }
  const int64_t n_rec = n_full + n_items;
  py::array_t<int64_t> out_bin(n_rec), out_doc(n_rec), out_start(n_rec), out_len(n_rec);
  int64_t *ob = out_bin.mutable_data(), *od = out_doc.mutable_data(), *os = out_start.mutable_data(),
          *ol = out_len.mutable_data();
  int64_t num_bins = n_full;
  {
    py::gil_scoped_release nogil;
    // Counting sort of the items by length, descending, ties by document index.
    int64_t run = 0;
    for (int64_t l = capacity; l >= 1; --l) {
      const int64_t c = offs[l];
      offs[l] = run;
      run += c;
    }
    Scratch<Item> items(n_items);
    int64_t f = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = L[i];
      int64_t len = l, st = 0;
      if (l > capacity) {
        if (split_long) {
          for (int64_t j = 0; j < l / capacity; ++j, ++f) {
            ob[f] = f; od[f] = i; os[f] = j * capacity; ol[f] = capacity;
          }
          len = l % capacity;
          st = l - len;
        } else {
          len = capacity;
        }
      }
      if (len > 0) items[offs[len]++] = Item{i, st, len};
    }
    // Best fit: bins by remaining space, head[rem] -> bin, nxt[bin] -> next bin with that rem.
    BitTree tree(capacity + 1);
    std::vector<int64_t> head(capacity + 1, -1);
    std::vector<int64_t> nxt;
    nxt.reserve(n_items / 4 + 16);
    Scratch<int64_t> item_bin(n_items);  // BFD bin of each item, 0-based among BFD bins
    for (int64_t j = 0; j < n_items; ++j) {
      const int64_t len = items[j].len;
      const int64_t rem = tree.next(len);
      int64_t bin, left;
      if (rem < 0) {
        bin = static_cast<int64_t>(nxt.size());
        nxt.push_back(-1);
        left = capacity - len;
      } else {
        bin = head[rem];
        head[rem] = nxt[bin];
        if (head[rem] < 0) tree.clear(rem);
        left = rem - len;
      }
      if (left > 0) {
        nxt[bin] = head[left];
        if (head[left] < 0) tree.set(left);
        head[left] = bin;
      }
      item_bin[j] = bin;
    }
    const int64_t n_bfd = static_cast<int64_t>(nxt.size());
    num_bins = n_full + n_bfd;
    // Stable counting sort of the items by bin: one scattered 24-byte write per item, then a
    // sequential split into the output columns.
    std::vector<int64_t> boff(n_bfd + 1, 0);
    for (int64_t j = 0; j < n_items; ++j) boff[item_bin[j] + 1] += 1;
    for (int64_t b = 0; b < n_bfd; ++b) boff[b + 1] += boff[b];
    Scratch<Item> sorted(n_items);
    for (int64_t j = 0; j < n_items; ++j) sorted[boff[item_bin[j]]++] = items[j];
    int64_t b = 0;
    for (int64_t j = 0; j < n_items; ++j) {
      while (boff[b] <= j) ++b;  // boff[b] now holds the end of bin b
      const int64_t p = n_full + j;
      ob[p] = n_full + b; od[p] = sorted[j].doc; os[p] = sorted[j].start; ol[p] = sorted[j].len;
    }
  }
  return py::make_tuple(out_bin, out_doc, out_start, out_len, num_bins, truncated);
}
