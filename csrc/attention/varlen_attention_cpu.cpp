// Varlen document-masked attention on the CPU (FA2-style, fp32 accumulation, OpenMP).
//
// Work units: forward and dq are (document, head, q-tile of BQ rows); dk/dv are (document, kv head, key tile of BK
// keys), which loop over the query heads of their GQA group and over the q tiles that can see them. Each unit owns
// its output rows, so there are no atomics and results do not depend on the schedule (the backward is always
// deterministic). Units are sorted by cost (visible keys x rows) and handed out dynamically, so one long document
// does not leave threads idle while many short ones finish.
//
// Tiles are converted to fp32 in per-thread scratch (row-major (rows, Dp) or transposed (Dp, 64), Dp = D rounded
// up to 16). The two micro-kernels below use GCC/Clang vector extensions (16 floats: one AVX-512 register, two
// AVX2 ones) with 4 rows x up to 4 vectors of accumulators held in registers.
#include "attention/varlen_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/half.h"

namespace lf {
namespace attn {
namespace {

constexpr int BQ = 64;  // query rows per tile
constexpr int BK = 64;  // keys per tile
constexpr int VW = 16;  // floats per vector
constexpr int LDT = 64; // leading dimension of transposed tiles and score tiles (>= BQ, BK)
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

inline vf vload(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf splat(float a) { return vf{} + a; }

// exp(x) for a vector (Cephes expf polynomial, ~1 ulp); x <= -87 (including -inf) gives exactly 0, NaN gives NaN
// (a NaN score must reach its row's output, not vanish as a zero weight).
inline vf vexp(vf x) {
  const vf x0 = x;
  const vi keep = x > splat(-87.0f);
  x = x < splat(88.0f) ? x : splat(88.0f);
  x = x > splat(-87.5f) ? x : splat(-87.5f);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &e, sizeof pow2);
  y = y * pow2;
  vi bits;
  std::memcpy(&bits, &y, sizeof bits);
  bits &= keep;
  std::memcpy(&y, &bits, sizeof y);
  return x0 == x0 ? y : x0;
}

// C[r][c] = sum_{d<D} A[r][d] * Bt[d][c] for r < R (R % 4 == 0), c < VW * NV.
template <int NV>
void mm_nt(const float* A, int lda, const float* Bt, float* C, int R, int D) {
  for (int r = 0; r < R; r += 4) {
    vf acc[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    const float* a = A + static_cast<int64_t>(r) * lda;
    for (int d = 0; d < D; ++d) {
      vf b[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(Bt + d * LDT + VW * v);
      for (int i = 0; i < 4; ++i) {
        const float s = a[i * lda + d];
        for (int v = 0; v < NV; ++v) acc[i][v] += s * b[v];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) vstore(C + (r + i) * LDT + VW * v, acc[i][v]);
  }
}

// dP - delta without cancellation: C[r][c] = sum_d A[r][d] * Bt[d][c] - delta, with delta = rowsum(dO * O) folded in
// per element as a difference of values (dP_ij - delta_i = sum_d dO_id (V_jd - O_id)). Computing dP and delta
// separately leaves fp32 rounding of |dO||V| in every dS, even where the true dS is 0 (one visible key).
// SUB_ROWS: subtract O[r][d] (rows of A's side; pass 2: A = dO, Bt = V^T, O (R, lda)).
// otherwise: subtract Ot[d][c] from A (pass 1: A = V, Bt = dO^T, Ot = O^T (D, LDT)).
template <int NV, bool SUB_ROWS>
void mm_nt_dpdelta(const float* A, int lda, const float* Bt, const float* O, float* C, int R, int D) {
  for (int r = 0; r < R; r += 4) {
    vf acc[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    const float* a = A + static_cast<int64_t>(r) * lda;
    const float* o = O + static_cast<int64_t>(r) * lda;
    for (int d = 0; d < D; ++d) {
      vf b[NV], ot[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(Bt + d * LDT + VW * v);
      if (!SUB_ROWS)
        for (int v = 0; v < NV; ++v) ot[v] = vload(O + d * LDT + VW * v);
      for (int i = 0; i < 4; ++i) {
        const float s = a[i * lda + d];
        if (SUB_ROWS) {
          const vf os = splat(o[i * lda + d]);
          for (int v = 0; v < NV; ++v) acc[i][v] += s * (b[v] - os);
        } else {
          for (int v = 0; v < NV; ++v) acc[i][v] += (splat(s) - ot[v]) * b[v];
        }
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) vstore(C + (r + i) * LDT + VW * v, acc[i][v]);
  }
}

template <bool SUB_ROWS>
void mm_nt_dpdelta_cols(int ncols, const float* A, int lda, const float* Bt, const float* O, float* C, int R, int D) {
  switch ((ncols + VW - 1) / VW) {
    case 1: mm_nt_dpdelta<1, SUB_ROWS>(A, lda, Bt, O, C, R, D); break;
    case 2: mm_nt_dpdelta<2, SUB_ROWS>(A, lda, Bt, O, C, R, D); break;
    case 3: mm_nt_dpdelta<3, SUB_ROWS>(A, lda, Bt, O, C, R, D); break;
    default: mm_nt_dpdelta<4, SUB_ROWS>(A, lda, Bt, O, C, R, D); break;
  }
}

void mm_nt_cols(int ncols, const float* A, int lda, const float* Bt, float* C, int R, int D) {
  switch ((ncols + VW - 1) / VW) {
    case 1: mm_nt<1>(A, lda, Bt, C, R, D); break;
    case 2: mm_nt<2>(A, lda, Bt, C, R, D); break;
    case 3: mm_nt<3>(A, lda, Bt, C, R, D); break;
    default: mm_nt<4>(A, lda, Bt, C, R, D); break;
  }
}

// O[r][d0 + c] += sum_{j<J} PT[j][r] * V[j][d0 + c] for r < R (R % 4 == 0), c < VW * NV. P arrives transposed
// (J, LDT), so the 4 scalars broadcast per step are adjacent.
template <int NV>
void mm_tn_acc_block(const float* PT, const float* V, int ldv, float* O, int ldo, int R, int J, int d0) {
  for (int r = 0; r < R; r += 4) {
    vf acc[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = vload(O + (r + i) * ldo + d0 + VW * v);
    for (int j = 0; j < J; ++j) {
      vf b[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(V + j * ldv + d0 + VW * v);
      for (int i = 0; i < 4; ++i) {
        const float s = PT[j * LDT + r + i];
        for (int v = 0; v < NV; ++v) acc[i][v] += s * b[v];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) vstore(O + (r + i) * ldo + d0 + VW * v, acc[i][v]);
  }
}

// O (R, Dp) += PT^T @ V with PT (J, R; leading dim LDT), V (J, Dp).
void mm_tn_acc(const float* PT, const float* V, float* O, int Dp, int R, int J) {
  for (int d0 = 0; d0 < Dp; d0 += 4 * VW) {
    switch (std::min(4, (Dp - d0) / VW)) {
      case 1: mm_tn_acc_block<1>(PT, V, Dp, O, Dp, R, J, d0); break;
      case 2: mm_tn_acc_block<2>(PT, V, Dp, O, Dp, R, J, d0); break;
      case 3: mm_tn_acc_block<3>(PT, V, Dp, O, Dp, R, J, d0); break;
      default: mm_tn_acc_block<4>(PT, V, Dp, O, Dp, R, J, d0); break;
    }
  }
}

inline int round4(int n) { return (n + 3) & ~3; }

inline bool all_finite(const float* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

// ---- element access in any of the three dtypes ----------------------------------------------------------------

inline float load1(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case kBFloat16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// dst[c * dst_stride] = mul * src[off + c * s2] for c < n.
inline void load_vec(const void* base, int dtype, int64_t off, int64_t s2, int n, float mul, float* dst,
                     int dst_stride) {
  switch (dtype) {
    case kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int c = 0; c < n; ++c) dst[c * dst_stride] = mul * f16_to_f32(p[c * s2]);
      break;
    }
    case kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int c = 0; c < n; ++c) dst[c * dst_stride] = mul * bf16_to_f32(p[c * s2]);
      break;
    }
    default: {
      const float* p = static_cast<const float*>(base) + off;
      for (int c = 0; c < n; ++c) dst[c * dst_stride] = mul * p[c * s2];
    }
  }
}

// base[off + c] = mul * src[c] for c < n (outputs are contiguous).
inline void store_vec(void* base, int dtype, int64_t off, int n, float mul, const float* src) {
  switch (dtype) {
    case kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + off;
      for (int c = 0; c < n; ++c) p[c] = f32_to_f16(mul * src[c]);
      break;
    }
    case kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + off;
      for (int c = 0; c < n; ++c) p[c] = f32_to_bf16(mul * src[c]);
      break;
    }
    default: {
      float* p = static_cast<float*>(base) + off;
      for (int c = 0; c < n; ++c) p[c] = mul * src[c];
    }
  }
}

inline int64_t esize(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Rows [r0, rows) of a contiguous (rows, width) output set to zero (0 bits is 0.0 in every dtype).
void zero_rows(void* base, int dtype, int64_t r0, int64_t rows, int64_t width) {
  if (rows > r0)
    std::memset(static_cast<char*>(base) + r0 * width * esize(dtype), 0, (rows - r0) * width * esize(dtype));
}

// ---- documents and masks ---------------------------------------------------------------------------------------

struct Doc {
  int64_t q0, k0, sq, sk;
  // query i (0-based in the doc) sees keys lo(i) <= j <= hi(i) (clamped to [0, sk - 1]; empty when lo > hi)
  int64_t off, left, right;
  int64_t lo(int64_t i) const { return left >= 0 ? std::max<int64_t>(0, i + off - left) : 0; }
  int64_t hi(int64_t i) const { return right >= 0 ? std::min<int64_t>(sk - 1, i + off + right) : sk - 1; }
  bool visible(int64_t i, int64_t j) const {
    return (left < 0 || j >= i + off - left) && (right < 0 || j <= i + off + right);
  }
  // rows that see at least one key of [j0, j1]: [first_row(j0), last_row(j1)] clamped to [0, sq - 1]
  int64_t first_row(int64_t j0) const { return right >= 0 ? std::max<int64_t>(0, j0 - off - right) : 0; }
  int64_t last_row(int64_t j1) const { return left >= 0 ? std::min<int64_t>(sq - 1, j1 - off + left) : sq - 1; }
};

std::vector<Doc> make_docs(const Problem& p) {
  std::vector<Doc> docs(p.B);
  LF_CHECK(p.cu_q[0] == 0 && p.cu_k[0] == 0, "cu_seqlens must start at 0");
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t q0 = p.cu_q[b], q1 = p.cu_q[b + 1], k0 = p.cu_k[b], k1 = p.cu_k[b + 1];
    LF_CHECK(q1 >= q0 && k1 >= k0, "cu_seqlens must be non-decreasing (document " << b << ")");
    LF_CHECK(q1 <= p.Tq && k1 <= p.Tk, "cu_seqlens end beyond the token count (document " << b << ")");
    docs[b] = Doc{q0, k0, q1 - q0, k1 - k0, (k1 - k0) - (q1 - q0), p.left, p.right};
  }
  return docs;
}

struct Unit {
  int64_t cost;
  int32_t doc, head, tile;
};

// Sort by cost, largest first (ties by position, so the order is reproducible).
void sort_units(std::vector<Unit>& u) {
  std::stable_sort(u.begin(), u.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
}

// Forward and dq units: one per (doc, head, q tile); cost = visible key span of the tile times its rows.
std::vector<Unit> q_units(const std::vector<Doc>& docs, int64_t H) {
  std::vector<Unit> u;
  for (size_t b = 0; b < docs.size(); ++b) {
    const Doc& d = docs[b];
    for (int64_t t = 0; t * BQ < d.sq; ++t) {
      const int64_t i0 = t * BQ, nq = std::min<int64_t>(BQ, d.sq - i0);
      const int64_t span = std::max<int64_t>(0, d.hi(i0 + nq - 1) - d.lo(i0) + 1);
      for (int64_t h = 0; h < H; ++h)
        u.push_back(Unit{(span + 8) * nq, static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(t)});
    }
  }
  sort_units(u);
  return u;
}

// dk/dv units: one per (doc, kv head, key tile); cost = visible query span times keys times the group size.
std::vector<Unit> k_units(const std::vector<Doc>& docs, int64_t Hkv, int64_t group) {
  std::vector<Unit> u;
  for (size_t b = 0; b < docs.size(); ++b) {
    const Doc& d = docs[b];
    for (int64_t t = 0; t * BK < d.sk; ++t) {
      const int64_t j0 = t * BK, nk = std::min<int64_t>(BK, d.sk - j0);
      const int64_t span = std::max<int64_t>(0, d.last_row(j0 + nk - 1) - d.first_row(j0) + 1);
      for (int64_t h = 0; h < Hkv; ++h)
        u.push_back(Unit{(span * group + 8) * nk, static_cast<int32_t>(b), static_cast<int32_t>(h),
                         static_cast<int32_t>(t)});
    }
  }
  sort_units(u);
  return u;
}

// A strided (T, H, D) input.
struct In {
  const void* ptr;
  Strides3 s;
  int64_t off(int64_t t, int64_t h) const { return t * s.s0 + h * s.s1; }
};

// Rows [t0, t0 + n) of head h into dst (rows, Dp) row-major, times mul; rows n..round4(n) zeroed.
void load_rows(const In& x, int dtype, int64_t t0, int64_t h, int n, int D, int Dp, float mul, float* dst) {
  for (int r = 0; r < n; ++r) load_vec(x.ptr, dtype, x.off(t0 + r, h), x.s.s2, D, mul, dst + r * Dp, 1);
  std::fill(dst + static_cast<int64_t>(n) * Dp, dst + static_cast<int64_t>(round4(n)) * Dp, 0.0f);
}

// dst (Dp, LDT) = src^T for src (n, Dp) row-major; columns n..round16(n) zeroed (rows D..Dp stay zero).
void transpose(const float* src, int n, int D, int Dp, float* dst) {
  const int n16 = (n + VW - 1) / VW * VW;
  for (int d = 0; d < D; ++d) {
    float* out = dst + d * LDT;
    for (int c = 0; c < n; ++c) out[c] = src[c * Dp + d];
    for (int c = n; c < n16; ++c) out[c] = 0.0f;
  }
}

struct Scratch {
  std::vector<float> buf;
  float* take(size_t n) {
    float* p = buf.data() + used;
    used += (n + 15) & ~size_t(15);
    return p;
  }
  size_t used = 0;
  explicit Scratch(size_t n) : buf(n + 64 * 16, 0.0f) {}
};

inline void softcap_row(float* s, int n, float cap, float* t) {
  for (int c = 0; c < n; ++c) {
    const float th = std::tanh(s[c] / cap);
    t[c] = th;
    s[c] = cap * th;
  }
}

// O (R, Dp) += PT^T B, PT (J, LDT), B (J, Dp), summed over the pairs that vis(c, j) allows (c: row of O, j: the
// contraction index), for tiles that straddle the mask. PT is 0 outside the mask, but a matmul would still carry
// 0 * NaN (or 0 * inf) from a non-finite B[j] into rows that cannot see j. Finite values take the matmul
// (non-finite entries of B are zeroed in place: callers do not reuse B), the non-finite ones are added per
// visible pair. Callers take this path only when B has a non-finite value (all_finite), so the usual cost is one
// scan of the tile.
template <class Vis>
void accumulate_confined(Vis vis, int R, int J, int Dp, const float* PT, float* B, float* O) {
  std::vector<float> bad(B, B + static_cast<size_t>(J) * Dp);
  for (size_t i = 0; i < bad.size(); ++i) {
    if (std::isfinite(B[i])) bad[i] = 0.0f;
    else B[i] = 0.0f;
  }
  mm_tn_acc(PT, B, O, Dp, round4(R), J);
  for (int j = 0; j < J; ++j) {
    const float* b = bad.data() + static_cast<int64_t>(j) * Dp;
    if (all_finite(b, Dp)) continue;
    for (int c = 0; c < R; ++c)
      if (vis(c, j))
        for (int e = 0; e < Dp; ++e)
          if (!std::isfinite(b[e])) O[c * Dp + e] += PT[j * LDT + c] * b[e];
  }
}

}  // namespace

// ================================================================================================= forward
// Per (doc, head, q tile): S^T = K Q^T per key tile (keys as rows, queries as columns), so the online softmax runs
// down the columns with the row statistics m, l held as vectors over the queries, and Q^T is built once per unit.

void forward(const Problem& p, const void* q, Strides3 sq, const void* k, Strides3 sk, const void* v, Strides3 sv,
             void* out, float* lse) {
  const std::vector<Doc> docs = make_docs(p);
  const int D = static_cast<int>(p.D), Dp = (D + VW - 1) / VW * VW;
  const int64_t H = p.H, group = p.H / p.Hkv, Tq = p.Tq;
  const std::vector<Unit> units = q_units(docs, H);
  const In Q{q, sq}, K{k, sk}, V{v, sv};
  const float cap = p.softcap;

  // Tail tokens past cu_q[B]: output 0, lse +inf.
  const int64_t end_q = p.B > 0 ? p.cu_q[p.B] : 0;
  zero_rows(out, p.dtype, end_q, Tq, H * D);
  for (int64_t h = 0; h < H; ++h) std::fill(lse + h * Tq + end_q, lse + (h + 1) * Tq, kInf);

#pragma omp parallel
  {
    Scratch sc(static_cast<size_t>(BQ) * Dp * 2 + static_cast<size_t>(BK) * Dp * 2 + Dp * LDT + BK * LDT * 2 +
               5 * LDT);
    float* Qr = sc.take(BQ * Dp);   // (BQ, Dp) q * scale
    float* O = sc.take(BQ * Dp);    // (BQ, Dp) accumulator
    float* Kr = sc.take(BK * Dp);   // (BK, Dp) keys
    float* Vr = sc.take(BK * Dp);   // (BK, Dp) values
    float* Qt = sc.take(Dp * LDT);  // (Dp, BQ) q * scale, transposed
    float* ST = sc.take(BK * LDT);  // (BK, BQ) scores, then probabilities
    float* T = sc.take(BK * LDT);   // (BK, BQ) tanh(s / cap) scratch
    float* m = sc.take(LDT);        // (BQ,) running max
    float* l = sc.take(LDT);        // (BQ,) running sum
    float* base = sc.take(LDT);
    float* alpha = sc.take(LDT);
    float* mx = sc.take(LDT);

#pragma omp for schedule(dynamic, 1)
    for (size_t ui = 0; ui < units.size(); ++ui) {
      const Unit& u = units[ui];
      const Doc& d = docs[u.doc];
      const int64_t h = u.head, hk = h / group, i0 = static_cast<int64_t>(u.tile) * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, d.sq - i0)), R = round4(nq), nqv = (nq + VW - 1) / VW;
      load_rows(Q, p.dtype, d.q0 + i0, h, nq, D, Dp, p.scale, Qr);
      transpose(Qr, nq, D, Dp, Qt);
      std::fill(O, O + static_cast<int64_t>(R) * Dp, 0.0f);
      std::fill(m, m + LDT, -kInf);
      std::fill(l, l + LDT, 0.0f);
      const int64_t kmin = d.lo(i0), kmax = d.hi(i0 + nq - 1);
      for (int64_t j0 = kmin / BK * BK; kmin <= kmax && j0 <= kmax; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, d.sk - j0));
        load_rows(K, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Kr);
        load_rows(V, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Vr);
        mm_nt_cols(nq, Kr, Dp, Qt, ST, round4(nk), D);
        const bool full = d.lo(i0 + nq - 1) <= j0 && d.hi(i0) >= j0 + nk - 1;
        for (int r = 0; r < nk; ++r) {
          float* s = ST + r * LDT;
          if (cap > 0) softcap_row(s, nq, cap, T + r * LDT);
          if (!full)
            for (int c = 0; c < nq; ++c)
              if (!d.visible(i0 + c, j0 + r)) s[c] = -kInf;
        }
        for (int c = 0; c < nqv * VW; c += VW) {
          vf cmax = vload(ST + c);
          for (int r = 1; r < nk; ++r) {
            const vf x = vload(ST + r * LDT + c);
            cmax = x > cmax ? x : cmax;
          }
          const vf mo = vload(m + c);
          const vf mn = cmax > mo ? cmax : mo;
          const vf b = mn == splat(-kInf) ? splat(0.0f) : mn;  // all masked so far: exp(-inf - 0) = 0
          vstore(m + c, mn);
          vstore(base + c, b);
          vstore(alpha + c, vexp(mo - b));
          vstore(mx + c, vf{});
        }
        for (int r = 0; r < nk; ++r) {
          float* s = ST + r * LDT;
          for (int c = 0; c < nqv * VW; c += VW) {
            const vf e = vexp(vload(s + c) - vload(base + c));
            vstore(s + c, e);
            vstore(mx + c, vload(mx + c) + e);
          }
        }
        for (int c = 0; c < nqv * VW; c += VW) vstore(l + c, vload(l + c) * vload(alpha + c) + vload(mx + c));
        for (int c = 0; c < nq; ++c)
          if (alpha[c] != 1.0f)
            for (int e = 0; e < Dp; ++e) O[c * Dp + e] *= alpha[c];
        if (full || all_finite(Vr, static_cast<int64_t>(nk) * Dp)) {
          mm_tn_acc(ST, Vr, O, Dp, R, nk);
        } else {
          // A tile that straddles the mask with a non-finite value: the matmul would carry 0 * NaN from a masked
          // key into rows that cannot see it. Finite values take the matmul; non-finite ones only visible rows.
          accumulate_confined([&](int c, int r) { return d.visible(i0 + c, j0 + r); }, nq, nk, Dp, ST, Vr, O);
        }
      }
      for (int r = 0; r < nq; ++r) {
        const int64_t t = d.q0 + i0 + r;
        const bool any = l[r] != 0.0f;  // NaN: the row saw a NaN, which must reach out and lse
        store_vec(out, p.dtype, (t * H + h) * D, D, any ? 1.0f / l[r] : 0.0f, O + r * Dp);
        lse[h * Tq + t] = any ? m[r] + std::log(l[r]) : kInf;
      }
    }
  }
}

// ================================================================================================ backward
// Pass 1, per (doc, head, q tile): dq = scale * sum_j dS K, with S^T and (dP - delta)^T built
// against Q^T and dO^T (transposed once per unit). Pass 2, per (doc, kv head, key tile): dk, dv summed over the
// group's query heads and the visible q tiles, with S and dP built against K^T and V^T (transposed once per unit).
// With softcap, s = cap * tanh(s_raw / cap) and dS_raw = dS * (1 - tanh^2).

void backward(const Problem& p, const void* dout, Strides3 sdo, const void* q, Strides3 sq, const void* k,
              Strides3 sk, const void* v, Strides3 sv, const void* out, Strides3 so, const float* lse,
              void* dq, void* dk, void* dv) {
  const std::vector<Doc> docs = make_docs(p);
  const int D = static_cast<int>(p.D), Dp = (D + VW - 1) / VW * VW;
  const int64_t H = p.H, Hkv = p.Hkv, group = p.H / p.Hkv, Tq = p.Tq;
  const In Q{q, sq}, K{k, sk}, V{v, sv}, dO{dout, sdo}, Out{out, so};
  const float cap = p.softcap;

  zero_rows(dq, p.dtype, p.B > 0 ? p.cu_q[p.B] : 0, Tq, H * D);
  zero_rows(dk, p.dtype, p.B > 0 ? p.cu_k[p.B] : 0, p.Tk, Hkv * D);
  zero_rows(dv, p.dtype, p.B > 0 ? p.cu_k[p.B] : 0, p.Tk, Hkv * D);

  // ---- pass 1: dq
  const std::vector<Unit> qu = q_units(docs, H);
#pragma omp parallel
  {
    Scratch sc(static_cast<size_t>(BQ) * Dp * 4 + static_cast<size_t>(BK) * Dp * 2 + 3 * Dp * LDT + BK * LDT * 3 + LDT);
    float* Qr = sc.take(BQ * Dp);    // (BQ, Dp) q * scale
    float* dOr = sc.take(BQ * Dp);   // (BQ, Dp) dout
    float* dQ = sc.take(BQ * Dp);    // (BQ, Dp) accumulator
    float* Kr = sc.take(BK * Dp);    // (BK, Dp) keys
    float* Vr = sc.take(BK * Dp);    // (BK, Dp) values
    float* Qt = sc.take(Dp * LDT);   // (Dp, BQ) q * scale, transposed
    float* dOt = sc.take(Dp * LDT);  // (Dp, BQ) dout, transposed
    float* ST = sc.take(BK * LDT);   // (BK, BQ) S^T -> dS^T
    float* dPT = sc.take(BK * LDT);  // (BK, BQ) (dP - delta)^T
    float* T = sc.take(BK * LDT);    // (BK, BQ) tanh(s / cap)
    float* L = sc.take(LDT);         // (BQ,) lse
    float* Or = sc.take(BQ * Dp);    // (BQ, Dp) out
    float* Ot = sc.take(Dp * LDT);   // (Dp, BQ) out, transposed

#pragma omp for schedule(dynamic, 1)
    for (size_t ui = 0; ui < qu.size(); ++ui) {
      const Unit& u = qu[ui];
      const Doc& d = docs[u.doc];
      const int64_t h = u.head, hk = h / group, i0 = static_cast<int64_t>(u.tile) * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, d.sq - i0)), R = round4(nq);
      load_rows(Q, p.dtype, d.q0 + i0, h, nq, D, Dp, p.scale, Qr);
      load_rows(dO, p.dtype, d.q0 + i0, h, nq, D, Dp, 1.0f, dOr);
      transpose(Qr, nq, D, Dp, Qt);
      transpose(dOr, nq, D, Dp, dOt);
      std::fill(dQ, dQ + static_cast<int64_t>(R) * Dp, 0.0f);
      std::fill(L, L + LDT, kInf);
      load_rows(Out, p.dtype, d.q0 + i0, h, nq, D, Dp, 1.0f, Or);
      transpose(Or, nq, D, Dp, Ot);
      for (int r = 0; r < nq; ++r) L[r] = lse[h * Tq + d.q0 + i0 + r];
      const int64_t kmin = d.lo(i0), kmax = d.hi(i0 + nq - 1);
      for (int64_t j0 = kmin / BK * BK; kmin <= kmax && j0 <= kmax; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, d.sk - j0));
        load_rows(K, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Kr);
        load_rows(V, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Vr);
        mm_nt_cols(nq, Kr, Dp, Qt, ST, round4(nk), D);
        mm_nt_dpdelta_cols<false>(nq, Vr, Dp, dOt, Ot, dPT, round4(nk), D);
        const bool full = d.lo(i0 + nq - 1) <= j0 && d.hi(i0) >= j0 + nk - 1;
        for (int r = 0; r < nk; ++r) {
          float* s = ST + r * LDT;
          float* t = T + r * LDT;
          if (cap > 0) softcap_row(s, nq, cap, t);
          if (!full)
            for (int c = 0; c < nq; ++c)
              if (!d.visible(i0 + c, j0 + r)) s[c] = -kInf;
          for (int c = 0; c < nq; c += VW) {
            const vf pr = vexp(vload(s + c) - vload(L + c));  // lse = +inf (empty row) -> 0
            vf ds = pr * vload(dPT + r * LDT + c);
            if (cap > 0) {
              const vf th = vload(t + c);
              ds = ds * (splat(1.0f) - th * th);
            }
            vstore(s + c, ds);
          }
          if (!full)  // masked pairs: dS = 0 exactly (pr * dP would be 0 * NaN for a NaN row or value)
            for (int c = 0; c < nq; ++c)
              if (!d.visible(i0 + c, j0 + r)) s[c] = 0.0f;
        }
        if (full || all_finite(Kr, static_cast<int64_t>(nk) * Dp))
          mm_tn_acc(ST, Kr, dQ, Dp, R, nk);
        else
          accumulate_confined([&](int c, int r) { return d.visible(i0 + c, j0 + r); }, nq, nk, Dp, ST, Kr, dQ);
      }
      for (int r = 0; r < nq; ++r) store_vec(dq, p.dtype, ((d.q0 + i0 + r) * H + h) * D, D, p.scale, dQ + r * Dp);
    }
  }

  // ---- pass 2: dk and dv
  const std::vector<Unit> ku = k_units(docs, Hkv, group);
#pragma omp parallel
  {
    Scratch sc(static_cast<size_t>(BK) * Dp * 4 + static_cast<size_t>(BQ) * Dp * 3 + 2 * Dp * LDT + BQ * LDT * 3);
    float* Kr = sc.take(BK * Dp);    // (BK, Dp) keys
    float* Vr = sc.take(BK * Dp);    // (BK, Dp) values
    float* dK = sc.take(BK * Dp);    // (BK, Dp) accumulator
    float* dV = sc.take(BK * Dp);    // (BK, Dp) accumulator
    float* Qr = sc.take(BQ * Dp);    // (BQ, Dp) q * scale
    float* dOr = sc.take(BQ * Dp);   // (BQ, Dp) dout
    float* Or = sc.take(BQ * Dp);    // (BQ, Dp) out
    float* Kt = sc.take(Dp * LDT);   // (Dp, BK) keys, transposed
    float* Vt = sc.take(Dp * LDT);   // (Dp, BK) values, transposed
    float* S = sc.take(BQ * LDT);    // (BQ, BK) S -> P
    float* dP = sc.take(BQ * LDT);   // (BQ, BK) dP - delta -> dS
    float* T = sc.take(BQ * LDT);    // (BQ, BK) tanh(s / cap)

#pragma omp for schedule(dynamic, 1)
    for (size_t ui = 0; ui < ku.size(); ++ui) {
      const Unit& u = ku[ui];
      const Doc& d = docs[u.doc];
      const int64_t hk = u.head, j0 = static_cast<int64_t>(u.tile) * BK;
      const int nk = static_cast<int>(std::min<int64_t>(BK, d.sk - j0)), R = round4(nk);
      load_rows(K, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Kr);
      load_rows(V, p.dtype, d.k0 + j0, hk, nk, D, Dp, 1.0f, Vr);
      transpose(Kr, nk, D, Dp, Kt);
      transpose(Vr, nk, D, Dp, Vt);
      std::fill(dK, dK + static_cast<int64_t>(R) * Dp, 0.0f);
      std::fill(dV, dV + static_cast<int64_t>(R) * Dp, 0.0f);
      const int64_t imin = d.first_row(j0), imax = d.last_row(j0 + nk - 1);
      for (int64_t g = 0; g < group && imin <= imax; ++g) {
        const int64_t h = hk * group + g;
        for (int64_t i0 = imin / BQ * BQ; i0 <= imax; i0 += BQ) {
          const int nq = static_cast<int>(std::min<int64_t>(BQ, d.sq - i0));
          load_rows(Q, p.dtype, d.q0 + i0, h, nq, D, Dp, p.scale, Qr);
          load_rows(dO, p.dtype, d.q0 + i0, h, nq, D, Dp, 1.0f, dOr);
          load_rows(Out, p.dtype, d.q0 + i0, h, nq, D, Dp, 1.0f, Or);
          mm_nt_cols(nk, Qr, Dp, Kt, S, round4(nq), D);
          mm_nt_dpdelta_cols<true>(nk, dOr, Dp, Vt, Or, dP, round4(nq), D);
          const bool full = d.lo(i0 + nq - 1) <= j0 && d.hi(i0) >= j0 + nk - 1;
          for (int r = 0; r < nq; ++r) {
            const int64_t t = d.q0 + i0 + r;
            const float Lr = lse[h * Tq + t];
            float* s = S + r * LDT;
            float* tt = T + r * LDT;
            if (cap > 0) softcap_row(s, nk, cap, tt);
            if (!full)
              for (int c = 0; c < nk; ++c)
                if (!d.visible(i0 + r, j0 + c)) s[c] = -kInf;
            for (int c = 0; c < nk; c += VW) {
              const vf pr = vexp(vload(s + c) - splat(Lr));
              vf ds = pr * vload(dP + r * LDT + c);
              if (cap > 0) {
                const vf th = vload(tt + c);
                ds = ds * (splat(1.0f) - th * th);
              }
              vstore(s + c, pr);
              vstore(dP + r * LDT + c, ds);
            }
            if (!full)  // masked pairs: P = dS = 0 exactly (a NaN row's lse would make them NaN)
              for (int c = 0; c < nk; ++c)
                if (!d.visible(i0 + r, j0 + c)) s[c] = dP[r * LDT + c] = 0.0f;
          }
          const auto vis_t = [&](int c, int r) { return d.visible(i0 + r, j0 + c); };  // c: key, r: query
          if (full || all_finite(dOr, static_cast<int64_t>(nq) * Dp))
            mm_tn_acc(S, dOr, dV, Dp, R, nq);
          else
            accumulate_confined(vis_t, nk, nq, Dp, S, dOr, dV);
          if (full || all_finite(Qr, static_cast<int64_t>(nq) * Dp))
            mm_tn_acc(dP, Qr, dK, Dp, R, nq);
          else
            accumulate_confined(vis_t, nk, nq, Dp, dP, Qr, dK);
        }
      }
      for (int r = 0; r < nk; ++r) {
        const int64_t off = ((d.k0 + j0 + r) * Hkv + hk) * D;
        store_vec(dk, p.dtype, off, D, 1.0f, dK + r * Dp);
        store_vec(dv, p.dtype, off, D, 1.0f, dV + r * Dp);
      }
    }
  }
}

}  // namespace attn
}  // namespace lf
