#include "common/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/model/kernels/cpu_kernels.hpp"

namespace mdi {

namespace {
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

// ---------------------------------------------------------------------------
// ATen versions of the steps, for devices without the CPU kernels

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

KvCache ModelChunk::new_cache(int64_t max_len) const {
  return KvCache(spec_.layers.size(), config_.n_kv_heads, config_.head_dim(), max_len > 0 ? max_len : config_.max_seq_len, device_,
                 act_dtype_);
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
  swiglu_kernel(gate_up.data_ptr<float>(), T, hidden, out.data_ptr<float>());
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
