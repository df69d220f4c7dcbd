#include "common/model/model.hpp"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mdi {

namespace {
// Cache capacity grows in blocks of this many positions (or doubles, whichever
// is more), so appends rarely reallocate and short samples stay small.
constexpr int64_t kCacheBlock = 256;

// ---------------------------------------------------------------------------
// CPU kernels: float32 activations; weights float32, bfloat16 or float16, widened
// to float32 as they are read; every sum accumulates in float32. Plain loops
// except the products, which stream the weights with AVX-512 (or AVX2) where
// the CPU has it. At the sizes of a tiny model they run on one thread, with no
// dispatch: the op count, not the arithmetic, decided the speed there.

// Work below this many weight bytes stays on the calling thread.
constexpr int64_t kParallelBytes = 1 << 17;

#if defined(__x86_64__)
// GCC 12's intrinsics (_mm512_undefined_*, inside reduce and convert) trip its own
// -Wuninitialized when inlined: GCC bug 105593, a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MDI_AVX512 __attribute__((target("avx512f,fma")))
#define MDI_AVX2 __attribute__((target("avx2,fma,f16c")))

MDI_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MDI_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
MDI_AVX512 inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

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
#pragma GCC diagnostic pop
#endif

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

// y (T, n) = add + x (T, in) · w (n, in)ᵀ; add may be null. Rows of w are split over the threads.
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

// Calls f(pointer) with w's data as float, c10::BFloat16 or c10::Half.
template <typename F>
void with_weight_type(const torch::Tensor& w, F&& f) {
  switch (w.scalar_type()) {
    case torch::kFloat32: return f(w.data_ptr<float>());
    case torch::kBFloat16: return f(w.data_ptr<c10::BFloat16>());
    case torch::kFloat16: return f(w.data_ptr<c10::Half>());
    default: throw std::invalid_argument(std::string("no CPU kernel for weights of dtype ") + c10::toString(w.scalar_type()));
  }
}

// out = x / rms(x) * weight, row by row, as llama2.c computes it.
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

// Half-split RoPE, in place, on `heads` heads of head_dim at row stride `stride`, token t at position pos0 + t.
// cos, sin: (max_seq_len, head_dim / 2)
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

// Causal attention of T queries (positions pos0 .. pos0 + T - 1) over the cache: for each
// head, softmax(q·kᵀ / sqrt(hd)) · v. q: (T, n_heads, hd) at row stride q_stride;
// keys, values: (n_kv, capacity, hd); out: (T, n_heads * hd). Heads are split over the threads.
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

// ---------------------------------------------------------------------------
// ATen versions of the steps, for devices without the kernels above

// x: (T, in) · w: (out, in)ᵀ. One token takes the matrix-vector kernel, which
// reads the weights faster than the general matrix product does.
torch::Tensor aten_project(const torch::Tensor& x, const torch::Tensor& w) {
  if (x.size(0) == 1) return torch::mv(w, x[0]).unsqueeze(0);
  return torch::linear(x, w);
}

// Half-split rotary embedding: the first half of each head pairs with the second.
// t: (T, heads, head_dim); cos, sin: (T, 1, head_dim / 2)
torch::Tensor aten_rope(const torch::Tensor& t, const torch::Tensor& cos, const torch::Tensor& sin) {
  auto halves = t.chunk(2, -1);
  return torch::cat({halves[0] * cos - halves[1] * sin, halves[1] * cos + halves[0] * sin}, -1);
}
}  // namespace

KvCache::KvCache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t max_len, torch::Device device,
                 torch::ScalarType dtype)
    : n_kv_heads_(n_kv_heads), head_dim_(head_dim), max_len_(max_len), device_(device), dtype_(dtype),
      k_(n_layers), v_(n_layers) {}

void KvCache::grow(int64_t needed) {
  int64_t capacity = std::min(max_len_, std::max({needed, capacity_ * 2, capacity_ + kCacheBlock}));
  auto options = torch::TensorOptions().device(device_).dtype(dtype_);
  for (size_t l = 0; l < k_.size(); ++l) {
    auto k = torch::empty({n_kv_heads_, capacity, head_dim_}, options);
    auto v = torch::empty({n_kv_heads_, capacity, head_dim_}, options);
    if (capacity_ > 0) {
      k.narrow(1, 0, capacity_).copy_(k_[l]);
      v.narrow(1, 0, capacity_).copy_(v_[l]);
    }
    k_[l] = k;
    v_[l] = v;
  }
  capacity_ = capacity;
}

void KvCache::reserve(int64_t len) {
  if (len > capacity_) grow(len);
}

void KvCache::append(int64_t layer, int64_t pos, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t T = k.size(1);
  reserve(pos + T);
  k_[layer].narrow(1, pos, T).copy_(k);
  v_[layer].narrow(1, pos, T).copy_(v);
}

torch::Tensor KvCache::keys(int64_t layer, int64_t len) const { return k_[layer].narrow(1, 0, len); }
torch::Tensor KvCache::values(int64_t layer, int64_t len) const { return v_[layer].narrow(1, 0, len); }

int64_t KvCache::bytes() const {
  return 2 * static_cast<int64_t>(k_.size()) * n_kv_heads_ * capacity_ * head_dim_ * torch::elementSize(dtype_);
}

torch::Tensor rope_inverse_frequencies(const ModelConfig& c) {
  const int64_t hd = c.head_dim();
  // float32 throughout, as llama2.c computes it, so greedy ids match it exactly.
  auto exponents = torch::arange(0, hd, 2, torch::kFloat32) / static_cast<float>(hd);
  auto inv_freq = 1.0f / torch::pow(static_cast<float>(c.rope_theta), exponents);
  if (!c.has_rope_scaling) return inv_freq;
  const auto& s = c.rope_scaling;
  const double old_len = static_cast<double>(s.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / s.low_freq_factor;
  const double high_freq_wavelen = old_len / s.high_freq_factor;
  auto acc = inv_freq.accessor<float, 1>();
  for (int64_t i = 0; i < inv_freq.size(0); ++i) {
    const double freq = acc[i];
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_freq_wavelen) continue;
    if (wavelen > low_freq_wavelen) {
      acc[i] = static_cast<float>(freq / s.factor);
    } else {
      const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      acc[i] = static_cast<float>((1 - smooth) * freq / s.factor + smooth * freq);
    }
  }
  return inv_freq;
}

ModelChunk::ModelChunk(ModelConfig config, ChunkSpec spec, ChunkWeights weights, torch::Device device, torch::ScalarType dtype)
    : config_(std::move(config)), spec_(spec), weights_(std::move(weights)), device_(device), dtype_(dtype),
      act_dtype_(device.is_cpu() ? torch::kFloat32 : dtype), cpu_kernels_(device.is_cpu()) {
  auto positions = torch::arange(config_.max_seq_len, torch::kFloat32);
  auto angles = torch::outer(positions, rope_inverse_frequencies(config_));
  rope_cos_ = torch::cos(angles).to(device_);
  rope_sin_ = torch::sin(angles).to(device_);
}

KvCache ModelChunk::new_cache() const {
  return KvCache(spec_.layers.size(), config_.n_kv_heads, config_.head_dim(), config_.max_seq_len, device_, act_dtype_);
}

void ModelChunk::enable_training() {
  if (training_) return;
  // Copies made outside InferenceMode are tensors autograd may record; a tied head stays the embedding.
  const bool tied = weights_.lm_head.defined() && weights_.lm_head.is_same(weights_.embedding);
  auto own = [](torch::Tensor& t) {
    if (t.defined()) t = t.clone();
  };
  own(weights_.embedding);
  for (auto& w : weights_.layers) own(w.attn_norm), own(w.wqkv), own(w.wo), own(w.ffn_norm), own(w.w_gate_up), own(w.w_down);
  own(weights_.final_norm);
  if (tied) weights_.lm_head = weights_.embedding;
  else own(weights_.lm_head);
  own(rope_cos_), own(rope_sin_);
  cpu_kernels_ = false;
  training_ = true;
}

int64_t ModelChunk::parameter_bytes() const {
  int64_t bytes = 0;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined()) bytes += t.numel() * t.element_size();
  };
  add(weights_.embedding);
  add(weights_.final_norm);
  if (!(config_.tied_embeddings && weights_.embedding.defined())) add(weights_.lm_head);
  for (auto& w : weights_.layers) {
    add(w.attn_norm), add(w.wqkv), add(w.wo), add(w.ffn_norm), add(w.w_gate_up), add(w.w_down);
  }
  return bytes;
}

// ---------------------------------------------------------------------------
// the steps of the forward pass

// x as the kernels take it: contiguous, in the activation dtype, on the device.
torch::Tensor ModelChunk::activations(const torch::Tensor& x) const {
  if (x.device() == device_ && x.scalar_type() == act_dtype_ && x.is_contiguous()) return x;
  return x.to(device_, act_dtype_).contiguous();
}

// ids (T) → rows of the embedding (T, dim)
torch::Tensor ModelChunk::embed(const torch::Tensor& ids) const {
  if (!cpu_kernels_) return weights_.embedding.index_select(0, ids.to(device_, torch::kLong));
  auto idx = ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.is_cpu() ? ids : ids.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t T = idx.size(0), dim = config_.dim;
  auto out = torch::empty({T, dim}, torch::kFloat32);
  with_weight_type(weights_.embedding, [&](auto* table) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = idx.data_ptr<int64_t>()[t];
      if (id < 0 || id >= config_.vocab_size)
        throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(config_.vocab_size));
      std::copy(table + id * dim, table + (id + 1) * dim, out.data_ptr<float>() + t * dim);
    }
  });
  return out;
}

torch::Tensor ModelChunk::rms_norm(const torch::Tensor& x, const torch::Tensor& weight) const {
  if (!cpu_kernels_) {
    auto xf = x.to(torch::kFloat32);
    auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + config_.norm_eps);
    return normed.to(dtype_) * weight;
  }
  auto out = torch::empty_like(x);
  with_weight_type(weight, [&](auto* w) {
    rms_norm_kernel(x.data_ptr<float>(), x.size(0), x.size(1), w, static_cast<float>(config_.norm_eps), out.data_ptr<float>());
  });
  return out;
}

// x (T, in) · w (out, in)ᵀ → (T, out). On CPU the streaming kernel reads w once and
// gives each row the same arithmetic whatever its neighbours, so a micro-batch changes
// no sample's numbers; float32 weights with more rows than that (long prompts) take
// BLAS's matrix product.
static bool blas_rows(const torch::Tensor& x, const torch::Tensor& w) {
  return x.size(0) > kBatchInvariantRows && w.scalar_type() == torch::kFloat32;
}

torch::Tensor ModelChunk::project(const torch::Tensor& x, const torch::Tensor& w) const {
  if (!cpu_kernels_) return aten_project(x, w);
  if (blas_rows(x, w)) return torch::linear(x, w);
  auto y = torch::empty({x.size(0), w.size(0)}, torch::kFloat32);
  with_weight_type(w, [&](auto* wp) { linear_kernel(x.data_ptr<float>(), x.size(0), wp, w.size(1), w.size(0), nullptr, y.data_ptr<float>()); });
  return y;
}

// residual + x · wᵀ, as a new tensor (a hook may hold on to the residual it saw)
torch::Tensor ModelChunk::residual_project(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w) const {
  if (!cpu_kernels_) return residual + aten_project(x, w);
  if (blas_rows(x, w)) return torch::addmm(residual, x, w.t());
  auto y = torch::empty({x.size(0), w.size(0)}, torch::kFloat32);
  with_weight_type(w, [&](auto* wp) {
    linear_kernel(x.data_ptr<float>(), x.size(0), wp, w.size(1), w.size(0), residual.data_ptr<float>(), y.data_ptr<float>());
  });
  return y;
}

torch::Tensor ModelChunk::attention(const torch::Tensor& qkv, const std::vector<SequenceSpan>& spans, int64_t layer) const {
  auto out = torch::empty({qkv.size(0), config_.dim}, qkv.options());
  if (spans.size() == 1) {  // no views to make: a decode step of a tiny model is a few µs
    span_attention(qkv, *spans[0].cache, layer, spans[0].start_pos, out);
    return out;
  }
  int64_t row = 0;
  for (const SequenceSpan& span : spans) {
    span_attention(qkv.narrow(0, row, span.n_tokens), *span.cache, layer, span.start_pos, out.narrow(0, row, span.n_tokens));
    row += span.n_tokens;
  }
  return out;
}

// qkv (T, dim + 2 * kv_dim) of one sample → RoPE on q and k, k and v into its cache,
// attention of the T queries over the cache → out (T, dim)
void ModelChunk::span_attention(const torch::Tensor& qkv, KvCache& cache, int64_t layer, int64_t start_pos, torch::Tensor out) const {
  const int64_t T = qkv.size(0), dim = config_.dim, kv_dim = config_.kv_dim(), hd = config_.head_dim();
  const int64_t n_kv = config_.n_kv_heads, group = config_.n_heads / n_kv, len = start_pos + T;
  if (cpu_kernels_) {
    float* p = qkv.data_ptr<float>();
    const int64_t stride = qkv.size(1), capacity = cache.capacity();
    rope_kernel(p, T, stride, config_.n_heads + n_kv, hd, start_pos, rope_cos_.data_ptr<float>(), rope_sin_.data_ptr<float>());
    float* keys = cache.key_buffer(layer).data_ptr<float>();
    float* values = cache.value_buffer(layer).data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < n_kv; ++h) {
        const float* k = p + t * stride + dim + h * hd;
        std::copy(k, k + hd, keys + (h * capacity + start_pos + t) * hd);
        std::copy(k + kv_dim, k + kv_dim + hd, values + (h * capacity + start_pos + t) * hd);
      }
    attention_kernel(p, stride, keys, values, capacity, T, start_pos, config_.n_heads, n_kv, hd, out.data_ptr<float>());
    return;
  }

  auto q = qkv.narrow(1, 0, dim).view({T, config_.n_heads, hd});
  auto k = qkv.narrow(1, dim, kv_dim).view({T, n_kv, hd});
  auto v = qkv.narrow(1, dim + kv_dim, kv_dim).view({T, n_kv, hd});
  // RoPE at the sample's positions
  auto cos = rope_cos_.narrow(0, start_pos, T).unsqueeze(1).to(dtype_);
  auto sin = rope_sin_.narrow(0, start_pos, T).unsqueeze(1).to(dtype_);
  q = aten_rope(q, cos, sin);
  k = aten_rope(k, cos, sin);
  cache.append(layer, start_pos, k.transpose(0, 1), v.transpose(0, 1));
  auto keys = cache.keys(layer, len).unsqueeze(1);      // (n_kv, 1, len, hd)
  auto values = cache.values(layer, len).unsqueeze(1);  // (n_kv, 1, len, hd)
  // grouped-query attention: the `group` query heads of a kv head share its keys
  auto qg = q.view({T, n_kv, group, hd}).permute({1, 2, 0, 3});  // (n_kv, group, T, hd)
  auto scores = torch::matmul(qg, keys.transpose(-1, -2)).to(torch::kFloat32) / std::sqrt(static_cast<double>(hd));
  if (T > 1) {
    // query i sits at position start_pos + i and sees keys up to there
    auto future = torch::ones({T, len}, torch::TensorOptions().dtype(torch::kBool).device(device_)).triu(start_pos + 1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(scores, -1).to(dtype_);
  out.copy_(torch::matmul(probs, values).permute({2, 0, 1, 3}).reshape({T, dim}));
}

// gate_up (T, 2 * hidden) → silu(gate) * up (T, hidden)
torch::Tensor ModelChunk::swiglu(const torch::Tensor& gate_up) const {
  if (!cpu_kernels_) {
    auto halves = gate_up.chunk(2, -1);
    return torch::silu(halves[0]) * halves[1];
  }
  const int64_t T = gate_up.size(0), hidden = gate_up.size(1) / 2;
  auto out = torch::empty({T, hidden}, torch::kFloat32);
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hidden; ++i) {
      const float gate = g[t * 2 * hidden + i];
      o[t * hidden + i] = gate * (1.0f / (1.0f + std::exp(-gate))) * g[t * 2 * hidden + hidden + i];
    }
  return out;
}

torch::Tensor ModelChunk::residual_stream(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const {
  c10::InferenceMode inference(!training_);
  int64_t rows = 0;
  for (const SequenceSpan& span : spans) {
    if (span.start_pos < 0 || span.start_pos + span.n_tokens > config_.max_seq_len)
      throw ContextLengthError("positions " + std::to_string(span.start_pos) + ".." + std::to_string(span.start_pos + span.n_tokens - 1) +
                               " pass the model's context length " + std::to_string(config_.max_seq_len));
    if (span.n_tokens < 1 || !span.cache) throw std::invalid_argument("a sequence span needs a cache and at least one token");
    rows += span.n_tokens;
  }
  if (spans.empty() || rows != input.size(0))
    throw std::invalid_argument("the batch has " + std::to_string(input.size(0)) + " rows but its spans cover " + std::to_string(rows));

  // residual stream (rows, dim), in the activation dtype
  torch::Tensor x = spec_.embedding ? embed(input) : activations(input);
  if (spec_.embedding) apply_hooks(kEmbedLayer, x, spans);
  for (const SequenceSpan& span : spans) span.cache->reserve(span.start_pos + span.n_tokens);
  for (int64_t l = 0; l < spec_.layers.size(); ++l) {
    const LayerWeights& w = weights_.layers[l];
    // attention block: fused q/k/v projection, RoPE, cache append, attention over the cache; residual
    auto qkv = project(rms_norm(x, w.attn_norm), w.wqkv);
    x = residual_project(x, attention(qkv, spans, l), w.wo);
    // SwiGLU feed-forward block: fused gate/up projection; residual
    auto gate_up = project(rms_norm(x, w.ffn_norm), w.w_gate_up);
    x = residual_project(x, swiglu(gate_up), w.w_down);
    apply_hooks(spec_.layers.begin + l, x, spans);
  }
  return x;
}

// Each span's hook sees its own rows. A hook that replaces its rows (an intervention)
// gets them written back into a copy of the batch: the hooks before it may hold the original.
void ModelChunk::apply_hooks(int64_t layer, torch::Tensor& x, const std::vector<SequenceSpan>& spans) const {
  if (spans.size() == 1) {
    if (spans[0].hook) spans[0].hook(layer, x), x = activations(x);
    return;
  }
  bool copied = false;
  int64_t row = 0;
  for (const SequenceSpan& span : spans) {
    if (span.hook) {
      auto rows = x.narrow(0, row, span.n_tokens);
      const auto seen = rows;
      span.hook(layer, rows);
      if (!rows.is_same(seen)) {
        if (!copied) x = x.clone(), copied = true;
        x.narrow(0, row, span.n_tokens).copy_(rows);
      }
    }
    row += span.n_tokens;
  }
}

torch::Tensor ModelChunk::run_layers(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const {
  torch::Tensor x = residual_stream(input, spans);
  c10::InferenceMode inference(!training_);
  return x.scalar_type() == dtype_ ? x : x.to(dtype_);
}

torch::Tensor ModelChunk::run_layers(const torch::Tensor& input, KvCache& cache, int64_t start_pos, const LayerHook& hook) const {
  return run_layers(input, {{&cache, start_pos, input.size(0), hook}});
}

torch::Tensor ModelChunk::run_head(const torch::Tensor& hidden, bool last_only) const {
  c10::InferenceMode inference(!training_);
  torch::Tensor x = activations(hidden);
  if (last_only && x.size(0) > 1) x = x.narrow(0, x.size(0) - 1, 1).contiguous();
  auto logits = project(rms_norm(x, weights_.final_norm), weights_.lm_head);
  return logits.scalar_type() == torch::kFloat32 ? logits : logits.to(torch::kFloat32);
}

torch::Tensor ModelChunk::forward(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const {
  if (!spec_.head) return run_layers(input, spans);
  // the residual stream goes to the head as it is, not through the chunk boundary's dtype
  torch::Tensor x = residual_stream(input, spans);
  c10::InferenceMode inference(!training_);
  return run_head(last_rows(x, spans), false);
}

torch::Tensor ModelChunk::forward(const torch::Tensor& input, KvCache& cache, int64_t start_pos, bool last_only,
                                  const LayerHook& hook) const {
  const std::vector<SequenceSpan> spans{{&cache, start_pos, input.size(0), hook}};
  if (spec_.head) return run_head(residual_stream(input, spans), last_only);
  return run_layers(input, spans);
}

std::vector<std::vector<size_t>> pack_micro_batches(const std::vector<int64_t>& rows, size_t max_samples) {
  std::vector<std::vector<size_t>> batches;
  int64_t batch_rows = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const bool fits = !batches.empty() && batches.back().size() < std::max<size_t>(1, max_samples) &&
                      batch_rows + rows[i] <= kBatchInvariantRows;
    if (!fits) batches.emplace_back(), batch_rows = 0;
    batches.back().push_back(i);
    batch_rows += rows[i];
  }
  return batches;
}

torch::Device parse_device(const std::string& text) {
  try {
    torch::Device device(text);
    if (device.is_cuda() && !torch::cuda::is_available())
      throw std::invalid_argument("device \"" + text + "\": this LibTorch build or machine has no CUDA; use --device cpu");
    return device;
  } catch (const c10::Error&) {
    throw std::invalid_argument("device \"" + text + "\" is not one of cpu, cuda, cuda:N");
  }
}

torch::ScalarType parse_dtype(const std::string& text) {
  if (text == "float32" || text == "fp32" || text == "f32") return torch::kFloat32;
  if (text == "bfloat16" || text == "bf16") return torch::kBFloat16;
  if (text == "float16" || text == "fp16" || text == "f16") return torch::kFloat16;
  throw std::invalid_argument("dtype \"" + text + "\" is not one of float32, bfloat16, float16");
}

std::string dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "float32";
    case torch::kBFloat16: return "bfloat16";
    case torch::kFloat16: return "float16";
    default: return c10::toString(dtype);
  }
}

torch::ScalarType default_dtype(const torch::Device& device) { return device.is_cuda() ? torch::kBFloat16 : torch::kFloat32; }

}  // namespace mdi
