// The per-still KB target's two passes over one device's rows, as XLA FFI handlers for CPU.
//
// Same arithmetic as jaxscale/target/sharding.py `_local_value_and_grad` (docs/serial.md):
//   g_i = k_e exp(B_e s_i), s_i = 1/(2 d_i^2), rows in chunks of `chunk` rows of one still e.
//   pass 1: sums[h] += (w g I, w g^2) over the rows of group h.
//   pass 2: r = I - g I_h, value = sum w r^2,
//           grad[e] += (sum -2 w r I_h exp(B s), sum -2 w r I_h g s) over the rows of still e.
// One exp per row per pass, vectorised over the rows of a few chunks (`#pragma omp simd`, exp
// inline). The value and gradient are summed per still in the data type, then in double; the
// group sums in the data type, like the XLA path.
#include <cstdint>
#include <cstring>
#include <system_error>
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

// Requests the cache lines of rows [row, row + n) of each array, kPrefetchRows ahead.
template <typename T>
inline void prefetch_rows(int64_t row, int64_t n, const T* a, const T* b, const T* c, const int32_t* ids) {
  const int64_t ahead = row + kPrefetchRows;
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) {
    __builtin_prefetch(a + ahead + i);
    __builtin_prefetch(b + ahead + i);
    __builtin_prefetch(c + ahead + i);
  }
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(ids + ahead + i);
}

// decay[i] = exp(B_e s_i) for the rows of chunks first_chunk .. first_chunk + n - 1.
template <typename T, int C>
inline void block_decay(const T* x, const T* s, const int32_t* chunk_experiment, int64_t first_chunk, int64_t n,
                        T* arg, T* decay) {
  for (int64_t c = 0; c < n; ++c) {
    const T b = x[2 * static_cast<int64_t>(chunk_experiment[first_chunk + c]) + 1];
    const T* s_c = s + (first_chunk + c) * C;
#pragma omp simd
    for (int j = 0; j < C; ++j) arg[c * C + j] = b * s_c[j];
  }
#pragma omp simd
  for (int64_t i = 0; i < n * C; ++i) decay[i] = exp_of(arg[i]);
}

// Rows are read in chunks of C rows (C known at compile time for the common sizes).
template <typename T, int C>
void group_sums(const T* x, const T* intensity, const T* weight, const T* s, const int32_t* group_id,
                const int32_t* chunk_experiment, int64_t n_chunks, T* sums) {
  alignas(64) T arg[kBlockChunks * C], decay[kBlockChunks * C], wgi[kBlockChunks * C], wgg[kBlockChunks * C];
  for (int64_t first_chunk = 0; first_chunk < n_chunks; first_chunk += kBlockChunks) {
    const int64_t n = n_chunks - first_chunk < kBlockChunks ? n_chunks - first_chunk : kBlockChunks;
    if (kPrefetchRows > 0) prefetch_rows(first_chunk * C, n * C, s, intensity, weight, group_id);
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
template <typename T, int C>
void value_and_grad(const T* x, const T* ih, const T* intensity, const T* weight, const T* s,
                    const int32_t* group_id, const int32_t* chunk_experiment, int64_t n_chunks,
                    double* value_out, double* grad) {
  alignas(64) T arg[kBlockChunks * C], decay[kBlockChunks * C];
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
    block_decay<T, C>(x, s, chunk_experiment, first_chunk, n, arg, decay);
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
                    const int32_t* ce, int64_t n_chunks, T* sums) {
  switch (chunk) {
    case 4: return group_sums<T, 4>(x, i, w, s, h, ce, n_chunks, sums);
    case 8: return group_sums<T, 8>(x, i, w, s, h, ce, n_chunks, sums);
    case 16: return group_sums<T, 16>(x, i, w, s, h, ce, n_chunks, sums);
    default:  // one-row "chunks" over the rows, each with its still
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = 0; j < chunk; ++j) {
          const int32_t e = ce[c];
          group_sums<T, 1>(x, i + c * chunk + j, w + c * chunk + j, s + c * chunk + j, h + c * chunk + j, &e, 1,
                           sums);
        }
      }
  }
}

template <typename T>
void value_and_grad_any(int64_t chunk, const T* x, const T* ih, const T* i, const T* w, const T* s,
                        const int32_t* h, const int32_t* ce, int64_t n_chunks, double* value, double* grad) {
  switch (chunk) {
    case 4: return value_and_grad<T, 4>(x, ih, i, w, s, h, ce, n_chunks, value, grad);
    case 8: return value_and_grad<T, 8>(x, ih, i, w, s, h, ce, n_chunks, value, grad);
    case 16: return value_and_grad<T, 16>(x, ih, i, w, s, h, ce, n_chunks, value, grad);
    default: {
      *value = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = 0; j < chunk; ++j) {
          const int32_t e = ce[c];
          double v;
          value_and_grad<T, 1>(x, ih, i + c * chunk + j, w + c * chunk + j, s + c * chunk + j, h + c * chunk + j, &e,
                               1, &v, grad);
          *value += v;
        }
      }
    }
  }
}

// Rows from which a call may run in two threads (the caller's `threads` = 2): below, the
// second thread's start and the private sums it adds cost more than its half of the rows saves.
constexpr int64_t kMinRowsForTwoThreads = 1 << 17;

// work(first_chunk, n_chunks, part) over chunks [0, n_chunks) as one part, or as two halves
// (part 1 on a new thread) when parts = 2; the number of parts used (1 if no thread starts).
template <typename Work>
int run_in_parts(int64_t n_chunks, int parts, Work&& work) {
  if (parts < 2) {
    work(0, n_chunks, 0);
    return 1;
  }
  const int64_t half = n_chunks / 2;
  std::thread second;
  try {
    second = std::thread([&] { work(half, n_chunks - half, 1); });
  } catch (const std::system_error&) {
    work(0, n_chunks, 0);
    return 1;
  }
  work(0, half, 0);
  second.join();
  return 2;
}

inline int parts_for(int64_t threads, int64_t n_rows) {
  return threads >= 2 && n_rows >= kMinRowsForTwoThreads ? 2 : 1;
}

template <ffi::DataType DT>
ffi::Error GroupSums(ffi::Buffer<DT> x, ffi::Buffer<DT> intensity, ffi::Buffer<DT> weight,
                     ffi::Buffer<DT> inv_two_d_sq, ffi::Buffer<ffi::S32> group_id,
                     ffi::Buffer<ffi::S32> chunk_experiment, ffi::ResultBuffer<DT> sums, int64_t threads) {
  using T = ffi::NativeType<DT>;
  const int64_t n_rows = intensity.element_count(), n_chunks = chunk_experiment.element_count();
  if (n_chunks == 0 ? n_rows != 0 : n_rows % n_chunks != 0) {
    return ffi::Error::InvalidArgument("rows not in whole chunks");
  }
  const int64_t chunk = n_chunks > 0 ? n_rows / n_chunks : 1, n_sums = sums->element_count();
  const int parts = parts_for(threads, n_rows);
  std::memset(sums->typed_data(), 0, n_sums * sizeof(T));
  std::vector<T> second_sums(parts == 2 ? n_sums : 0);  // the second thread's own sums
  auto work = [&](int64_t first, int64_t n, int part) {
    const int64_t row = first * chunk;
    group_sums_any<T>(chunk, x.typed_data(), intensity.typed_data() + row, weight.typed_data() + row,
                      inv_two_d_sq.typed_data() + row, group_id.typed_data() + row,
                      chunk_experiment.typed_data() + first, n, part == 0 ? sums->typed_data() : second_sums.data());
  };
  if (run_in_parts(n_chunks, parts, work) == 2) {
    T* out = sums->typed_data();
    for (int64_t i = 0; i < n_sums; ++i) out[i] += second_sums[i];
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error ValueAndGrad(ffi::Buffer<DT> x, ffi::Buffer<DT> ih, ffi::Buffer<DT> intensity, ffi::Buffer<DT> weight,
                        ffi::Buffer<DT> inv_two_d_sq, ffi::Buffer<ffi::S32> group_id,
                        ffi::Buffer<ffi::S32> chunk_experiment, ffi::ResultBuffer<DT> value,
                        ffi::ResultBuffer<DT> grad, int64_t threads) {
  using T = ffi::NativeType<DT>;
  const int64_t n_rows = intensity.element_count(), n_chunks = chunk_experiment.element_count();
  if (n_chunks == 0 ? n_rows != 0 : n_rows % n_chunks != 0) {
    return ffi::Error::InvalidArgument("rows not in whole chunks");
  }
  const int64_t chunk = n_chunks > 0 ? n_rows / n_chunks : 1, n_grad = grad->element_count();
  const int parts = parts_for(threads, n_rows);
  std::vector<double> grad_sums[2] = {std::vector<double>(n_grad), std::vector<double>(parts == 2 ? n_grad : 0)};
  double values[2] = {0.0, 0.0};
  auto work = [&](int64_t first, int64_t n, int part) {
    const int64_t row = first * chunk;
    value_and_grad_any<T>(chunk, x.typed_data(), ih.typed_data(), intensity.typed_data() + row,
                          weight.typed_data() + row, inv_two_d_sq.typed_data() + row, group_id.typed_data() + row,
                          chunk_experiment.typed_data() + first, n, &values[part], grad_sums[part].data());
  };
  const int used = run_in_parts(n_chunks, parts, work);
  T* out = grad->typed_data();
  for (int64_t i = 0; i < n_grad; ++i) out[i] = static_cast<T>(used == 2 ? grad_sums[0][i] + grad_sums[1][i] : grad_sums[0][i]);
  *value->typed_data() = static_cast<T>(values[0] + values[1]);
  return ffi::Error::Success();
}

}  // namespace

#define KB_GROUP_SUMS(NAME, DT)                                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, GroupSums<DT>, ffi::Ffi::Bind()                                 \
                                                         .Arg<ffi::Buffer<DT>>()                      \
                                                         .Arg<ffi::Buffer<DT>>()                      \
                                                         .Arg<ffi::Buffer<DT>>()                      \
                                                         .Arg<ffi::Buffer<DT>>()                      \
                                                         .Arg<ffi::Buffer<ffi::S32>>()                \
                                                         .Arg<ffi::Buffer<ffi::S32>>()                \
                                                         .Ret<ffi::Buffer<DT>>()                      \
                                                         .Attr<int64_t>("threads"));
#define KB_VALUE_AND_GRAD(NAME, DT)                                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, ValueAndGrad<DT>, ffi::Ffi::Bind()                              \
                                                            .Arg<ffi::Buffer<DT>>()                   \
                                                            .Arg<ffi::Buffer<DT>>()                   \
                                                            .Arg<ffi::Buffer<DT>>()                   \
                                                            .Arg<ffi::Buffer<DT>>()                   \
                                                            .Arg<ffi::Buffer<DT>>()                   \
                                                            .Arg<ffi::Buffer<ffi::S32>>()             \
                                                            .Arg<ffi::Buffer<ffi::S32>>()             \
                                                            .Ret<ffi::Buffer<DT>>()                   \
                                                            .Ret<ffi::Buffer<DT>>()                   \
                                                            .Attr<int64_t>("threads"));

KB_GROUP_SUMS(KbGroupSumsF64, ffi::F64)
KB_GROUP_SUMS(KbGroupSumsF32, ffi::F32)
KB_VALUE_AND_GRAD(KbValueAndGradF64, ffi::F64)
KB_VALUE_AND_GRAD(KbValueAndGradF32, ffi::F32)
