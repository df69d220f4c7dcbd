#include "common/wire/init_request.hpp"

#include <algorithm>
#include <cctype>
#include <type_traits>

#include "common/wire/json_excerpt.hpp"

namespace mdi {

namespace {
const nlohmann::json& field(const nlohmann::json& j, const char* name) {
  if (!j.contains(name)) throw InitRequestError(std::string("/init: missing field \"") + name + "\"");
  return j[name];
}

template <typename T>
T typed(const nlohmann::json& j, const char* name) {
  const auto& v = field(j, name);
  // nlohmann converts a float to an integer with a plain cast: undefined out of range.
  if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer() || (std::is_unsigned_v<T> && !v.is_number_unsigned()))
      throw InitRequestError(std::string("/init: field \"") + name + "\" must be a" + (std::is_unsigned_v<T> ? " non-negative" : "n") +
                             " integer, got " + json_excerpt(v));
  }
  try {
    return v.get<T>();
  } catch (const nlohmann::json::exception&) {
    throw InitRequestError(std::string("/init: field \"") + name + "\" has the wrong type (" + v.type_name() + ")");
  }
}

bool is_hex_sha256(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}
}  // namespace

nlohmann::json InitRequest::to_json() const {
  nlohmann::json j = {{"run_id", run_id},
          {"ring_index", ring_index},
          {"nodes_config", nodes_json},
          {"model", model.to_hf_json()},
          {"layers", {layer_begin, layer_end}},
          {"dtype", dtype},
          {"device", device},
          {"max_seq_len", max_seq_len},
          {"max_frame_bytes", max_frame_bytes},
          {"chunk", {{"sha256", chunk_sha256}, {"path", chunk_path}, {"bytes", chunk_bytes}}}};
  if (lease_ms) j["lease_ms"] = lease_ms;
  if (!interpretability.empty()) j["interpretability"] = interpretability.to_json();
  if (training) j["training"] = training->to_json();
  return j;
}

InitRequest InitRequest::parse(const nlohmann::json& j) {
  if (!j.is_object()) throw InitRequestError("/init: the body must be a JSON object");
  InitRequest r;
  r.run_id = typed<uint64_t>(j, "run_id");
  r.ring_index = typed<size_t>(j, "ring_index");
  try {
    r.nodes_json = field(j, "nodes_config");
    r.nodes = parse_nodes_config(r.nodes_json, "/init nodes_config");
    r.model = ModelConfig::from_hf_json(field(j, "model"), "/init model");
  } catch (const ConfigError& e) {
    throw InitRequestError(e.what());
  }
  if (r.ring_index < 1 || r.ring_index >= r.nodes.n_nodes())
    throw InitRequestError("/init: ring_index " + std::to_string(r.ring_index) + " is not a secondary of a ring of " +
                           std::to_string(r.nodes.n_nodes()) + " nodes");
  const auto& layers = field(j, "layers");
  if (!layers.is_array() || layers.size() != 2 || !layers[0].is_number_integer() || !layers[1].is_number_integer())
    throw InitRequestError("/init: \"layers\" must be [begin, end]");
  r.layer_begin = layers[0].get<int64_t>();
  r.layer_end = layers[1].get<int64_t>();
  if (r.layer_begin < 0 || r.layer_begin >= r.layer_end || r.layer_end > r.model.n_layers)
    throw InitRequestError("/init: layer range [" + std::to_string(r.layer_begin) + ", " + std::to_string(r.layer_end) +
                           ") is impossible for a model of " + std::to_string(r.model.n_layers) + " layers");
  r.dtype = typed<std::string>(j, "dtype");
  if (r.dtype != "float32" && r.dtype != "bfloat16" && r.dtype != "float16")
    throw InitRequestError("/init: dtype \"" + r.dtype + "\" is not one of float32, bfloat16, float16");
  r.device = j.contains("device") ? typed<std::string>(j, "device") : std::string();
  r.max_seq_len = typed<int64_t>(j, "max_seq_len");
  if (r.max_seq_len < 1 || r.max_seq_len > r.model.max_seq_len)
    throw InitRequestError("/init: max_seq_len " + std::to_string(r.max_seq_len) + " is outside 1.." + std::to_string(r.model.max_seq_len));
  r.max_frame_bytes = j.contains("max_frame_bytes") ? typed<uint64_t>(j, "max_frame_bytes") : r.nodes.max_frame_bytes;
  if (r.max_frame_bytes != 0) r.nodes.max_frame_bytes = std::min(r.nodes.max_frame_bytes, r.max_frame_bytes);
  r.lease_ms = j.contains("lease_ms") ? typed<uint64_t>(j, "lease_ms") : 0;
  if (r.lease_ms != 0 && (r.lease_ms < 500 || r.lease_ms > 3'600'000))
    throw InitRequestError("/init: lease_ms " + std::to_string(r.lease_ms) + " is outside 500..3600000 (0 or absent: no lease)");
  const auto& chunk = field(j, "chunk");
  if (!chunk.is_object()) throw InitRequestError("/init: \"chunk\" must be an object");
  r.chunk_sha256 = typed<std::string>(chunk, "sha256");
  if (!is_hex_sha256(r.chunk_sha256)) throw InitRequestError("/init: chunk.sha256 must be 64 hex digits");
  // sha256sum's lower case, which uploads are checked against
  std::transform(r.chunk_sha256.begin(), r.chunk_sha256.end(), r.chunk_sha256.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  r.chunk_path = chunk.contains("path") ? typed<std::string>(chunk, "path") : std::string();
  r.chunk_bytes = chunk.contains("bytes") ? typed<uint64_t>(chunk, "bytes") : 0;
  if (j.contains("interpretability")) {
    ModelBounds bounds;
    bounds.n_layers = r.model.n_layers;
    bounds.dim = r.model.dim;
    bounds.layer_begin = r.layer_begin;  // a secondary acts only on its own layers
    bounds.layer_end = r.layer_end;
    try {
      r.interpretability = InterpretabilityPlan::from_json(j["interpretability"], bounds, "/init: interpretability");
    } catch (const InterpretabilityError& e) {
      throw InitRequestError(e.what());
    }
  }
  if (j.contains("training")) {
    if (!r.interpretability.empty()) throw InitRequestError("/init: \"training\" and \"interpretability\" do not go together");
    try {
      r.training = TrainingPlan::from_json(j["training"], r.model.n_layers, r.max_seq_len);
    } catch (const TrainingPlanError& e) {
      throw InitRequestError(e.what());
    }
    if (r.dtype != "float32") throw InitRequestError("/init: training runs in float32, got dtype \"" + r.dtype + "\"");
  }
  return r;
}

}  // namespace mdi
