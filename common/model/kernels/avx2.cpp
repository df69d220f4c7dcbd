// The AVX2 kernel set: linear_kernel's rows on CPUs with avx2, fma and f16c.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>

#include "common/model/kernels/cpu_kernels.hpp"

namespace mdi {

#define MDI_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {
MDI_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MDI_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
MDI_AVX2 inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
MDI_AVX2 inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The AVX2 kernel: rows [r0, r1) of y, one row at a time, so the weights are one
// sequential stream (measured: four interleaved rows read bf16 at 60% of the speed of
// one), with four accumulators per token. Tokens go in blocks of 2, sharing each
// weight load; a token's sums are the same in every block size.
template <int NT, typename W>
MDI_AVX2 inline void dot_block_avx2(const W* wr, const float* x, int64_t in, float* sums) {
  __m256 a[NT][4];
  for (int j = 0; j < NT; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m256 w0 = load8(wr + i), w1 = load8(wr + i + 8), w2 = load8(wr + i + 16), w3 = load8(wr + i + 24);
    for (int j = 0; j < NT; ++j) {
      const float* xt = x + j * in + i;
      a[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), a[j][0]);
      a[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), a[j][1]);
      a[j][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), a[j][2]);
      a[j][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), a[j][3]);
    }
  }
  for (; i + 8 <= in; i += 8) {
    const __m256 w0 = load8(wr + i);
    for (int j = 0; j < NT; ++j) a[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * in + i), a[j][0]);
  }
  for (int j = 0; j < NT; ++j) {
    float s = reduce8(_mm256_add_ps(_mm256_add_ps(a[j][0], a[j][1]), _mm256_add_ps(a[j][2], a[j][3])));
    for (int64_t k = i; k < in; ++k) s += static_cast<float>(wr[k]) * x[j * in + k];
    sums[j] = s;
  }
}
}  // namespace

template <typename W>
MDI_AVX2 void linear_rows_avx2(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y,
                               int64_t r0, int64_t r1) {
  float sums[2];
  for (int64_t r = r0; r < r1; ++r) {
    const W* wr = w + r * in;
    for (int64_t t = 0; t < T; t += 2) {
      const int64_t nt = std::min<int64_t>(2, T - t);
      if (nt == 2)
        dot_block_avx2<2>(wr, x + t * in, in, sums);
      else
        dot_block_avx2<1>(wr, x + t * in, in, sums);
      for (int64_t j = 0; j < nt; ++j) y[(t + j) * n + r] = (add ? add[(t + j) * n + r] : 0.0f) + sums[j];
    }
  }
}

template void linear_rows_avx2(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
template void linear_rows_avx2(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
template void linear_rows_avx2(const float*, int64_t, const c10::Half*, int64_t, int64_t, const float*, float*, int64_t, int64_t);

}  // namespace mdi
#endif
