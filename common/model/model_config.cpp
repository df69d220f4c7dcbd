#include "common/model/model_config.hpp"

#include <nlohmann/json.hpp>

namespace mdi {

bool ModelConfig::is_stop_token(int64_t id) const {
  for (auto s : stop_token_ids)
    if (s == id) return true;
  return false;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* name) {
    if (v <= 0) throw ConfigError(std::string("model config: ") + name + " must be positive, got " + std::to_string(v));
  };
  positive(dim, "hidden_size");
  positive(hidden_dim, "intermediate_size");
  positive(n_layers, "num_hidden_layers");
  positive(n_heads, "num_attention_heads");
  positive(n_kv_heads, "num_key_value_heads");
  positive(vocab_size, "vocab_size");
  positive(max_seq_len, "max_position_embeddings");
  if (dim % n_heads != 0)
    throw ConfigError("model config: hidden_size " + std::to_string(dim) + " is not a multiple of num_attention_heads " +
                      std::to_string(n_heads));
  if (n_heads % n_kv_heads != 0)
    throw ConfigError("model config: num_attention_heads " + std::to_string(n_heads) +
                      " is not a multiple of num_key_value_heads " + std::to_string(n_kv_heads));
  if (head_dim() % 2 != 0) throw ConfigError("model config: head dimension " + std::to_string(head_dim()) + " is odd; RoPE needs pairs");
  if (!(norm_eps > 0)) throw ConfigError("model config: rms_norm_eps must be positive");
  if (!(rope_theta > 0)) throw ConfigError("model config: rope_theta must be positive");
  if (has_rope_scaling && !(rope_scaling.factor > 0 && rope_scaling.low_freq_factor > 0 &&
                            rope_scaling.high_freq_factor > rope_scaling.low_freq_factor &&
                            rope_scaling.original_max_position_embeddings > 0))
    throw ConfigError("model config: rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                      "original_max_position_embeddings > 0");
}

static int64_t required_int(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key)) throw ConfigError(where + ": missing required field \"" + key + "\"");
  if (!j[key].is_number_integer()) throw ConfigError(where + ": field \"" + key + "\" must be an integer");
  return j[key].get<int64_t>();
}

static int64_t optional_int(const nlohmann::json& j, const char* key, int64_t fallback, const std::string& where) {
  return j.contains(key) ? required_int(j, key, where) : fallback;
}

// nlohmann's value() would throw its own type_error on a string where a number belongs,
// which names neither the file nor the field.
static double optional_number(const nlohmann::json& j, const char* key, double fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  if (!j[key].is_number()) throw ConfigError(where + ": field \"" + key + "\" must be a number");
  return j[key].get<double>();
}

static bool optional_bool(const nlohmann::json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  if (!j[key].is_boolean()) throw ConfigError(where + ": field \"" + key + "\" must be true or false");
  return j[key].get<bool>();
}

static std::string optional_string(const nlohmann::json& j, const char* key, const std::string& fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  if (!j[key].is_string()) throw ConfigError(where + ": field \"" + key + "\" must be a string");
  return j[key].get<std::string>();
}

ModelConfig ModelConfig::from_hf_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw ConfigError(where + ": expected a JSON object");
  ModelConfig c;
  c.dim = required_int(j, "hidden_size", where);
  c.hidden_dim = required_int(j, "intermediate_size", where);
  c.n_layers = required_int(j, "num_hidden_layers", where);
  c.n_heads = required_int(j, "num_attention_heads", where);
  c.n_kv_heads = optional_int(j, "num_key_value_heads", c.n_heads, where);
  c.vocab_size = required_int(j, "vocab_size", where);
  c.max_seq_len = required_int(j, "max_position_embeddings", where);
  c.norm_eps = optional_number(j, "rms_norm_eps", 1e-5, where);
  c.rope_theta = optional_number(j, "rope_theta", 10000.0, where);
  c.tied_embeddings = optional_bool(j, "tie_word_embeddings", false, where);
  c.bos_token_id = optional_int(j, "bos_token_id", 1, where);
  if (j.contains("eos_token_id")) {
    const auto& eos = j["eos_token_id"];
    c.stop_token_ids.clear();
    for (const auto& e : eos.is_array() ? eos : nlohmann::json::array({eos})) {
      if (!e.is_number_integer()) throw ConfigError(where + ": eos_token_id must be an integer or a list of integers");
      c.stop_token_ids.push_back(e.get<int64_t>());
    }
  }
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    const auto& rs = j["rope_scaling"];
    const std::string scaling = where + ": rope_scaling";
    const std::string type = optional_string(rs, "rope_type", optional_string(rs, "type", "", scaling), scaling);
    if (type != "llama3")
      throw ConfigError(where + ": rope_scaling type \"" + type + "\" is not supported (only \"llama3\")");
    c.has_rope_scaling = true;
    c.rope_scaling.factor = optional_number(rs, "factor", 8.0, scaling);
    c.rope_scaling.low_freq_factor = optional_number(rs, "low_freq_factor", 1.0, scaling);
    c.rope_scaling.high_freq_factor = optional_number(rs, "high_freq_factor", 4.0, scaling);
    c.rope_scaling.original_max_position_embeddings = optional_int(rs, "original_max_position_embeddings", 8192, scaling);
  }
  try {
    c.validate();
  } catch (const ConfigError& e) {
    throw ConfigError(where + ": " + e.what());
  }
  return c;
}

nlohmann::json ModelConfig::to_hf_json() const {
  nlohmann::json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", dim},
      {"intermediate_size", hidden_dim},
      {"num_hidden_layers", n_layers},
      {"num_attention_heads", n_heads},
      {"num_key_value_heads", n_kv_heads},
      {"vocab_size", vocab_size},
      {"max_position_embeddings", max_seq_len},
      {"rms_norm_eps", norm_eps},
      {"rope_theta", rope_theta},
      {"tie_word_embeddings", tied_embeddings},
      {"hidden_act", "silu"},
      {"bos_token_id", bos_token_id},
  };
  if (stop_token_ids.size() == 1)
    j["eos_token_id"] = stop_token_ids[0];
  else
    j["eos_token_id"] = stop_token_ids;
  if (has_rope_scaling)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  return j;
}

int64_t ModelConfig::parameter_count() const {
  int64_t attn = dim * dim /*q*/ + 2 * dim * kv_dim() /*k,v*/ + dim * dim /*o*/;
  int64_t mlp = 3 * dim * hidden_dim;
  int64_t norms = 2 * dim;
  int64_t per_layer = attn + mlp + norms;
  int64_t embed = vocab_size * dim;
  return embed + n_layers * per_layer + dim /*final norm*/ + (tied_embeddings ? 0 : vocab_size * dim);
}

bool ModelConfig::operator==(const ModelConfig& o) const { return to_hf_json() == o.to_hf_json(); }

}  // namespace mdi
