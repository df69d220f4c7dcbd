#pragma once
// The blueprint of a Llama model: sizes, norms, rotary settings, special tokens.
// Read from and written to Hugging Face `config.json` field names, so a
// converted model directory is a valid HF checkpoint.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace mdi {

struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Llama 3.1 frequency-dependent RoPE scaling ("rope_type": "llama3").
struct RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  int64_t dim = 0;            // hidden_size
  int64_t hidden_dim = 0;     // intermediate_size (SwiGLU width)
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;    // max_position_embeddings
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool has_rope_scaling = false;
  RopeScaling rope_scaling;
  bool tied_embeddings = false;
  int64_t bos_token_id = 1;
  std::vector<int64_t> stop_token_ids{2};  // any of these ends a sample

  int64_t head_dim() const { return dim / n_heads; }
  int64_t kv_dim() const { return n_kv_heads * head_dim(); }
  bool is_stop_token(int64_t id) const;

  // Throws ConfigError naming the first inconsistent field.
  void validate() const;

  // Hugging Face config.json (LlamaForCausalLM). `where` names the source in errors.
  static ModelConfig from_hf_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_hf_json() const;

  // Parameter count of the full model (embedding, layers, norm, head unless tied).
  int64_t parameter_count() const;
  bool operator==(const ModelConfig& other) const;
};

}  // namespace mdi
