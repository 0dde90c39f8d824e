// The per-still KB target's two passes over one device's rows, as XLA FFI handlers for CPU.
//
// Same arithmetic as jaxscale/target/sharding.py `_local_value_and_grad` (docs/serial.md):
//   g_i = k_e exp(B_e s_i), s_i = 1/(2 d_i^2), rows in chunks of `chunk` rows of one still e.
//   pass 1: sums[h] += (w g I, w g^2) over the rows of group h.
//   pass 2: r = I - g I_h, value = sum w r^2,
//           grad[e] += (sum -2 w r I_h exp(B s), sum -2 w r I_h g s) over the rows of still e.
// One exp per row per pass, vectorised over the rows of a few chunks (with AVX-512 a
// table-driven exp in intrinsics, else `#pragma omp simd` over exp_of, inline). The value and
// gradient are summed per still in the data type, then in double; the group sums in the data
// type, like the XLA path.
#include <unistd.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <system_error>
#include <optional>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(v) for |v| < 708 (float: < 87) to ~1 ulp, written so that `#pragma omp simd` loops
// vectorise it inline (glibc's vector exp, libmvec, through its call was slower here):
// v = n ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part ln2), exp(r) by its Taylor series to
// r^13 (float: r^7; truncation < 0.1 ulp), times 2^n added into the exponent bits. n is
// rounded by the 1.5 * 2^52 shift, whose low mantissa bits then hold n (no float-int
// conversion). Below -708 (-87) it returns 0 (exp(-708) = 3e-308), above 709 (88) inf; NaN stays NaN.
inline double exp_of(double v) {
  const double shifter = 0x1.8p52;
  const double clamped = v < -708.0 ? -708.0 : (v > 709.0 ? 709.0 : v);
  const double shifted = __builtin_fma(clamped, 1.4426950408889634, shifter);
  const double n = shifted - shifter;
  double r = __builtin_fma(-n, 6.93147180369123816490e-01, clamped);
  r = __builtin_fma(-n, 1.90821492927058770002e-10, r);
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = __builtin_fma(p, r, 1.0 / 479001600.0);
  p = __builtin_fma(p, r, 1.0 / 39916800.0);
  p = __builtin_fma(p, r, 1.0 / 3628800.0);
  p = __builtin_fma(p, r, 1.0 / 362880.0);
  p = __builtin_fma(p, r, 1.0 / 40320.0);
  p = __builtin_fma(p, r, 1.0 / 5040.0);
  p = __builtin_fma(p, r, 1.0 / 720.0);
  p = __builtin_fma(p, r, 1.0 / 120.0);
  p = __builtin_fma(p, r, 1.0 / 24.0);
  p = __builtin_fma(p, r, 1.0 / 6.0);
  p = __builtin_fma(p, r, 0.5);
  p = __builtin_fma(p, r, 1.0);
  p = __builtin_fma(p, r, 1.0);
  const uint64_t scaled = __builtin_bit_cast(uint64_t, p) + (__builtin_bit_cast(uint64_t, shifted) << 52);
  const double result = __builtin_bit_cast(double, scaled);
  return v < -708.0 ? 0.0 : (v > 709.0 ? __builtin_inf() : result);
}

inline float exp_of(float v) {
  const float shifter = 0x1.8p23f;
  const float clamped = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float shifted = __builtin_fmaf(clamped, 1.44269504f, shifter);
  const float n = shifted - shifter;
  float r = __builtin_fmaf(-n, 0.693145752f, clamped);  // ln2 in two parts (Cephes)
  r = __builtin_fmaf(-n, 1.42860677e-6f, r);
  float p = 1.0f / 5040.0f;
  p = __builtin_fmaf(p, r, 1.0f / 720.0f);
  p = __builtin_fmaf(p, r, 1.0f / 120.0f);
  p = __builtin_fmaf(p, r, 1.0f / 24.0f);
  p = __builtin_fmaf(p, r, 1.0f / 6.0f);
  p = __builtin_fmaf(p, r, 0.5f);
  p = __builtin_fmaf(p, r, 1.0f);
  p = __builtin_fmaf(p, r, 1.0f);
  const uint32_t scaled = __builtin_bit_cast(uint32_t, p) + (__builtin_bit_cast(uint32_t, shifted) << 23);
  const float result = __builtin_bit_cast(float, scaled);
  return v < -87.0f ? 0.0f : (v > 88.0f ? __builtin_inff() : result);
}

#if defined(__AVX512F__)
// exp of 8 doubles, table-driven (AVX-512): v = (16 n + j) ln2/16 + r with |r| <= ln2/32,
// exp(v) = 2^n 2^(j/16) exp(r). 2^(j/16) comes from a 16-entry table held in two registers
// (`vpermt2pd`: GCC emulates table gathers in `#pragma omp simd` loops with scalar loads),
// the entry's relative rounding error (a second table) added to exp(r) - 1 = r + r^2 P(r), P of
// degree 5 fitted on |r| <= 1.02 ln2/32 (error < 5e-20): within 0.54 ulp of exp (exp_of: 0.88;
// 4M random values against expl) at ~18 vector instructions instead of ~25 (0.67 against 0.90
// ns per value on Zen 4, in cache; the passes 1.64 / 1.37 against 1.89 / 1.64 ns per row).
// k = 16 n + j is rounded by the 1.5 * 2^52 shift, whose low mantissa bits then hold k: the
// table index is its low 4 bits (vpermt2pd ignores the rest), and k << 48 adds n to the
// exponent of the table entry, stored less j << 48 for that. Same special cases as exp_of.
constexpr double kTwoToTheJOver16[16] = {
    0x1.0000000000000p+0, 0x1.0b5586cf9890fp+0, 0x1.172b83c7d517bp+0, 0x1.2387a6e756238p+0,
    0x1.306fe0a31b715p+0, 0x1.3dea64c123422p+0, 0x1.4bfdad5362a27p+0, 0x1.5ab07dd485429p+0,
    0x1.6a09e667f3bcdp+0, 0x1.7a11473eb0187p+0, 0x1.8ace5422aa0dbp+0, 0x1.9c49182a3f090p+0,
    0x1.ae89f995ad3adp+0, 0x1.c199bdd85529cp+0, 0x1.d5818dcfba487p+0, 0x1.ea4afa2a490dap+0};
// (2^(j/16) - kTwoToTheJOver16[j]) / kTwoToTheJOver16[j]
alignas(64) constexpr double kTwoToTheJOver16RelativeError[16] = {
    0x0.0p+0, 0x1.79aa65d837b6dp-54, -0x1.01b15eaa59348p-55, 0x1.68efde3a8a894p-54,
    0x1.34d754db0abb6p-55, 0x1.59f48a72a4c6dp-55, 0x1.690cebb7aafb0p-56, 0x1.063e1e21c5409p-54,
    -0x1.3b3efbf5e2228p-54, -0x1.b32dcb94da51dp-56, 0x1.db72fc1f0eab4p-55, 0x1.1affc2b91ce27p-56,
    0x1.c1a7792cb3387p-55, 0x1.36eae30af0cb3p-56, 0x1.4a385a63d07a7p-56, -0x1.ff7128fd391f0p-55};
constexpr float kTwoToTheJOver16Float[16] = {
    0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
    0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
    0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};

struct ScaleTable {
  alignas(64) uint64_t bits[16];
};
// The table entries' bits less j << 48 (float: j << 19), so that adding k << 48 leaves n in the exponent.
constexpr ScaleTable scale_table() {
  ScaleTable table{};
  for (int j = 0; j < 16; ++j) table.bits[j] = __builtin_bit_cast(uint64_t, kTwoToTheJOver16[j]) - (uint64_t(j) << 48);
  return table;
}
struct ScaleTableFloat {
  alignas(64) uint32_t bits[16];
};
constexpr ScaleTableFloat scale_table_float() {
  ScaleTableFloat table{};
  for (int j = 0; j < 16; ++j) table.bits[j] = __builtin_bit_cast(uint32_t, kTwoToTheJOver16Float[j]) - (uint32_t(j) << 19);
  return table;
}
alignas(64) constexpr ScaleTable kScaleTable = scale_table();
alignas(64) constexpr ScaleTableFloat kScaleTableFloat = scale_table_float();

inline __m512d exp_by_table(__m512d v) {
  const __m512d shifter = _mm512_set1_pd(0x1.8p52);
  const __m512d shifted = _mm512_fmadd_pd(v, _mm512_set1_pd(0x1.71547652b82fep+4), shifter);  // 16 / ln2
  const __m512d k = _mm512_sub_pd(shifted, shifter);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.62e42fefa39efp-5), v);  // ln2/16 in two parts
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.abc9e3b39803fp-60), r);
  __m512d p = _mm512_set1_pd(0x1.a01b16f3b6b7dp-13);
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0x1.6c17f96a3dbd8p-10));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0x1.11111110dd150p-7));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0x1.55555554e05e3p-5));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0x1.5555555555556p-3));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0x1.0000000000001p-1));
  const __m512i index = _mm512_castpd_si512(shifted);
  const __m512d table_error = _mm512_permutex2var_pd(_mm512_load_pd(kTwoToTheJOver16RelativeError), index,
                                                     _mm512_load_pd(kTwoToTheJOver16RelativeError + 8));
  const __m512d exp_r_less_one = _mm512_add_pd(_mm512_fmadd_pd(_mm512_mul_pd(r, r), p, r), table_error);
  const __m512i entry = _mm512_permutex2var_epi64(_mm512_load_si512(kScaleTable.bits), index,
                                                  _mm512_load_si512(kScaleTable.bits + 8));
  const __m512d scale = _mm512_castsi512_pd(_mm512_add_epi64(entry, _mm512_slli_epi64(index, 48)));
  __m512d result = _mm512_fmadd_pd(scale, exp_r_less_one, scale);
  // |v| > 708 or NaN (rare: one test, then the fix-up): below -708 0, above 709 inf; NaN stays NaN.
  if (__builtin_expect(_mm512_cmp_pd_mask(_mm512_abs_pd(v), _mm512_set1_pd(708.0), _CMP_NLE_UQ) != 0, 0)) {
    result = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, _mm512_set1_pd(-708.0), _CMP_LT_OQ), result,
                                  _mm512_setzero_pd());
    result = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, _mm512_set1_pd(709.0), _CMP_GT_OQ), result,
                                  _mm512_set1_pd(__builtin_inf()));
  }
  return result;
}

// exp of 16 floats, as exp_by_table: the table in one register (`vpermps`), exp(r) - 1 =
// r + r^2 (c2 + c3 r) (error < 5e-9), no table error term (within 1.01 ulp; exp_of: 0.90).
inline __m512 exp_by_table(__m512 v) {
  const __m512 shifter = _mm512_set1_ps(0x1.8p23f);
  const __m512 shifted = _mm512_fmadd_ps(v, _mm512_set1_ps(0x1.715476p+4f), shifter);
  const __m512 k = _mm512_sub_ps(shifted, shifter);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0x1.62e430p-5f), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-0x1.05c610p-33f), r);
  const __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0x1.555666p-3f), r, _mm512_set1_ps(0x1.000156p-1f));
  const __m512 exp_r_less_one = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);
  const __m512i index = _mm512_castps_si512(shifted);
  const __m512i entry = _mm512_permutexvar_epi32(index, _mm512_load_si512(kScaleTableFloat.bits));
  const __m512 scale = _mm512_castsi512_ps(_mm512_add_epi32(entry, _mm512_slli_epi32(index, 19)));
  __m512 result = _mm512_fmadd_ps(scale, exp_r_less_one, scale);
  if (__builtin_expect(_mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(87.0f), _CMP_NLE_UQ) != 0, 0)) {
    result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), result,
                                  _mm512_setzero_ps());
    result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(88.0f), _CMP_GT_OQ), result,
                                  _mm512_set1_ps(__builtin_inff()));
  }
  return result;
}

// out[i] = exp(v[i]), i < n, by the table (the last partial vector masked).
inline void exp_by_table(const double* v, double* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(out + i, exp_by_table(_mm512_loadu_pd(v + i)));
  if (i < n) {
    const __mmask8 lanes = static_cast<__mmask8>((1u << (n - i)) - 1);
    _mm512_mask_storeu_pd(out + i, lanes, exp_by_table(_mm512_maskz_loadu_pd(lanes, v + i)));
  }
}
inline void exp_by_table(const float* v, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, exp_by_table(_mm512_loadu_ps(v + i)));
  if (i < n) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, lanes, exp_by_table(_mm512_maskz_loadu_ps(lanes, v + i)));
  }
}
#endif

// out[i] = exp(v[i]) by exp_of, the portable path.
template <typename T>
inline void exp_portable(const T* v, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_of(v[i]);
}

// out[i] = exp(v[i]), i < n: the kernel's exp (by the table where AVX-512 is there).
template <typename T>
inline void exp_rows(const T* v, T* out, int64_t n) {
#if defined(__AVX512F__)
  exp_by_table(v, out, n);
#else
  exp_portable(v, out, n);
#endif
}

// Chunks whose exp are computed in one loop: independent rows for the vector units (one
// chunk's exp alone is one latency-bound chain of dependent multiply-adds). 4 chunks measured
// fastest (ns per row, pass 1 / pass 2, 10^5 rows in cache: 1 chunk 2.0 / 1.8, 2: 2.2 / 2.2,
// 4: 1.7 / 1.6, 8: 1.7 / 1.6, 32: 1.9 / 1.7; 10^6 rows with prefetching, 8: 2.2-3.0 / 1.9-2.5).
#ifndef KB_BLOCK_CHUNKS
#define KB_BLOCK_CHUNKS 4
#endif
constexpr int64_t kBlockChunks = KB_BLOCK_CHUNKS;

#ifndef KB_PREFETCH_ROWS
#define KB_PREFETCH_ROWS 256
#endif
// Rows ahead of the current block whose cache lines are requested (software prefetch): the
// hardware prefetchers alone left the loops waiting on loads (10^6 rows, ns per row, pass 1 /
// pass 2: 3.3 / 2.6 without, 1.7 / 1.6 at 256 rows ahead, 1.8 / 1.7 at 512-2048).
constexpr int64_t kPrefetchRows = KB_PREFETCH_ROWS;

// Requests the cache lines of rows [row, row + n) of each array, kPrefetchRows ahead, into L2
// (locality 2, `prefetcht1`). One evaluation at 10^7 rows against exp_of with the L1 hint
// (locality 3; in one process, interleaved): the table-driven exp with the L1 hint 2-4 % more
// time, with this one 10-12 % less (10^5-10^6 rows: 5-10 % and 8-10 % less); exp_of with this
// one 0-5 % less; locality 0 (NTA) no gain.
constexpr int kPrefetchLocality = 2;
template <typename T>
inline void prefetch_rows(int64_t row, int64_t n, const T* a, const T* b, const T* c, const int32_t* ids) {
  const int64_t ahead = row + kPrefetchRows;
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) {
    __builtin_prefetch(a + ahead + i, 0, kPrefetchLocality);
    __builtin_prefetch(b + ahead + i, 0, kPrefetchLocality);
    __builtin_prefetch(c + ahead + i, 0, kPrefetchLocality);
  }
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(ids + ahead + i, 0, kPrefetchLocality);
}

// decay[i] = exp(B_e s_i) for the rows of chunks first_chunk .. first_chunk + n - 1.
template <typename T, int C>
inline void block_decay(const T* x, const T* s, const int32_t* chunk_experiment, int64_t first_chunk, int64_t n,
                        T* arg, T* decay) {
#if defined(__AVX512F__)
  // Whole vectors per chunk (chunks of 8 or 16 doubles, 16 floats): B s straight into the exp
  // (through the arg buffer: 2-3 % more time per pass, 10^5 rows).
  constexpr int kLanes = 64 / sizeof(T);
  if constexpr (C % kLanes == 0) {
    for (int64_t c = 0; c < n; ++c) {
      const T b = x[2 * static_cast<int64_t>(chunk_experiment[first_chunk + c]) + 1];
      const T* s_c = s + (first_chunk + c) * C;
      for (int j = 0; j < C; j += kLanes) {
        if constexpr (sizeof(T) == 8) {
          _mm512_storeu_pd(decay + c * C + j, exp_by_table(_mm512_mul_pd(_mm512_set1_pd(b), _mm512_loadu_pd(s_c + j))));
        } else {
          _mm512_storeu_ps(decay + c * C + j, exp_by_table(_mm512_mul_ps(_mm512_set1_ps(b), _mm512_loadu_ps(s_c + j))));
        }
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const T b = x[2 * static_cast<int64_t>(chunk_experiment[first_chunk + c]) + 1];
    const T* s_c = s + (first_chunk + c) * C;
#pragma omp simd
    for (int j = 0; j < C; ++j) arg[c * C + j] = b * s_c[j];
  }
  exp_rows(arg, decay, n * C);
}

// Rows are read in chunks of C rows (C known at compile time for the common sizes).
// kept_decay: where to keep exp(B s) of every row for the second pass (nullptr: not kept).
template <typename T, int C>
void group_sums(const T* x, const T* intensity, const T* weight, const T* s, const int32_t* group_id,
                const int32_t* chunk_experiment, int64_t n_chunks, T* sums, T* kept_decay) {
  alignas(64) T arg[kBlockChunks * C], block[kBlockChunks * C], wgi[kBlockChunks * C], wgg[kBlockChunks * C];
  for (int64_t first_chunk = 0; first_chunk < n_chunks; first_chunk += kBlockChunks) {
    const int64_t n = n_chunks - first_chunk < kBlockChunks ? n_chunks - first_chunk : kBlockChunks;
    if (kPrefetchRows > 0) prefetch_rows(first_chunk * C, n * C, s, intensity, weight, group_id);
    T* decay = kept_decay != nullptr ? kept_decay + first_chunk * C : block;
    block_decay<T, C>(x, s, chunk_experiment, first_chunk, n, arg, decay);
    for (int64_t c = 0; c < n; ++c) {
      const T k = x[2 * static_cast<int64_t>(chunk_experiment[first_chunk + c])];
      const int64_t row = (first_chunk + c) * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) {
        const T g = k * decay[c * C + j];
        const T wg = weight[row + j] * g;
        wgi[c * C + j] = wg * intensity[row + j];
        wgg[c * C + j] = wg * g;
      }
    }
    const int32_t* h = group_id + first_chunk * C;
    for (int64_t i = 0; i < n * C; ++i) {  // the scatter: rows may share a group
      T* sum = sums + 2 * static_cast<int64_t>(h[i]);
      sum[0] += wgi[i];
      sum[1] += wgg[i];
    }
  }
}

// The value and the gradient sums of consecutive chunks of one still are accumulated per lane
// in the data type and reduced (in double, into the total and the still's row) only when the
// still changes: one horizontal sum per still. (Lanes in double for float32 data: pass 2
// 1.9 instead of 1.6 ns per row.)
// kKept: exp(B s) of every row read from kept_decay (kept by the first pass), else computed
// here (a pointer chosen at run time instead slowed this loop by 6 %).
template <typename T, int C, bool kKept>
void value_and_grad(const T* x, const T* ih, const T* intensity, const T* weight, const T* s,
                    const int32_t* group_id, const int32_t* chunk_experiment, int64_t n_chunks,
                    const T* kept_decay, double* value_out, double* grad) {
  alignas(64) T arg[kBlockChunks * C], block[kBlockChunks * C];
  T value[C] = {}, dk[C] = {}, db[C] = {};
  double total = 0.0;
  int64_t current = n_chunks > 0 ? chunk_experiment[0] : 0;
  auto flush = [&](int64_t e) {
    double sv = 0.0, sk = 0.0, sb = 0.0;
    for (int j = 0; j < C; ++j) {
      sv += value[j];
      sk += dk[j];
      sb += db[j];
      value[j] = dk[j] = db[j] = T(0);
    }
    total += sv;
    grad[2 * e] += sk;
    grad[2 * e + 1] += sb;
  };
  for (int64_t first_chunk = 0; first_chunk < n_chunks; first_chunk += kBlockChunks) {
    const int64_t n = n_chunks - first_chunk < kBlockChunks ? n_chunks - first_chunk : kBlockChunks;
    if (kPrefetchRows > 0) prefetch_rows(first_chunk * C, n * C, s, intensity, weight, group_id);
    const T* decay = kKept ? kept_decay + first_chunk * C : block;
    if (!kKept) block_decay<T, C>(x, s, chunk_experiment, first_chunk, n, arg, block);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t e = chunk_experiment[first_chunk + c];
      if (e != current) {
        flush(current);
        current = e;
      }
      const T k = x[2 * e];
      const int64_t row = (first_chunk + c) * C;
#pragma omp simd
      for (int j = 0; j < C; ++j) {
        const T sj = s[row + j];
        const T d = decay[c * C + j];
        const T g = k * d;
        const T ih_j = ih[group_id[row + j]];
        const T r = intensity[row + j] - g * ih_j;
        const T wr = weight[row + j] * r;
        const T df_dg = T(-2) * wr * ih_j;  // the dI_h/dp term is zero at the closed-form I_h
        value[j] += wr * r;
        dk[j] += df_dg * d;
        db[j] += df_dg * g * sj;
      }
    }
  }
  if (n_chunks > 0) flush(current);
  *value_out = total;
}

// Runtime chunk size: dispatch to the compiled sizes, else a generic (scalar) loop.
template <typename T>
void group_sums_any(int64_t chunk, const T* x, const T* i, const T* w, const T* s, const int32_t* h,
                    const int32_t* ce, int64_t n_chunks, T* sums, T* kept_decay) {
  switch (chunk) {
    case 4: return group_sums<T, 4>(x, i, w, s, h, ce, n_chunks, sums, kept_decay);
    case 8: return group_sums<T, 8>(x, i, w, s, h, ce, n_chunks, sums, kept_decay);
    case 16: return group_sums<T, 16>(x, i, w, s, h, ce, n_chunks, sums, kept_decay);
    default:  // one-row "chunks" over the rows, each with its still
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = 0; j < chunk; ++j) {
          const int32_t e = ce[c];
          const int64_t r = c * chunk + j;
          group_sums<T, 1>(x, i + r, w + r, s + r, h + r, &e, 1, sums, kept_decay ? kept_decay + r : nullptr);
        }
      }
  }
}

template <typename T, bool kKept>
void value_and_grad_chunks(int64_t chunk, const T* x, const T* ih, const T* i, const T* w, const T* s,
                           const int32_t* h, const int32_t* ce, int64_t n_chunks, const T* kept_decay, double* value,
                           double* grad) {
  switch (chunk) {
    case 4: return value_and_grad<T, 4, kKept>(x, ih, i, w, s, h, ce, n_chunks, kept_decay, value, grad);
    case 8: return value_and_grad<T, 8, kKept>(x, ih, i, w, s, h, ce, n_chunks, kept_decay, value, grad);
    case 16: return value_and_grad<T, 16, kKept>(x, ih, i, w, s, h, ce, n_chunks, kept_decay, value, grad);
    default: {
      *value = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = 0; j < chunk; ++j) {
          const int32_t e = ce[c];
          const int64_t r = c * chunk + j;
          double v;
          value_and_grad<T, 1, kKept>(x, ih, i + r, w + r, s + r, h + r, &e, 1, kKept ? kept_decay + r : nullptr, &v,
                                      grad);
          *value += v;
        }
      }
    }
  }
}

// kept_decay: exp(B s) per row kept by the first pass, or nullptr (computed again).
template <typename T>
void value_and_grad_any(int64_t chunk, const T* x, const T* ih, const T* i, const T* w, const T* s,
                        const int32_t* h, const int32_t* ce, int64_t n_chunks, const T* kept_decay, double* value,
                        double* grad) {
  if (kept_decay != nullptr) {
    value_and_grad_chunks<T, true>(chunk, x, ih, i, w, s, h, ce, n_chunks, kept_decay, value, grad);
  } else {
    value_and_grad_chunks<T, false>(chunk, x, ih, i, w, s, h, ce, n_chunks, nullptr, value, grad);
  }
}

// Rows from which a call runs its two halves at the same time (the caller's `threads` = 2):
// below, handing a half to another thread costs more than the half.
#ifndef KB_MIN_ROWS_FOR_TWO_THREADS
#define KB_MIN_ROWS_FOR_TWO_THREADS 16384
#endif
constexpr int64_t kMinRowsForTwoThreads = KB_MIN_ROWS_FOR_TWO_THREADS;

// The first chunk of the second half of the rows: the first chunk of a still at or after the
// middle, so that no still has rows in both halves (each half writes its stills' gradient).
inline int64_t second_half_start(const int32_t* chunk_experiment, int64_t n_chunks) {
  int64_t first = n_chunks / 2;
  while (first > 0 && first < n_chunks && chunk_experiment[first] == chunk_experiment[first - 1]) ++first;
  return first;
}

// The second half of a call's work, offered to the helper thread and taken by whichever thread
// gets to it first: the helper, or the calling thread once it has done the first half. So a
// helper that starts late (a busy machine) costs nothing but the offer: the caller does both
// halves as one thread would. Each half accumulates into its own sums, added in a fixed order,
// so results do not depend on which thread did what, nor on the thread count. Owned jointly
// (shared_ptr) by the call and the helper's queue: an offer taken after the call returned
// (state not kOpen) is dropped untouched.
struct SecondHalf {
  enum : int { kOpen, kTakenByHelper, kDone, kTakenByCaller };
  std::atomic<int> state{kOpen};
  void (*run)(void*) = nullptr;  // runs the half; valid while the caller waits (kTakenByHelper)
  void* work = nullptr;
};

// One persistent helper thread per process (started on first use, again in a forked child,
// which inherits no threads). Woken through a condition variable, it then spins for
// kHelperSpinMicroseconds for the next offer before sleeping again: waking a sleeping thread
// took 0.07-0.8 ms here, longer than half of a 10^5-row pass, while consecutive passes and
// evaluations follow each other within tens of microseconds. Where the other core is wanted
// (offers that did not help, a spin descheduled for a while) nothing is offered for a while
// and the helper sleeps (`report`): with the second core busy, a spinning helper used up its
// time slice and was descheduled in the middle of a half, which the caller waited for, and a
// woken one shared the caller's core (medians up to 2x those of one thread).
#ifndef KB_HELPER_SPIN_US
#define KB_HELPER_SPIN_US 500
#endif
constexpr int64_t kHelperSpinMicroseconds = KB_HELPER_SPIN_US;
constexpr int64_t kDescheduledMicroseconds = 250;  // a gap this long in a spin: the thread was descheduled
constexpr int64_t kQuietMilliseconds = 5;
constexpr int64_t kWakeMicroseconds = 5000;  // a helper woken this long ago and still asleep: its core is busy

class Helper {
 public:
  using Clock = std::chrono::steady_clock;

  static Helper& get() {
    static std::mutex start_lock;
    static Helper* helper = nullptr;  // never destroyed: the thread may outlive static destructors
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(start_lock);
    if (helper == nullptr || owner != getpid()) {
      helper = new Helper();
      owner = getpid();
      try {
        std::thread([h = helper] { h->loop(); }).detach();
      } catch (const std::system_error&) {  // no thread to be had: the caller does both halves
        helper->started_ = false;
      }
    }
    return *helper;
  }

  // Whether to offer work (not while quiet, see `report`).
  bool active() const {
    return started_ && Clock::now().time_since_epoch().count() >= quiet_until_.load(std::memory_order_relaxed);
  }

  // Returns whether the helper was asleep (or not yet running): it is woken, but late.
  bool offer(std::shared_ptr<SecondHalf> half) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(half));
      pending_.fetch_add(1, std::memory_order_release);
    }
    if (!sleeping_.load(std::memory_order_acquire)) return false;
    Clock::rep none = 0;
    woken_at_.compare_exchange_strong(none, Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    wake_.notify_one();
    return true;
  }

  // Whether an offer made while the helper slept is not to be held against it: it is still
  // waking (up to kWakeMicroseconds after the first offer that woke it; waking took 0.07-5 ms
  // on this VM). Counted, the offers of every quiet spell's end (and of the start) failed while it
  // woke, and it stayed quiet for good (2 offers in 4,000 calls helped).
  bool still_waking(bool was_asleep) const {
    if (!was_asleep) return false;
    const Clock::rep woken = woken_at_.load(std::memory_order_relaxed);
    return woken == 0 || Clock::now().time_since_epoch().count() - woken <
                             std::chrono::duration_cast<Clock::duration>(std::chrono::microseconds(kWakeMicroseconds)).count();
  }

  // How an offer went: useful (the helper took it and the caller waited less than half of what
  // its own half took: >= 25 % gained), or not (the caller overtook the helper, or waited
  // longer: the helper shared a core or was descheduled). Two failures in a row and nothing is
  // offered for a while, doubling from kQuietMilliseconds (up to 1 s) while failures go on.
  void report(bool useful) {
    if (useful) {
      failures_.store(0, std::memory_order_relaxed);
      return;
    }
    const int failures = failures_.fetch_add(1, std::memory_order_relaxed) + 1;
    if (failures >= 2) be_quiet(Clock::now(), failures - 2);
  }

 private:
  void be_quiet(Clock::time_point now, int doublings) {
    const int64_t ms = std::min<int64_t>(kQuietMilliseconds << std::min(doublings, 6), 1000);
    quiet_until_.store((now + std::chrono::milliseconds(ms)).time_since_epoch().count(), std::memory_order_relaxed);
  }

  void loop() {
    for (;;) {
      std::shared_ptr<SecondHalf> half = take();
      int open = SecondHalf::kOpen;
      if (half->state.compare_exchange_strong(open, SecondHalf::kTakenByHelper, std::memory_order_acq_rel)) {
        half->run(half->work);
        half->state.store(SecondHalf::kDone, std::memory_order_release);
      }
    }
  }

  void spin() {
    Clock::time_point last = Clock::now();
    if (last.time_since_epoch().count() < quiet_until_.load(std::memory_order_relaxed)) return;
    const Clock::time_point until = last + std::chrono::microseconds(kHelperSpinMicroseconds);
    while (pending_.load(std::memory_order_acquire) == 0 && last < until) {
      for (int i = 0; i < 32; ++i) __builtin_ia32_pause();
      const Clock::time_point now = Clock::now();
      if (now - last > std::chrono::microseconds(kDescheduledMicroseconds)) {
        report(false);
        return;
      }
      last = now;
    }
  }

  std::shared_ptr<SecondHalf> take() {
    spin();
    std::unique_lock<std::mutex> lock(mutex_);
    sleeping_.store(true, std::memory_order_release);
    wake_.wait(lock, [this] { return !queue_.empty(); });
    sleeping_.store(false, std::memory_order_release);
    woken_at_.store(0, std::memory_order_relaxed);
    std::shared_ptr<SecondHalf> half = std::move(queue_.front());
    queue_.pop_front();
    pending_.fetch_sub(1, std::memory_order_release);
    return half;
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<SecondHalf>> queue_;
  std::atomic<int64_t> pending_{0};
  std::atomic<bool> sleeping_{true};  // asleep, or not yet running
  std::atomic<Clock::rep> woken_at_{0};  // when an offer first woke the sleeping helper (0: awake)
  std::atomic<Clock::rep> quiet_until_{0};  // no offers, no spinning before (steady_clock ticks)
  std::atomic<int> failures_{0};  // offers in a row that did not help
  bool started_ = true;  // the thread runs
};

// work(first_chunk, n_chunks, half) for half 0 = chunks [0, split) and half 1 = [split, n_chunks),
// half 1 offered to the helper thread when `parallel` (done here if the helper has not taken it).
template <typename Work>
void run_halves(int64_t n_chunks, int64_t split, bool parallel, Work& work) {
  auto second = [&work, split, n_chunks] { work(split, n_chunks - split, 1); };
  if (!parallel || !Helper::get().active()) {
    work(0, split, 0);
    second();
    return;
  }
  auto half = std::make_shared<SecondHalf>();
  half->work = &second;
  half->run = [](void* w) { (*static_cast<decltype(second)*>(w))(); };
  Helper& helper = Helper::get();
  const bool helper_was_asleep = helper.offer(half);
  const auto start = Helper::Clock::now();
  work(0, split, 0);
  const auto own_half_done = Helper::Clock::now();
  int open = SecondHalf::kOpen;
  if (half->state.compare_exchange_strong(open, SecondHalf::kTakenByCaller, std::memory_order_acq_rel)) {
    if (!helper.still_waking(helper_was_asleep)) helper.report(false);
    second();
    return;
  }
  for (int spins = 0; half->state.load(std::memory_order_acquire) != SecondHalf::kDone; ++spins) {
    if (spins < 4096) {
      __builtin_ia32_pause();
    } else {
      std::this_thread::yield();  // the helper was descheduled: let it run
    }
  }
  const bool useful = 2 * (Helper::Clock::now() - own_half_done) < own_half_done - start;
  if (useful || !helper.still_waking(helper_was_asleep)) helper.report(useful);
}

inline bool parallel_for(int64_t threads, int64_t n_rows) {
  return threads >= 2 && n_rows >= kMinRowsForTwoThreads;
}

// One device's rows as the kernels read them.
template <typename T>
struct Rows {
  const T* x;  // (k, B) per still
  const T* intensity;
  const T* weight;
  const T* inv_two_d_sq;
  const int32_t* group_id;
  const int32_t* chunk_experiment;
  int64_t n_rows, n_chunks, chunk;
};

template <ffi::DataType DT>
std::optional<Rows<ffi::NativeType<DT>>> rows_of(ffi::Buffer<DT>& x, ffi::Buffer<DT>& intensity,
                                                  ffi::Buffer<DT>& weight, ffi::Buffer<DT>& inv_two_d_sq,
                                                  ffi::Buffer<ffi::S32>& group_id,
                                                  ffi::Buffer<ffi::S32>& chunk_experiment) {
  const int64_t n_rows = intensity.element_count(), n_chunks = chunk_experiment.element_count();
  if (n_chunks == 0 ? n_rows != 0 : n_rows % n_chunks != 0) return std::nullopt;  // rows not in whole chunks
  return Rows<ffi::NativeType<DT>>{x.typed_data(), intensity.typed_data(), weight.typed_data(),
                                   inv_two_d_sq.typed_data(), group_id.typed_data(), chunk_experiment.typed_data(),
                                   n_rows, n_chunks, n_chunks > 0 ? n_rows / n_chunks : 1};
}

// sums[n_sums] = (sum w g I, sum w g^2) per group: each half of the rows into its own sums
// (`second_half_sums`: scratch of n_sums), added at the end.
template <typename T>
void group_sums_in_halves(const Rows<T>& rows, bool parallel, int64_t n_sums, T* sums, T* second_half_sums,
                          T* kept_decay = nullptr) {
  T* half_sums[2] = {sums, second_half_sums};
  auto work = [&](int64_t first, int64_t n, int half) {
    // zeroed by the thread that sums into them: their cache lines start in its core's cache
    std::memset(half_sums[half], 0, n_sums * sizeof(T));
    const int64_t row = first * rows.chunk;
    group_sums_any<T>(rows.chunk, rows.x, rows.intensity + row, rows.weight + row, rows.inv_two_d_sq + row,
                      rows.group_id + row, rows.chunk_experiment + first, n, half_sums[half],
                      kept_decay != nullptr ? kept_decay + row : nullptr);
  };
  run_halves(rows.n_chunks, second_half_start(rows.chunk_experiment, rows.n_chunks), parallel, work);
#pragma omp simd
  for (int64_t i = 0; i < n_sums; ++i) sums[i] += second_half_sums[i];
}

// (sum w r^2, grad[n_grad]) given I_h: the halves' values added at the end, their stills disjoint.
template <typename T>
void value_and_grad_in_halves(const Rows<T>& rows, const T* ih, bool parallel, int64_t n_grad, T* value, T* grad,
                              const T* kept_decay = nullptr) {
  std::vector<double> grad_sums(n_grad);
  double values[2] = {0.0, 0.0};
  auto work = [&](int64_t first, int64_t n, int half) {
    const int64_t row = first * rows.chunk;
    value_and_grad_any<T>(rows.chunk, rows.x, ih, rows.intensity + row, rows.weight + row, rows.inv_two_d_sq + row,
                          rows.group_id + row, rows.chunk_experiment + first, n,
                          kept_decay != nullptr ? kept_decay + row : nullptr, &values[half], grad_sums.data());
  };
  run_halves(rows.n_chunks, second_half_start(rows.chunk_experiment, rows.n_chunks), parallel, work);
  for (int64_t i = 0; i < n_grad; ++i) grad[i] = static_cast<T>(grad_sums[i]);
  *value = static_cast<T>(values[0] + values[1]);
}

template <ffi::DataType DT>
ffi::Error GroupSums(ffi::Buffer<DT> x, ffi::Buffer<DT> intensity, ffi::Buffer<DT> weight,
                     ffi::Buffer<DT> inv_two_d_sq, ffi::Buffer<ffi::S32> group_id,
                     ffi::Buffer<ffi::S32> chunk_experiment, ffi::ResultBuffer<DT> sums,
                     ffi::ResultBuffer<DT> second_half_sums, int64_t threads) {
  const auto rows = rows_of(x, intensity, weight, inv_two_d_sq, group_id, chunk_experiment);
  if (!rows) return ffi::Error::InvalidArgument("rows not in whole chunks");
  if (second_half_sums->element_count() != sums->element_count()) return ffi::Error::InvalidArgument("scratch size");
  group_sums_in_halves(*rows, parallel_for(threads, rows->n_rows), sums->element_count(), sums->typed_data(),
                       second_half_sums->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error ValueAndGrad(ffi::Buffer<DT> x, ffi::Buffer<DT> ih, ffi::Buffer<DT> intensity,
                        ffi::Buffer<DT> weight, ffi::Buffer<DT> inv_two_d_sq, ffi::Buffer<ffi::S32> group_id,
                        ffi::Buffer<ffi::S32> chunk_experiment, ffi::ResultBuffer<DT> value,
                        ffi::ResultBuffer<DT> grad, int64_t threads) {
  const auto rows = rows_of(x, intensity, weight, inv_two_d_sq, group_id, chunk_experiment);
  if (!rows) return ffi::Error::InvalidArgument("rows not in whole chunks");
  value_and_grad_in_halves(*rows, ih.typed_data(), parallel_for(threads, rows->n_rows), grad->element_count(),
                           value->typed_data(), grad->typed_data());
  return ffi::Error::Success();
}

// Both passes in one call (one device: no psum between them), I_h = sum w g I / sum w g^2
// (0 where sum w g^2 <= 0, as `sharding._safe_divide`) computed here; `sums` and
// `second_half_sums` (n_groups x 2 each) are scratch, and so is `kept_decay`: where it has a
// slot per row, the first pass keeps exp(B s) there for the second (8 % less time at 10^5 rows
// in cache, 44 % more at 10^6, where the 16 bytes per row more traffic cost more than the exp).
template <ffi::DataType DT>
ffi::Error Evaluate(ffi::Buffer<DT> x, ffi::Buffer<DT> intensity, ffi::Buffer<DT> weight,
                    ffi::Buffer<DT> inv_two_d_sq, ffi::Buffer<ffi::S32> group_id,
                    ffi::Buffer<ffi::S32> chunk_experiment, ffi::ResultBuffer<DT> value, ffi::ResultBuffer<DT> grad,
                    ffi::ResultBuffer<DT> ih, ffi::ResultBuffer<DT> sums, ffi::ResultBuffer<DT> second_half_sums,
                    ffi::ResultBuffer<DT> kept_decay, int64_t threads) {
  using T = ffi::NativeType<DT>;
  const auto rows = rows_of(x, intensity, weight, inv_two_d_sq, group_id, chunk_experiment);
  if (!rows) return ffi::Error::InvalidArgument("rows not in whole chunks");
  const int64_t n_groups = ih->element_count();
  if (sums->element_count() != 2 * n_groups || second_half_sums->element_count() != 2 * n_groups) {
    return ffi::Error::InvalidArgument("scratch size");
  }
  const bool parallel = parallel_for(threads, rows->n_rows);
  T* decay = kept_decay->element_count() == rows->n_rows ? kept_decay->typed_data() : nullptr;
  T* s = sums->typed_data();
  group_sums_in_halves(*rows, parallel, 2 * n_groups, s, second_half_sums->typed_data(), decay);
  T* ih_out = ih->typed_data();
#pragma omp simd
  for (int64_t h = 0; h < n_groups; ++h) {
    const T den = s[2 * h + 1];
    ih_out[h] = den > T(0) ? s[2 * h] / den : T(0);
  }
  value_and_grad_in_halves(*rows, static_cast<const T*>(ih_out), parallel, grad->element_count(),
                           value->typed_data(), grad->typed_data(), static_cast<const T*>(decay));
  return ffi::Error::Success();
}

}  // namespace

// The rows every handler reads: intensity, weight, 1/(2 d^2) (DT) and group id, still of each
// chunk (S32); x (DT) before them, ih (DT) too for ValueAndGrad.
#define KB_ROW_ARGS(DT)                                                                                   \
  .Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<ffi::S32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()
#define KB_GROUP_SUMS(NAME, DT)                                                                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, GroupSums<DT>, ffi::Ffi::Bind().Arg<ffi::Buffer<DT>>() KB_ROW_ARGS(DT) \
                                                         .Ret<ffi::Buffer<DT>>()                          \
                                                         .Ret<ffi::Buffer<DT>>()                          \
                                                         .Attr<int64_t>("threads"));
#define KB_VALUE_AND_GRAD(NAME, DT)                                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, ValueAndGrad<DT>,                                                   \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<DT>>() KB_ROW_ARGS(DT) \
                                    .Ret<ffi::Buffer<DT>>()                                               \
                                    .Ret<ffi::Buffer<DT>>()                                               \
                                    .Attr<int64_t>("threads"));
#define KB_EVALUATE(NAME, DT)                                                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Evaluate<DT>, ffi::Ffi::Bind().Arg<ffi::Buffer<DT>>() KB_ROW_ARGS(DT) \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Ret<ffi::Buffer<DT>>()                           \
                                                        .Attr<int64_t>("threads"));

KB_GROUP_SUMS(KbGroupSumsF64, ffi::F64)
KB_GROUP_SUMS(KbGroupSumsF32, ffi::F32)
KB_VALUE_AND_GRAD(KbValueAndGradF64, ffi::F64)
KB_VALUE_AND_GRAD(KbValueAndGradF32, ffi::F32)
KB_EVALUATE(KbEvaluateF64, ffi::F64)
KB_EVALUATE(KbEvaluateF32, ffi::F32)

// The kernel's exp and the portable one over n values, for the tests (through ctypes).
extern "C" {
void KbExpF64(const double* v, double* out, int64_t n) { exp_rows(v, out, n); }
void KbExpF32(const float* v, float* out, int64_t n) { exp_rows(v, out, n); }
void KbExpPortableF64(const double* v, double* out, int64_t n) { exp_portable(v, out, n); }
void KbExpPortableF32(const float* v, float* out, int64_t n) { exp_portable(v, out, n); }
}
