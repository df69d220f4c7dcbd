#pragma once
// What a run captures and changes in the residual stream: the capture spec
// (--capture, --capture-positions) and the interventions (--interventions).
// Plain data, parsing and validation only, without tensors: the starter reads
// it from the command line and a JSON file, sends each secondary the part for
// its layers in /init, and the secondary checks it like every /init field.
// common/interp/hidden_states applies it to tensors.
//
// Layers are numbered globally, 0 .. n_layers-1, whichever node holds them;
// "embed" (kEmbedLayer, -1, common/model/layers.hpp) is the output of the
// token embedding. A layer's hidden state is the residual stream (T, dim) after
// that layer, the input of the next one.
//
// Interventions file (--interventions FILE.json): an array of entries, or
// {"interventions": [entries]}. Every entry:
//
//   {"layer": 3 | "embed",                        required
//    "op": "add" | "replace" | "zero" | "scale",  required
//    "vector": {"file": "v.safetensors", "tensor": "steer"}  add/replace: a (dim) or (1, dim) tensor,
//              | [0.1, -0.2, ...],                 or dim numbers inline ("tensor" may be left out
//                                                  when the file holds one tensor; "file" is relative
//                                                  to the JSON file)
//    "scale": 4.0,                                 add: the vector is multiplied by it (default 1);
//                                                  scale: the factor (required)
//    "samples": "all" | [0, 2],                    default "all"
//    "positions": "all" | "prompt" | "generated" | [0, 5, 6]}   default "all"
//
//   add      h ← h + scale · vector   (steering)
//   replace  h ← vector
//   zero     h ← 0                    (ablation)
//   scale    h ← scale · h
//
// at the selected rows of the hidden state after `layer`, before the next layer
// runs, on the node that holds `layer`. "prompt" are the positions of the prompt,
// "generated" those of generated tokens. Entries apply in file order; a capture
// of the same layer sees the result. Unknown keys are errors.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/model/layers.hpp"

namespace mdi {

// Bad --capture, --interventions or /init "interpretability" input; the message
// names the flag or file and the JSON path.
struct InterpretabilityError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// "embed" or "layer3" (tensor names), and the JSON value "embed" or 3.
std::string layer_label(int64_t layer);
nlohmann::json layer_json(int64_t layer);

struct CaptureSpec {
  std::vector<int64_t> layers;  // sorted, unique; kEmbedLayer first when present
  bool last_only = false;       // "last": only the last position of each forward pass

  bool empty() const { return layers.empty(); }
  bool wants(int64_t layer) const;
  const char* positions_name() const { return last_only ? "last" : "all"; }
};

// --capture LAYERS: "all", or a comma list of "embed", layer numbers and ranges
// "a-b" (inclusive), e.g. "embed,0,3-4". --capture-positions: "all" | "last".
CaptureSpec parse_capture_spec(const std::string& layers, const std::string& positions, int64_t n_layers);

// Which positions of a sample an intervention touches.
struct PositionSelector {
  enum class Kind { all, prompt, generated, list };
  Kind kind = Kind::all;
  std::vector<int64_t> list;  // Kind::list: sorted, unique
  // Whether position `pos` of a sample with a prompt of `prompt_len` tokens is selected.
  bool selects(int64_t pos, int64_t prompt_len) const;
};

struct Intervention {
  enum class Op { add, replace, zero, scale };
  int64_t layer = 0;                          // global, or kEmbedLayer
  Op op = Op::add;
  std::vector<float> vector;                  // (dim): add, replace
  float scale = 1.0f;                         // add: the vector's factor; scale: the factor
  std::optional<std::vector<int64_t>> samples;  // nullopt: every sample
  PositionSelector positions;

  bool applies_to(uint32_t sample) const;
};
const char* op_name(Intervention::Op op);

// Reads {"file", "tensor"} of an interventions file (the path already resolved)
// into dim floats; throws with the problem (file, tensor, shape or dtype).
using VectorLoader = std::function<std::vector<float>(const std::filesystem::path& file, const std::string& tensor)>;

// What a model's shape allows, for validation.
struct ModelBounds {
  int64_t n_layers = 0;
  int64_t dim = 0;
  int64_t n_samples = -1;  // < 0: unknown (sample ids are not checked)
  int64_t layer_begin = kEmbedLayer, layer_end = -1;  // layers this node may act on; end < 0: n_layers
};

// One entry list as in the file format above. `where` prefixes errors
// ("interventions.json", "/init: interpretability.interventions"); `loader` reads
// {"file", "tensor"} vectors relative to `base_dir`: without one, vectors must be inline.
std::vector<Intervention> parse_interventions(const nlohmann::json& j, const ModelBounds& bounds, const std::string& where,
                                              const VectorLoader& loader = nullptr, const std::filesystem::path& base_dir = {});
// Reads --interventions FILE.json.
std::vector<Intervention> load_interventions_file(const std::filesystem::path& path, const ModelBounds& bounds, const VectorLoader& loader);
// Inline form (vectors as number arrays), which parse_interventions reads back exactly.
nlohmann::json interventions_json(const std::vector<Intervention>& interventions);

// Everything one run captures and changes; /init carries each secondary's part:
//   {"capture": {"layers": ["embed", 0, 3], "positions": "all"},
//    "interventions": [ ...entries, vectors inline... ],
//    "prompt_lengths": [5, 7]}
struct InterpretabilityPlan {
  CaptureSpec capture;
  std::vector<Intervention> interventions;
  std::vector<int64_t> prompt_lengths;  // per sample: where "prompt" positions end

  bool empty() const { return capture.empty() && interventions.empty(); }
  int64_t prompt_length(uint32_t sample) const;  // 0 when unknown
  // The part a node holding layers [begin, end) acts on.
  InterpretabilityPlan for_layers(int64_t begin, int64_t end) const;
  nlohmann::json to_json() const;
  // Validates every field against `bounds`: layers in range (and within the node's
  // layers), vector sizes against dim, sample ids. Throws InterpretabilityError
  // naming `where` and the field.
  static InterpretabilityPlan from_json(const nlohmann::json& j, ModelBounds bounds, const std::string& where);
};

}  // namespace mdi
