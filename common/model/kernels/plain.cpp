// The kernels in plain C++, and linear_kernel's choice of kernel set for its rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model/kernels/cpu_kernels.hpp"

namespace mdi {

namespace {
// Work below this many weight bytes stays on the calling thread.
constexpr int64_t kParallelBytes = 1 << 17;

template <typename W>
void linear_rows_plain(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y, int64_t r0,
                       int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float lanes[8] = {};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8)
        for (int j = 0; j < 8; ++j) lanes[j] += static_cast<float>(w[r * in + i + j]) * x[t * in + i + j];
      float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      for (; i < in; ++i) s += static_cast<float>(w[r * in + i]) * x[t * in + i];
      y[t * n + r] = (add ? add[t * n + r] : 0.0f) + s;
    }
}

enum class Isa { avx512, avx2, plain };  // best first

// The best kernel set the CPU runs, or a weaker one named by MDI_CPU_KERNELS (avx512,
// avx2, plain): the tests run each set this machine has.
Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__)
    const Isa best = __builtin_cpu_supports("avx512f") ? Isa::avx512
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
                         ? Isa::avx2
                         : Isa::plain;
#else
    const Isa best = Isa::plain;
#endif
    const char* asked = std::getenv("MDI_CPU_KERNELS");
    if (!asked || !*asked) return best;
    const std::string name = asked;
    const Isa wanted = name == "avx512" ? Isa::avx512
                       : name == "avx2" ? Isa::avx2
                       : name == "plain"
                           ? Isa::plain
                           : throw std::invalid_argument("MDI_CPU_KERNELS=" + name +
                                                         ": expected avx512, avx2 or plain (or unset: the best this CPU has)");
    if (wanted < best)
      throw std::invalid_argument("MDI_CPU_KERNELS=" + name + ": this CPU does not have it; unset the variable or name a weaker set");
    return wanted;
  }();
  return isa;
}
}  // namespace

template <typename W>
void linear_kernel(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y) {
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, in * static_cast<int64_t>(sizeof(W))));
  const Isa isa = cpu_isa();
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if (isa == Isa::avx512) return linear_rows_avx512(x, T, w, in, n, add, y, r0, r1);
    if (isa == Isa::avx2) return linear_rows_avx2(x, T, w, in, n, add, y, r0, r1);
#endif
    linear_rows_plain(x, T, w, in, n, add, y, r0, r1);
  });
}

template <typename W>
void rms_norm_kernel(const float* x, int64_t T, int64_t dim, const W* weight, float eps, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * dim;
    float ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xt[i] * xt[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = static_cast<float>(weight[i]) * (scale * xt[i]);
  }
}

void rope_kernel(float* x, int64_t T, int64_t stride, int64_t heads, int64_t hd, int64_t pos0, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + (pos0 + t) * half;
    const float* s = sin + (pos0 + t) * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * stride + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

void attention_kernel(const float* q, int64_t q_stride, const float* keys, const float* values, int64_t capacity, int64_t T,
                      int64_t pos0, int64_t n_heads, int64_t n_kv, int64_t hd, float* out) {
  const int64_t group = n_heads / n_kv, len = pos0 + T;
  const float scale = std::sqrt(static_cast<float>(hd));
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, 8 * len * hd * T));
  at::parallel_for(0, n_heads, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> scores(len);
    for (int64_t h = h0; h < h1; ++h) {
      const float* k = keys + (h / group) * capacity * hd;
      const float* v = values + (h / group) * capacity * hd;
      for (int64_t t = 0; t < T; ++t) {
        const float* qh = q + t * q_stride + h * hd;
        const int64_t n = pos0 + t + 1;  // query t sees keys up to its own position
        float max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          float dot = 0;
          for (int64_t i = 0; i < hd; ++i) dot += qh[i] * k[j * hd + i];
          scores[j] = dot / scale;
          max = std::max(max, scores[j]);
        }
        float sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += (scores[j] = std::exp(scores[j] - max));
        float* o = out + t * n_heads * hd + h * hd;
        std::fill(o, o + hd, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float p = scores[j] / sum;
          for (int64_t i = 0; i < hd; ++i) o[i] += p * v[j * hd + i];
        }
      }
    }
  });
}

void swiglu_kernel(const float* gate_up, int64_t T, int64_t hidden, float* out) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hidden; ++i) {
      const float gate = gate_up[t * 2 * hidden + i];
      out[t * hidden + i] = gate * (1.0f / (1.0f + std::exp(-gate))) * gate_up[t * 2 * hidden + hidden + i];
    }
}

template void linear_kernel(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*);
template void linear_kernel(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, const float*, float*);
template void linear_kernel(const float*, int64_t, const c10::Half*, int64_t, int64_t, const float*, float*);
template void rms_norm_kernel(const float*, int64_t, int64_t, const float*, float, float*);
template void rms_norm_kernel(const float*, int64_t, int64_t, const c10::BFloat16*, float, float*);
template void rms_norm_kernel(const float*, int64_t, int64_t, const c10::Half*, float, float*);

}  // namespace mdi
