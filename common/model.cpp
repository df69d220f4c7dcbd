#include "common/model.hpp"

#include <cmath>

namespace mdi {

namespace {
// Cache capacity grows in blocks of this many positions (or doubles, whichever
// is more), so appends rarely reallocate and short samples stay small.
constexpr int64_t kCacheBlock = 256;

// x: (T, in) · w: (out, in)ᵀ. One token takes the matrix-vector kernel, which
// reads the weights faster than the general matrix product does.
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w) {
  if (x.size(0) == 1) return torch::mv(w, x[0]).unsqueeze(0);
  return torch::linear(x, w);
}

// Half-split rotary embedding: the first half of each head pairs with the second.
// t: (T, heads, head_dim); cos, sin: (T, 1, head_dim / 2)
torch::Tensor apply_rope(const torch::Tensor& t, const torch::Tensor& cos, const torch::Tensor& sin) {
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

void KvCache::append(int64_t layer, int64_t pos, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t T = k.size(1);
  if (pos + T > capacity_) grow(pos + T);
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
    : config_(std::move(config)), spec_(spec), weights_(std::move(weights)), device_(device), dtype_(dtype) {
  auto positions = torch::arange(config_.max_seq_len, torch::kFloat32);
  auto angles = torch::outer(positions, rope_inverse_frequencies(config_));
  rope_cos_ = torch::cos(angles).to(device_);
  rope_sin_ = torch::sin(angles).to(device_);
}

KvCache ModelChunk::new_cache() const {
  return KvCache(spec_.layers.size(), config_.n_kv_heads, config_.head_dim(), config_.max_seq_len, device_, dtype_);
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

torch::Tensor ModelChunk::rms_norm(const torch::Tensor& x, const torch::Tensor& weight) const {
  auto xf = x.to(torch::kFloat32);
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + config_.norm_eps);
  return normed.to(dtype_) * weight;
}

torch::Tensor ModelChunk::attention(const LayerWeights& w, const torch::Tensor& x, KvCache& cache, int64_t layer,
                                    int64_t start_pos) const {
  const int64_t T = x.size(0), dim = config_.dim, kv_dim = config_.kv_dim(), hd = config_.head_dim();
  const int64_t n_kv = config_.n_kv_heads, group = config_.n_heads / n_kv, len = start_pos + T;

  // q, k, v projections, one matmul
  auto qkv = project(x, w.wqkv);
  auto q = qkv.narrow(1, 0, dim).view({T, config_.n_heads, hd});
  auto k = qkv.narrow(1, dim, kv_dim).view({T, n_kv, hd});
  auto v = qkv.narrow(1, dim + kv_dim, kv_dim).view({T, n_kv, hd});

  // RoPE at the sample's positions
  auto cos = rope_cos_.narrow(0, start_pos, T).unsqueeze(1).to(dtype_);
  auto sin = rope_sin_.narrow(0, start_pos, T).unsqueeze(1).to(dtype_);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);

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
  auto out = torch::matmul(probs, values).permute({2, 0, 1, 3}).reshape({T, dim});
  return project(out, w.wo);
}

torch::Tensor ModelChunk::run_layers(const torch::Tensor& input, KvCache& cache, int64_t start_pos, const LayerHook& hook) const {
  c10::InferenceMode inference;
  const int64_t T = input.size(0);
  if (start_pos < 0 || start_pos + T > config_.max_seq_len)
    throw ContextLengthError("positions " + std::to_string(start_pos) + ".." + std::to_string(start_pos + T - 1) +
                             " pass the model's context length " + std::to_string(config_.max_seq_len));

  torch::Tensor x = spec_.embedding ? weights_.embedding.index_select(0, input.to(device_, torch::kLong))
                                    : input.to(device_, dtype_);
  if (hook && spec_.embedding) hook(kEmbeddingLayer, x);
  for (int64_t l = 0; l < spec_.layers.size(); ++l) {
    const LayerWeights& w = weights_.layers[l];
    // attention block, residual
    x = x + attention(w, rms_norm(x, w.attn_norm), cache, l, start_pos);
    // SwiGLU feed-forward block, residual
    auto gate_up = project(rms_norm(x, w.ffn_norm), w.w_gate_up).chunk(2, -1);
    x = x + project(torch::silu(gate_up[0]) * gate_up[1], w.w_down);
    if (hook) hook(spec_.layers.begin + l, x);
  }
  return x;
}

torch::Tensor ModelChunk::run_head(const torch::Tensor& hidden, bool last_only) const {
  c10::InferenceMode inference;
  torch::Tensor x = hidden.to(device_, dtype_);
  if (last_only) x = x.narrow(0, x.size(0) - 1, 1);
  return project(rms_norm(x, weights_.final_norm), weights_.lm_head).to(torch::kFloat32);
}

torch::Tensor ModelChunk::forward(const torch::Tensor& input, KvCache& cache, int64_t start_pos, bool last_only,
                                  const LayerHook& hook) const {
  torch::Tensor hidden = run_layers(input, cache, start_pos, hook);
  return spec_.head ? run_head(hidden, last_only) : hidden;
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
