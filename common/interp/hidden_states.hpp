#pragma once
// Hidden states at work: the LayerHook that applies a node's interventions and
// captures its layers (common/interp/interventions describes what), the starter's
// collector that gathers every node's captures into one safetensors file, the
// logit lens, and steering vectors made from two capture files.
//
//   node holding layer L:  forward ─▶ hook(L, h): interventions of L on h, then capture rows of h ─▶ sink
//   standalone / starter:  sink = CaptureCollector::add
//   secondary:             sink = Capture frames, sent before the step's Activations frame (common/runtime/ring)
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/interp/interventions.hpp"
#include "common/model/model.hpp"
#include "common/runtime/sample_progress.hpp"
#include "common/store/safetensors.hpp"

namespace mdi {

class Tokenizer;

// Receives captured rows: (rows, dim) CPU tensors in the run's dtype, the first
// of them at position `start_pos` of `sample`.
using CaptureSink = std::function<void(uint32_t sample, int64_t layer, int64_t start_pos, torch::Tensor rows)>;

// A node's part of an InterpretabilityPlan, ready to run on its chunk: the
// intervention vectors on the chunk's device, in its activation dtype.
class LayerProbes {
 public:
  LayerProbes(InterpretabilityPlan plan, const ModelChunk& chunk);

  // The hook of one forward pass of `sample` whose first token is at `start_pos`;
  // nullptr when nothing applies to that sample here. Interventions of a layer
  // run first (in plan order), then its capture, so a capture sees what the next
  // layer sees. The hook replaces the hidden state it changes by a new tensor.
  LayerHook hook(uint32_t sample, int64_t start_pos, CaptureSink sink) const;
  const InterpretabilityPlan& plan() const { return plan_; }

 private:
  void intervene(int64_t layer, uint32_t sample, int64_t start_pos, torch::Tensor& hidden) const;
  InterpretabilityPlan plan_;
  std::vector<torch::Tensor> vectors_;  // per intervention: (dim) or undefined
  torch::ScalarType capture_dtype_;     // the chunk's dtype: what hidden states in and out of a node carry
};

// The starter's store of every captured row, by sample and layer, in position order.
class CaptureCollector {
 public:
  CaptureCollector(CaptureSpec spec, size_t n_samples, int64_t dim, torch::ScalarType dtype);

  // Checks the rows against the spec, the model and what came before (positions
  // must follow on; "all" starts at 0), then keeps a copy. Throws ProtocolError.
  void add(uint32_t sample, int64_t layer, int64_t start_pos, const torch::Tensor& rows);

  const CaptureSpec& spec() const { return spec_; }
  // (positions, dim) in the run's dtype, or an undefined tensor when nothing was captured.
  torch::Tensor hidden(uint32_t sample, int64_t layer) const;
  std::vector<int64_t> positions(uint32_t sample, int64_t layer) const;

  // One safetensors file: tensors "sample{S}.embed" and "sample{S}.layer{L}" (positions, dim);
  // metadata (strings): format, layers (JSON list), dtype, positions ("all" | "last"), n_samples,
  // and per sample sample{S}.prompt, sample{S}.tokens (JSON list, prompt and generated ids) and
  // sample{S}.positions (JSON list: the position of each row).
  void write(const std::filesystem::path& path, const std::vector<SampleProgress>& samples) const;

 private:
  struct Slot {
    std::vector<torch::Tensor> parts;  // (rows, dim) each
    std::vector<int64_t> positions;
  };
  CaptureSpec spec_;
  size_t n_samples_;
  int64_t dim_;
  torch::ScalarType dtype_;
  std::map<std::pair<uint32_t, int64_t>, Slot> slots_;  // by (sample, layer)
};

// Logit lens: the last captured position of every sample, decoded at every
// captured layer through `head`'s final norm and LM head. Returns
//   [{"sample": S, "position": p, "layers": [{"layer": "embed" | L, "ids": [k ids], "tokens": [k texts],
//     "logits": [k values]}, ...]}, ...]
// with the k most likely next tokens first. `head` must hold the head.
nlohmann::json logit_lens(const ModelChunk& head, const CaptureCollector& capture, const std::vector<SampleProgress>& samples,
                          const Tokenizer& tokenizer, int64_t k);

// The VectorLoader of --interventions: tensor `tensor` (or the file's only tensor
// when empty) of a safetensors file, shape (dim) or (1, dim), F32/BF16/F16, as floats.
std::vector<float> read_vector(const std::filesystem::path& file, const std::string& tensor);

// Mean over every row of every sample of `layer` in capture file `to`, minus the
// same in `from`: (dim) float32. The direction that moves `from`'s activations toward `to`'s.
torch::Tensor steering_vector(const std::filesystem::path& from, const std::filesystem::path& to, int64_t layer);
// Writes a (dim) float32 vector as tensor `name` of a safetensors file.
void write_vector(const std::filesystem::path& path, const std::string& name, const torch::Tensor& vector,
                  const std::map<std::string, std::string>& metadata = {});

}  // namespace mdi
