#pragma once
// The Llama decoder, as one node runs it: a contiguous range of layers,
// optionally preceded by the token embedding (the first node) and followed by
// the final norm and LM head (the last stage). Standalone runs are the chunk
// that holds everything; the same forward() serves every node.
#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/model/kv_cache.hpp"
#include "common/model/layers.hpp"
#include "common/model/model_config.hpp"

namespace mdi {

struct LayerWeights {
  torch::Tensor attn_norm;  // (dim)
  torch::Tensor wqkv;       // (dim + 2 * kv_dim, dim): q, k, v projections fused, half-split RoPE layout
  torch::Tensor wo;         // (dim, dim)
  torch::Tensor ffn_norm;   // (dim)
  torch::Tensor w_gate_up;  // (2 * hidden_dim, dim): gate and up projections fused
  torch::Tensor w_down;     // (dim, hidden_dim)
};

struct ChunkWeights {
  torch::Tensor embedding;           // (vocab, dim), when the chunk holds the embedding
  std::vector<LayerWeights> layers;  // one per layer of the range
  torch::Tensor final_norm;          // (dim), when the chunk holds the head
  torch::Tensor lm_head;             // (vocab, dim); the embedding itself when tied
};

// Sees, and may change, the residual stream (T, dim) of one forward pass: after
// the embedding (layer kEmbedLayer) and after each layer (global index).
// It is in the chunk's activation dtype (float32 on CPU, the weights' dtype elsewhere).
// Capture and interventions hook in here, on whichever node holds the layer.
using LayerHook = std::function<void(int64_t layer, torch::Tensor& hidden)>;

struct ContextLengthError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One sample's part of a micro-batch: n_tokens consecutive rows, at positions
// start_pos.., with the sample's own cache and hook. The samples of a batch share
// each weight read and nothing else: no padding, no shared cache. On CPU each row's
// arithmetic is the same whatever else is in the batch, up to kBatchInvariantRows rows.
struct SequenceSpan {
  KvCache* cache = nullptr;
  int64_t start_pos = 0;
  int64_t n_tokens = 0;
  LayerHook hook;  // may be empty
};
inline constexpr int64_t kBatchInvariantRows = 32;

// Packs samples, in order, into micro-batches of at most `max_samples` samples and
// kBatchInvariantRows rows; a sample with more rows than that (a long prompt) goes
// alone. rows[i]: the rows of sample i. Returns the indices into `rows` of each batch.
std::vector<std::vector<size_t>> pack_micro_batches(const std::vector<int64_t>& rows, size_t max_samples);

class ModelChunk {
 public:
  ModelChunk(ModelConfig config, ChunkSpec spec, ChunkWeights weights, torch::Device device, torch::ScalarType dtype);

  // input: token ids (T) int64 when the chunk holds the embedding, else hidden states (T, dim).
  // Positions start_pos .. start_pos + T - 1. Returns logits (T, vocab) float32 when the chunk
  // holds the head (only the last row when last_only), else hidden states (T, dim).
  torch::Tensor forward(const torch::Tensor& input, KvCache& cache, int64_t start_pos, bool last_only = true,
                        const LayerHook& hook = nullptr) const;

  // The two halves of forward(), for the starter, whose ring passes through the
  // secondaries between them: embedding (if held) and layers → hidden (T, dim);
  // and hidden (T, dim) → final norm and head → logits float32.
  torch::Tensor run_layers(const torch::Tensor& input, KvCache& cache, int64_t start_pos, const LayerHook& hook = nullptr) const;
  torch::Tensor run_head(const torch::Tensor& hidden, bool last_only = true) const;

  // A micro-batch: input holds the spans' rows one after the other (ids, or hidden
  // states (rows, dim)). forward() returns the logits of each span's last row
  // (spans, vocab) when the chunk holds the head, else hidden states (rows, dim).
  torch::Tensor forward(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const;
  torch::Tensor run_layers(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const;

  // A cache for one sequence of at most `max_len` positions (0: the model's context).
  KvCache new_cache(int64_t max_len = 0) const;

  // Training mode: every step takes the ATen path, outside InferenceMode, so autograd
  // records the same forward that inference runs. The weights become ordinary tensors
  // (load_chunk makes inference tensors) that a trainer may mark to require gradients
  // and update in place. One way: load the chunk again for inference.
  void enable_training();

  const ModelConfig& config() const { return config_; }
  const ChunkSpec& spec() const { return spec_; }
  torch::Device device() const { return device_; }
  // The weights' dtype: what hidden states in and out of the chunk carry.
  torch::ScalarType dtype() const { return dtype_; }
  // What the residual stream and the KV caches hold inside: float32 on CPU, where
  // the weights may be bf16 or f16 and every product accumulates in float32; dtype() elsewhere.
  torch::ScalarType activation_dtype() const { return act_dtype_; }
  int64_t parameter_bytes() const;
  const ChunkWeights& weights() const { return weights_; }

 private:
  // One step each of the forward pass. On CPU they run the fused float32 kernels
  // of kernels/cpu_kernels.hpp; elsewhere ATen ops.
  torch::Tensor activations(const torch::Tensor& x) const;
  // run_layers() without the conversion to dtype() at the end: (T, dim) in the activation dtype.
  torch::Tensor residual_stream(const torch::Tensor& input, const std::vector<SequenceSpan>& spans) const;
  void apply_hooks(int64_t layer, torch::Tensor& x, const std::vector<SequenceSpan>& spans) const;
  torch::Tensor embed(const torch::Tensor& ids) const;
  torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight) const;
  torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w) const;
  torch::Tensor residual_project(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w) const;
  // The spans' attention, each over its own cache: qkv (rows, dim + 2 * kv_dim) → (rows, dim).
  torch::Tensor attention(const torch::Tensor& qkv, const std::vector<SequenceSpan>& spans, int64_t layer) const;
  void span_attention(const torch::Tensor& qkv, KvCache& cache, int64_t layer, int64_t start_pos, torch::Tensor out) const;
  torch::Tensor swiglu(const torch::Tensor& gate_up) const;

  ModelConfig config_;
  ChunkSpec spec_;
  ChunkWeights weights_;
  torch::Device device_;
  torch::ScalarType dtype_, act_dtype_;
  bool cpu_kernels_;                   // device is the CPU and not training: the fused kernels run
  bool training_ = false;
  torch::Tensor rope_cos_, rope_sin_;  // (max_seq_len, head_dim / 2), float32
};

// Each span's last row of a batch's rows (spans, dim): the rows the next tokens come from.
// A span is anything with n_tokens: a SequenceSpan, or a frame's BatchSegment.
template <class Span>
torch::Tensor last_rows(const torch::Tensor& rows, const std::vector<Span>& spans) {
  if (static_cast<int64_t>(spans.size()) == rows.size(0)) return rows;  // one row each: decode steps
  if (spans.size() == 1) return rows.narrow(0, rows.size(0) - 1, 1);
  std::vector<int64_t> index;
  int64_t row = 0;
  for (const Span& span : spans) index.push_back((row += span.n_tokens) - 1);
  return rows.index_select(0, torch::tensor(index, torch::kLong).to(rows.device()));
}

// Rotary inverse frequencies (head_dim / 2), with Llama 3.1 scaling when the config has it.
torch::Tensor rope_inverse_frequencies(const ModelConfig& config);

// "cpu", "cuda", "cuda:1"; throws std::invalid_argument naming the value.
torch::Device parse_device(const std::string& text);
// "float32" | "bfloat16" | "float16" (also fp32/bf16/fp16).
torch::ScalarType parse_dtype(const std::string& text);
std::string dtype_name(torch::ScalarType dtype);
// float32 on CPU, bfloat16 on CUDA.
torch::ScalarType default_dtype(const torch::Device& device);

}  // namespace mdi
