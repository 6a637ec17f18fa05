// Dataset decomposition (Pouransari et al. 2024): every document of length L is cut into
// L / max_len pieces of max_len, then one piece per set bit of L % max_len (largest first).
// Bits below min_len are dropped or kept as one remainder piece.
// With the GIL released: count pieces per (thread, bucket), make one allocation for every
// output array, then fill, so each bucket keeps document order and threads never share
// output ranges.
// ISA: the count and fill passes have portable, AVX2 and AVX-512 variants, chosen per call by
// lf::cpu_isa() (common/isa.h); the SIMD ones are compiled with target attributes, so the rest of
// the build stays at the portable baseline.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/isa.h"
#if LF_X86
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/checks.h"

namespace py = pybind11;

namespace {

constexpr int kMaxBuckets = 64;
constexpr int64_t kBlock = 2048;  // documents per block: their lengths stay in L1 across the per-bucket loops
constexpr int64_t kAlignElems = 16;  // every output array starts on a 64-byte boundary

inline int ilog2(int64_t x) { return 63 - __builtin_clzll(static_cast<uint64_t>(x)); }

// Per-thread fill state: write cursors, the first slot of the next thread, and output bases.
template <typename I>
struct Cursor {
  int64_t pos[kMaxBuckets + 1];
  int64_t end[kMaxBuckets + 1];
  I* doc[kMaxBuckets + 1];
  I* start[kMaxBuckets + 1];
  I* rem_len;
};

// Documents [i0, i1) of a thread's range, scalar. Bucket K - 1 holds max_len pieces, K the remainder.
template <typename I>
void fill_block_scalar(const int64_t* L, int64_t i0, int64_t i1, int K, int lmin, int lmax, bool remainder,
                       Cursor<I>& c) {
  const int64_t low_mask = (int64_t(1) << lmin) - 1;
  I scratch[2];
  // Pieces are laid out largest first, so the piece for bit k starts where the bits above k end:
  // l with bits 0..k cleared. One branch-free loop per bucket over an L1-resident block (random
  // bits mispredict a set-bit loop; the cursor stays in a register).
  for (int b = 0; b < K - 1; ++b) {
    const int sh = b + lmin, k1 = sh + 1;
    I* db = c.doc[b];
    I* sb = c.start[b];
    int64_t pb = c.pos[b];
    if (pb + (i1 - i0) <= c.end[b]) {
      // Every slot this block can touch is this thread's: write unconditionally and advance only
      // on a set bit (a later piece overwrites a clear bit's write).
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
        // Near the end of the thread's range a clear bit writes to a scratch slot, chosen by mask:
        // the compiler turns `bit ? a : b` into a branch.
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
    c.pos[b] = pb;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t l = L[i];
    const int64_t q = l >> lmax;
    for (int64_t j = 0; j < q; ++j) {
      c.doc[K - 1][c.pos[K - 1]] = static_cast<I>(i);
      c.start[K - 1][c.pos[K - 1]++] = static_cast<I>(j << lmax);
    }
    if (!remainder) continue;
    const int64_t low = l & low_mask;
    if (low) {
      c.doc[K][c.pos[K]] = static_cast<I>(i);
      c.start[K][c.pos[K]] = static_cast<I>(l - low);
      c.rem_len[c.pos[K]++] = static_cast<I>(low);
    }
  }
}

#if LF_X86
// The same for int32 outputs (every length < 2^31), 16 documents per vector: a bucket's set bits
// are left-packed with vpcompressd and stored with a length mask, so no store leaves the piece's
// own slots. l32: the block's lengths as int32, zero-padded to a multiple of 16.
__attribute__((target(LF_TARGET_AVX512)))
void fill_block_avx512(const int32_t* l32, int64_t i0, int64_t nb, int K, int lmin, int lmax, bool remainder,
                       Cursor<int32_t>& c) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  const __m512i first = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i0)), iota);
  for (int b = 0; b < K - 1 && b + lmin < 31; ++b) {  // bits >= 31 are clear in int32 lengths
    const int sh = b + lmin;
    const __m512i bit = _mm512_set1_epi32(int32_t(1) << sh);
    const __m512i keep = _mm512_set1_epi32(static_cast<int32_t>(~((int64_t(2) << sh) - 1)));  // bits above sh
    int32_t* db = c.doc[b];
    int32_t* sb = c.start[b];
    int64_t p = c.pos[b];
    __m512i idx = first;
    for (int64_t j = 0; j < nb; j += 16) {
      const __m512i v = _mm512_load_si512(l32 + j);
      const __mmask16 m = _mm512_test_epi32_mask(v, bit);
      const int n = __builtin_popcount(m);
      const __mmask16 out = static_cast<__mmask16>((1u << n) - 1);
      _mm512_mask_storeu_epi32(db + p, out, _mm512_maskz_compress_epi32(m, idx));
      _mm512_mask_storeu_epi32(sb + p, out, _mm512_maskz_compress_epi32(m, _mm512_and_si512(v, keep)));
      p += n;
      idx = _mm512_add_epi32(idx, step);
    }
    c.pos[b] = p;
  }
  if (lmax < 31) {  // documents of at least max_len are few: visit them by mask
    const __m512i top = _mm512_set1_epi32(int32_t(1) << lmax);
    int32_t* dt = c.doc[K - 1];
    int32_t* st = c.start[K - 1];
    int64_t p = c.pos[K - 1];
    for (int64_t j = 0; j < nb; j += 16) {
      for (uint32_t m = _mm512_cmpge_epi32_mask(_mm512_load_si512(l32 + j), top); m; m &= m - 1) {
        const int64_t jj = j + __builtin_ctz(m);
        const int32_t q = l32[jj] >> lmax;
        for (int32_t t = 0; t < q; ++t) {
          dt[p] = static_cast<int32_t>(i0 + jj);
          st[p++] = t << lmax;
        }
      }
    }
    c.pos[K - 1] = p;
  }
  if (remainder) {
    const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>((int64_t(1) << lmin) - 1, INT32_MAX)));
    int64_t p = c.pos[K];
    __m512i idx = first;
    for (int64_t j = 0; j < nb; j += 16) {
      const __m512i v = _mm512_load_si512(l32 + j);
      const __mmask16 m = _mm512_test_epi32_mask(v, low);
      const int n = __builtin_popcount(m);
      const __mmask16 out = static_cast<__mmask16>((1u << n) - 1);
      _mm512_mask_storeu_epi32(c.doc[K] + p, out, _mm512_maskz_compress_epi32(m, idx));
      _mm512_mask_storeu_epi32(c.start[K] + p, out, _mm512_maskz_compress_epi32(m, _mm512_andnot_si512(low, v)));
      _mm512_mask_storeu_epi32(c.rem_len + p, out, _mm512_maskz_compress_epi32(m, _mm512_and_si512(v, low)));
      p += n;
      idx = _mm512_add_epi32(idx, step);
    }
    c.pos[K] = p;
  }
}

// kCompress8.t[m]: the lane numbers of m's set bits, left-packed, one per byte (vpermd indices):
// AVX2 has no vpcompressd.
struct CompressTable {
  uint64_t t[256];
};
constexpr CompressTable make_compress_table() {
  CompressTable c{};
  for (int m = 0; m < 256; ++m) {
    uint64_t v = 0;
    int n = 0;
    for (int j = 0; j < 8; ++j)
      if ((m >> j) & 1) v |= static_cast<uint64_t>(j) << (8 * n++);
    c.t[m] = v;
  }
  return c;
}
constexpr CompressTable kCompress8 = make_compress_table();

// Stores the first n lanes of v at dst; all 8 when `full` (the caller owns dst[0, 8)): vpmaskmovd
// is microcoded on AMD Zen 2/3 and made the fill slower than the scalar one there.
__attribute__((target(LF_TARGET_AVX2)))
inline void store_first(int32_t* dst, __m256i v, int n, bool full) {
  if (full) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
  } else {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_epi32(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), v);  // masked lanes never fault
  }
}

// The AVX-512 fill done with AVX2, 8 documents per vector: set bits are left-packed with vpermd and a table,
// and stored with store_first.
// l32: the block's lengths as int32, zero-padded to a multiple of 8.
__attribute__((target(LF_TARGET_AVX2)))
void fill_block_avx2(const int32_t* l32, int64_t i0, int64_t nb, int K, int lmin, int lmax, bool remainder,
                     Cursor<int32_t>& c) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8), zero = _mm256_setzero_si256();
  const __m256i first = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(i0)), iota);
  auto perm = [](unsigned m) {  // (8,) lane numbers of m's set bits, left-packed
    return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kCompress8.t[m]));
  };
  for (int b = 0; b < K - 1 && b + lmin < 31; ++b) {  // bits >= 31 are clear in int32 lengths
    const int sh = b + lmin;
    const __m128i to_sign = _mm_cvtsi32_si128(31 - sh);  // moves bit sh to the sign bit for movmskps
    const __m256i keep = _mm256_set1_epi32(static_cast<int32_t>(~((int64_t(2) << sh) - 1)));  // bits above sh
    int32_t* db = c.doc[b];
    int32_t* sb = c.start[b];
    int64_t p = c.pos[b];
    __m256i idx = first;
    // Every slot this block can touch is this thread's: store all 8 lanes (a later store
    // overwrites the lanes past n). Else store only the first n lanes.
    const bool full = p + nb + 8 <= c.end[b];
    for (int64_t j = 0; j < nb; j += 8) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(l32 + j));
      const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_sll_epi32(v, to_sign))));
      const int n = __builtin_popcount(m);
      const __m256i pm = _mm256_cvtepu8_epi32(perm(m));
      store_first(db + p, _mm256_permutevar8x32_epi32(idx, pm), n, full);
      store_first(sb + p, _mm256_permutevar8x32_epi32(_mm256_and_si256(v, keep), pm), n, full);
      p += n;
      idx = _mm256_add_epi32(idx, step);
    }
    c.pos[b] = p;
  }
  if (lmax < 31) {  // documents of at least max_len are few: visit them by mask
    const __m256i below = _mm256_set1_epi32((int32_t(1) << lmax) - 1);
    int32_t* dt = c.doc[K - 1];
    int32_t* st = c.start[K - 1];
    int64_t p = c.pos[K - 1];
    for (int64_t j = 0; j < nb; j += 8) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(l32 + j));
      for (unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, below))));
           m; m &= m - 1) {
        const int64_t jj = j + __builtin_ctz(m);
        const int32_t q = l32[jj] >> lmax;
        for (int32_t t = 0; t < q; ++t) {
          dt[p] = static_cast<int32_t>(i0 + jj);
          st[p++] = t << lmax;
        }
      }
    }
    c.pos[K - 1] = p;
  }
  if (remainder) {
    const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>((int64_t(1) << lmin) - 1, INT32_MAX)));
    int64_t p = c.pos[K];
    const bool full = p + nb + 8 <= c.end[K];
    __m256i idx = first;
    for (int64_t j = 0; j < nb; j += 8) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(l32 + j));
      const __m256i r = _mm256_and_si256(v, low);
      const unsigned m = 0xFFu & ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(r, zero))));
      const int n = __builtin_popcount(m);
      const __m256i pm = _mm256_cvtepu8_epi32(perm(m));
      store_first(c.doc[K] + p, _mm256_permutevar8x32_epi32(idx, pm), n, full);
      store_first(c.start[K] + p, _mm256_permutevar8x32_epi32(_mm256_andnot_si256(low, v), pm), n, full);
      store_first(c.rem_len + p, _mm256_permutevar8x32_epi32(r, pm), n, full);
      p += n;
      idx = _mm256_add_epi32(idx, step);
    }
    c.pos[K] = p;
  }
}

__attribute__((target(LF_TARGET_AVX512)))
void fill_range_avx512(const int64_t* L, int64_t lo, int64_t hi, int K, int lmin, int lmax, bool remainder,
                       Cursor<int32_t>& c) {
  alignas(64) int32_t l32[kBlock];
  for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
    const int64_t nb = std::min(hi - i0, kBlock);
    const int64_t nv = (nb + 15) & ~int64_t(15);
    for (int64_t j = 0; j < nv; j += 8) {
      const __mmask8 in = static_cast<__mmask8>(nb - j >= 8 ? 0xFF : (1u << std::max<int64_t>(nb - j, 0)) - 1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(l32 + j),
                         _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(in, L + i0 + j)));
    }
    fill_block_avx512(l32, i0, nb, K, lmin, lmax, remainder, c);
  }
}

__attribute__((target(LF_TARGET_AVX2)))
void fill_range_avx2(const int64_t* L, int64_t lo, int64_t hi, int K, int lmin, int lmax, bool remainder,
                     Cursor<int32_t>& c) {
  alignas(32) int32_t l32[kBlock];
  for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
    const int64_t nb = std::min(hi - i0, kBlock);
    const int64_t nv = (nb + 7) & ~int64_t(7);
    for (int64_t j = 0; j < nb; ++j) l32[j] = static_cast<int32_t>(L[i0 + j]);
    for (int64_t j = nb; j < nv; ++j) l32[j] = 0;  // padding lanes: empty documents set no bit
    fill_block_avx2(l32, i0, nb, K, lmin, lmax, remainder, c);
  }
}
#endif

// The SIMD fills write int32 outputs only; int64 outputs (an index or length >= 2^31) take the scalar one.
template <typename I>
void fill_range(const int64_t* L, int64_t lo, int64_t hi, int K, int lmin, int lmax, bool remainder, lf::Isa isa,
                Cursor<I>& c) {
#if LF_X86
  if constexpr (std::is_same_v<I, int32_t>) {
    if (isa == lf::Isa::kAvx512) return fill_range_avx512(L, lo, hi, K, lmin, lmax, remainder, c);
    if (isa == lf::Isa::kAvx2) return fill_range_avx2(L, lo, hi, K, lmin, lmax, remainder, c);
  }
#endif
  (void)isa;
  for (int64_t i0 = lo; i0 < hi; i0 += kBlock)
    fill_block_scalar(L, i0, std::min(hi, i0 + kBlock), K, lmin, lmax, remainder, c);
}

// Per-thread results of the counting pass: pieces per bucket (K: documents with a remainder) and
// the statistics returned alongside (remainder tokens, max, sum, empty documents, OR of all lengths).
struct Stats {
  int64_t cnt[kMaxBuckets + 1] = {};
  int64_t dt = 0, mx = 0, sm = 0, ne = 0, ng = 0;
};

// Blocks that stay in L1, one branch-free (vectorizable) loop per statistic and bit: random lengths
// would mispredict a per-document set-bit loop.
// Inlined into a portable and an AVX2-targeted wrapper: the compiler vectorizes each for its ISA.
__attribute__((always_inline)) inline void count_block_body(const int64_t* L, int64_t i0, int64_t i1, int K,
                                                            int lmin, int lmax, Stats& s) {
  const int64_t low_mask = (int64_t(1) << lmin) - 1;
  int64_t top = 0, has = 0, dt = 0, mx = s.mx, sm = 0, ne = 0, ng = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t l = L[i];
    ng |= l;
    mx = std::max(mx, l);
    sm += l;
    ne += l == 0;
    top += l >> lmax;
    const int64_t low = l & low_mask;
    dt += low;
    has += low != 0;
  }
  s.cnt[K - 1] += top;
  s.cnt[K] += has;
  s.dt += dt; s.mx = mx; s.sm += sm; s.ne += ne; s.ng |= ng;
  for (int k = 0; k < K - 1; ++k) {
    const int sh = lmin + k;
    int64_t c = 0;
    for (int64_t i = i0; i < i1; ++i) c += (L[i] >> sh) & 1;
    s.cnt[k] += c;
  }
}

void count_block_scalar(const int64_t* L, int64_t i0, int64_t i1, int K, int lmin, int lmax, Stats& s) {
  count_block_body(L, i0, i1, K, lmin, lmax, s);
}

#if LF_X86
__attribute__((target(LF_TARGET_AVX2)))
void count_block_avx2(const int64_t* L, int64_t i0, int64_t i1, int K, int lmin, int lmax, Stats& s) {
  count_block_body(L, i0, i1, K, lmin, lmax, s);
}

// ctrl(g): vpmultishiftqb control selecting bits lmin + 8g .. lmin + 8g + 7 of each 64-bit lane.
__attribute__((target(LF_TARGET_AVX512VBMI)))
inline __m512i multishift_ctrl(int lmin, int g) {
  uint64_t c = 0;
  for (int j = 0; j < 8; ++j) c |= static_cast<uint64_t>((lmin + 8 * g + j) & 63) << (8 * j);
  return _mm512_set1_epi64(static_cast<int64_t>(c));
}

// Adds the byte counters of group g (bits lmin + 8g + j, j < 8) into s.cnt.
__attribute__((target(LF_TARGET_AVX512VBMI)))
inline void add_bit_counts(int g, int nbits, __m512i acc, Stats& s) {
  alignas(64) uint8_t b[64];
  _mm512_store_si512(b, acc);
  for (int j = 0; j < 8 && 8 * g + j < nbits; ++j) {
    int64_t c = 0;
    for (int q = 0; q < 8; ++q) c += b[8 * q + j];
    s.cnt[8 * g + j] += c;
  }
}

// The same, 8 lengths per vector, for at most 1024 documents. Bucket bits are counted 8 at a time:
// vpmultishiftqb moves bit lmin + 8g + j of every length into the low bit of byte j, and byte
// counters (at most 128 per block, no overflow) are summed into the 64-bit counts at the end.
__attribute__((target(LF_TARGET_AVX512VBMI)))
void count_block_avx512(const int64_t* L, int64_t i0, int64_t i1, int K, int lmin, int lmax, Stats& s) {
  const int nbits = K - 1;
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi64(1), byte1 = _mm512_set1_epi8(1);
  const __m512i low = _mm512_set1_epi64((int64_t(1) << lmin) - 1);
  __m512i orv = zero, mxv = zero, smv = zero, topv = zero, dtv = zero, nev = zero, hasv = zero, acc = zero;
  const __m512i c0 = multishift_ctrl(lmin, 0);
  for (int64_t i = i0; i < i1; i += 8) {
    const __mmask8 in = static_cast<__mmask8>(i1 - i >= 8 ? 0xFF : (1u << (i1 - i)) - 1);
    const __m512i v = _mm512_maskz_loadu_epi64(in, L + i);  // lanes past i1 read as empty documents
    orv = _mm512_or_si512(orv, v);
    mxv = _mm512_max_epi64(mxv, v);
    smv = _mm512_add_epi64(smv, v);
    topv = _mm512_add_epi64(topv, _mm512_srli_epi64(v, lmax));
    dtv = _mm512_add_epi64(dtv, _mm512_and_si512(v, low));
    hasv = _mm512_mask_add_epi64(hasv, _mm512_test_epi64_mask(v, low), hasv, one);
    nev = _mm512_mask_add_epi64(nev, _mm512_mask_cmpeq_epi64_mask(in, v, zero), nev, one);
    acc = _mm512_add_epi8(acc, _mm512_and_si512(_mm512_multishift_epi64_epi8(c0, v), byte1));
  }
  add_bit_counts(0, nbits, acc, s);
  for (int g = 1; 8 * g < nbits; ++g) {
    const __m512i cg = multishift_ctrl(lmin, g);
    acc = zero;
    for (int64_t i = i0; i < i1; i += 8) {
      const __mmask8 in = static_cast<__mmask8>(i1 - i >= 8 ? 0xFF : (1u << (i1 - i)) - 1);
      acc = _mm512_add_epi8(acc, _mm512_and_si512(_mm512_multishift_epi64_epi8(cg, _mm512_maskz_loadu_epi64(in, L + i)),
                                                  byte1));
    }
    add_bit_counts(g, nbits, acc, s);
  }
  s.cnt[K - 1] += _mm512_reduce_add_epi64(topv);
  s.cnt[K] += _mm512_reduce_add_epi64(hasv);
  s.dt += _mm512_reduce_add_epi64(dtv);
  s.mx = std::max<int64_t>(s.mx, _mm512_reduce_max_epi64(mxv));
  s.sm += _mm512_reduce_add_epi64(smv);
  s.ne += _mm512_reduce_add_epi64(nev);
  s.ng |= _mm512_reduce_or_epi64(orv);
}
#endif

// AVX-512 without VBMI (Skylake-X) counts with the AVX2 variant.
void count_range(const int64_t* L, int64_t lo, int64_t hi, int K, int lmin, int lmax, lf::Isa isa, Stats& s) {
#if LF_X86
  if (isa == lf::Isa::kAvx512 && lf::cpu_has_avx512vbmi()) {
    for (int64_t i0 = lo; i0 < hi; i0 += 1024) count_block_avx512(L, i0, std::min(hi, i0 + 1024), K, lmin, lmax, s);
    return;
  }
  if (isa != lf::Isa::kPortable) {
    for (int64_t i0 = lo; i0 < hi; i0 += kBlock) count_block_avx2(L, i0, std::min(hi, i0 + kBlock), K, lmin, lmax, s);
    return;
  }
#endif
  (void)isa;
  for (int64_t i0 = lo; i0 < hi; i0 += kBlock) count_block_scalar(L, i0, std::min(hi, i0 + kBlock), K, lmin, lmax, s);
}

// f(t) for t in [0, nt), t = 0 on the calling thread. Plain threads joined by blocking waits:
// OpenMP's idle threads spin after each region and barrier, which on the shared 2-core machine
// took the core from the thread still working (1.5-2x the wall time when a neighbour was busy).
template <typename F>
void run_threads(int nt, F&& f) {
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(f, t);
  f(0);
  for (auto& th : pool) th.join();
}

}  // namespace

// lengths: (N,) int64. Returns (doc_arrays, start_arrays, rem_doc, rem_start, rem_len, dropped_tokens,
// dropped_pieces, total_tokens, empty_docs) with one (doc, start) array pair per bucket k (piece length
// min_len << k), int32 when all indices fit, else int64. All arrays are views of one allocation.
// simd=false forces the portable count and fill; simd=true uses lf::cpu_isa() (the CPU's best, or LENGEN_CPU_ISA).
py::tuple data_decompose(py::array_t<int64_t, py::array::c_style> lengths, int64_t min_len,
                         int64_t max_len, bool remainder, bool simd) {
  LF_CHECK(min_len >= 1 && (min_len & (min_len - 1)) == 0, "min_len must be a power of two, got " << min_len);
  LF_CHECK(max_len >= 1 && (max_len & (max_len - 1)) == 0, "max_len must be a power of two, got " << max_len);
  LF_CHECK(min_len <= max_len, "min_len (" << min_len << ") must be <= max_len (" << max_len << ")");
  const lf::Isa isa = simd ? lf::cpu_isa() : lf::Isa::kPortable;  // may throw: before the GIL is released
  const int64_t n = lengths.shape(0);
  const int64_t* L = lengths.data();
  const int lmin = ilog2(min_len), lmax = ilog2(max_len);
  const int K = lmax - lmin + 1;  // buckets; index K is the remainder bucket
  int nt = 1;
#ifdef _OPENMP
  nt = omp_get_max_threads();
#endif
  if (n < 100000) nt = 1;
  // counts[t * (K + 1) + k]: pieces of bucket k found by thread t; then exclusive offsets.
  std::vector<int64_t> counts(static_cast<size_t>(nt) * (K + 1), 0);
  std::vector<int64_t> total(K + 1, 0), off(K + 2, 0);  // off: element offset of bucket k's arrays
  std::vector<int64_t> dtok(nt, 0), dpieces(nt, 0), maxl(nt, 0), sum(nt, 0), empty(nt, 0), neg(nt, 0);
  bool narrow = true;
  void* buf = nullptr;
  {
    py::gil_scoped_release nogil;
    run_threads(nt, [&](int t) {
      const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
      // Thread-local counters: the shared counts rows sit on common cache lines (false sharing),
      // and a local struct lets the compiler keep them out of memory traffic aliasing L.
      Stats st;
      count_range(L, lo, hi, K, lmin, lmax, isa, st);
      dpieces[t] = remainder ? 0 : st.cnt[K];
      dtok[t] = remainder ? 0 : st.dt;
      if (!remainder) st.cnt[K] = 0;
      std::copy(st.cnt, st.cnt + K + 1, &counts[static_cast<size_t>(t) * (K + 1)]);
      maxl[t] = st.mx; sum[t] = st.sm; empty[t] = st.ne; neg[t] = st.ng;
    });
    if (*std::min_element(neg.begin(), neg.end()) >= 0) {
      for (int k = 0; k <= K; ++k) {
        int64_t run = 0;
        for (int t = 0; t < nt; ++t) {
          const int64_t v = counts[static_cast<size_t>(t) * (K + 1) + k];
          counts[static_cast<size_t>(t) * (K + 1) + k] = run;
          run += v;
        }
        total[k] = run;
      }
      // Index arrays are int32 when every document index and offset fits: half the output bytes.
      narrow = n < (int64_t(1) << 31) && *std::max_element(maxl.begin(), maxl.end()) < (int64_t(1) << 31);
      for (int k = 0; k <= K; ++k) off[k + 1] = off[k] + 2 * ((total[k] + kAlignElems - 1) & ~(kAlignElems - 1));
      const size_t bytes = static_cast<size_t>(off[K + 1] + total[K]) * (narrow ? 4 : 8) + 64;
      // Huge pages: a fresh page fault per 4 KiB of output costs more than writing it.
      const size_t align = bytes >= (size_t(4) << 20) ? (size_t(2) << 20) : 64;
      const size_t size = (bytes + align - 1) / align * align;
      buf = std::aligned_alloc(align, size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (buf && align > 64) madvise(buf, size, MADV_HUGEPAGE);
#endif
      if (buf) {
        auto fill = [&](auto tag) {
          using I = decltype(tag);
          I* base = static_cast<I*>(buf);
          run_threads(nt, [&](int t) {
            Cursor<I> c;
            for (int k = 0; k <= K; ++k) {
              c.pos[k] = counts[static_cast<size_t>(t) * (K + 1) + k];
              c.end[k] = t + 1 < nt ? counts[static_cast<size_t>(t + 1) * (K + 1) + k] : total[k];
              c.doc[k] = base + off[k];
              c.start[k] = base + off[k] + (off[k + 1] - off[k]) / 2;
            }
            c.rem_len = base + off[K + 1];
            fill_range(L, n * t / nt, n * (t + 1) / nt, K, lmin, lmax, remainder, isa, c);
          });
        };
        if (narrow) fill(int32_t{}); else fill(int64_t{});
      }
    }
  }
  LF_CHECK(*std::min_element(neg.begin(), neg.end()) >= 0, "lengths must be non-negative");
  if (!buf) throw std::bad_alloc();
  py::capsule owner(buf, [](void* p) { std::free(p); });
  py::list dl, sl;
  py::object rd, rs, rlen;
  auto wrap = [&](auto tag) {
    using I = decltype(tag);
    I* base = static_cast<I*>(buf);
    auto view = [&](int64_t offset, int64_t len) {
      return py::array_t<I>({len}, {static_cast<int64_t>(sizeof(I))}, base + offset, owner);
    };
    for (int k = 0; k <= K; ++k) {
      py::array_t<I> d = view(off[k], total[k]), s = view(off[k] + (off[k + 1] - off[k]) / 2, total[k]);
      if (k < K) {
        dl.append(d);
        sl.append(s);
      } else {
        rd = d;
        rs = s;
      }
    }
    rlen = view(off[K + 1], total[K]);
  };
  if (narrow) wrap(int32_t{}); else wrap(int64_t{});
  int64_t dt = 0, dp = 0, sm = 0, ne = 0;
  for (int t = 0; t < nt; ++t) { dt += dtok[t]; dp += dpieces[t]; sm += sum[t]; ne += empty[t]; }
  return py::make_tuple(dl, sl, rd, rs, rlen, dt, dp, sm, ne);
}
