// The AVX-512 kernel set: linear_kernel's rows on CPUs with avx512f.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>

#include "common/model/kernels/cpu_kernels.hpp"

namespace mdi {

// GCC 12's intrinsics (_mm512_undefined_*, inside reduce and convert) trip its own
// -Wuninitialized when inlined: GCC bug 105593, a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MDI_AVX512 __attribute__((target("avx512f,fma")))

namespace {
MDI_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MDI_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
MDI_AVX512 inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Sums of NR weight rows against NT tokens: one 16-lane accumulator per (row, token),
// so a 4 x 4 tile loads 8 vectors for 16 multiplies, and 4 row streams keep more weight
// reads in flight than one. A (row, token) sum is the same in every tile shape, which
// keeps each sample's numbers independent of its batch.
template <int NR, int NT, typename W>
MDI_AVX512 inline void tile_avx512(const W* w, const float* x, int64_t in, float (&sums)[4][4]) {
  __m512 a[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NT; ++j) a[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  if constexpr (NR == 1) {
    // A lone row is one FMA chain per token: the loads of 64 floats go ahead of their
    // multiplies, or the waiting chain holds the loads back (bf16 decode ran 14% slower).
    for (; i + 64 <= in; i += 64) {
      const __m512 w0 = load16(w + i), w1 = load16(w + i + 16), w2 = load16(w + i + 32), w3 = load16(w + i + 48);
      for (int j = 0; j < NT; ++j) {
        const float* xt = x + j * in + i;
        const __m512 x0 = _mm512_loadu_ps(xt), x1 = _mm512_loadu_ps(xt + 16), x2 = _mm512_loadu_ps(xt + 32),
                     x3 = _mm512_loadu_ps(xt + 48);
        a[0][j] = _mm512_fmadd_ps(w3, x3, _mm512_fmadd_ps(w2, x2, _mm512_fmadd_ps(w1, x1, _mm512_fmadd_ps(w0, x0, a[0][j]))));
      }
    }
  }
  for (; i + 16 <= in; i += 16) {
    __m512 xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = _mm512_loadu_ps(x + j * in + i);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load16(w + r * in + i);
      for (int j = 0; j < NT; ++j) a[r][j] = _mm512_fmadd_ps(wv, xv[j], a[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NT; ++j) {
      float s = _mm512_reduce_add_ps(a[r][j]);
      for (int64_t k = i; k < in; ++k) s += static_cast<float>(w[r * in + k]) * x[j * in + k];
      sums[r][j] = s;
    }
}

// Rows [r, r + NR) of y (T, n) = add + x (T, in) · w (n, in)ᵀ, tokens in blocks of 4.
template <int NR, typename W>
MDI_AVX512 inline void tile_rows_avx512(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y,
                                        int64_t r) {
  float sums[4][4];
  const W* wr = w + r * in;
  for (int64_t t = 0; t < T; t += 4) {
    const int64_t nt = std::min<int64_t>(4, T - t);
    switch (nt) {
      case 4: tile_avx512<NR, 4>(wr, x + t * in, in, sums); break;
      case 3: tile_avx512<NR, 3>(wr, x + t * in, in, sums); break;
      case 2: tile_avx512<NR, 2>(wr, x + t * in, in, sums); break;
      default: tile_avx512<NR, 1>(wr, x + t * in, in, sums);
    }
    for (int k = 0; k < NR; ++k)
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t at = (t + j) * n + r + k;
        y[at] = (add ? add[at] : 0.0f) + sums[k][j];
      }
  }
}
}  // namespace

// One or two tokens read one row at a time: a single sequential stream is the fastest
// read of bf16 weights (4 interleaved rows ran at 60% of its speed for one token).
// Bigger micro-batches take 4 x 4 tiles: nanollama-304m (2 threads) decoded 8 samples
// 1.7x (float32) and 1.35x (bfloat16) faster than with blocks of 1 row x 4 tokens
// with 4 accumulators each, and 1 or 2 samples as fast.
template <typename W>
MDI_AVX512 void linear_rows_avx512(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y,
                                   int64_t r0, int64_t r1) {
  int64_t r = r0;
  if (T <= 2) {
    for (; r < r1; ++r) tile_rows_avx512<1>(x, T, w, in, n, add, y, r);
    return;
  }
  for (; r + 4 <= r1; r += 4) tile_rows_avx512<4>(x, T, w, in, n, add, y, r);
  switch (r1 - r) {
    case 3: return tile_rows_avx512<3>(x, T, w, in, n, add, y, r);
    case 2: return tile_rows_avx512<2>(x, T, w, in, n, add, y, r);
    case 1: return tile_rows_avx512<1>(x, T, w, in, n, add, y, r);
  }
}

template void linear_rows_avx512(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
template void linear_rows_avx512(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
template void linear_rows_avx512(const float*, int64_t, const c10::Half*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
#pragma GCC diagnostic pop

}  // namespace mdi
#endif
