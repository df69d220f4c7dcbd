#include "common/interp/hidden_states.hpp"

#include <algorithm>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/model/tokenizer/utf8.hpp"
#include "common/store/checkpoint.hpp"
#include "common/wire/frame.hpp"

namespace mdi {

namespace {

std::string sample_key(uint32_t sample) { return "sample" + std::to_string(sample); }

// A safetensors tensor as a CPU float32 tensor (a copy).
torch::Tensor read_float(const SafetensorsFile& file, const TensorInfo& info) {
  const torch::ScalarType dtype = torch_dtype(info.dtype);
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16)
    throw CheckpointError(file.path().string() + ": tensor " + info.name + " is " + info.dtype + "; expected F32, BF16 or F16");
  return torch::from_blob(const_cast<uint8_t*>(file.data(info)), info.shape, dtype).to(torch::kFloat32, false, true);
}

}  // namespace

LayerProbes::LayerProbes(InterpretabilityPlan plan, const ModelChunk& chunk) : plan_(std::move(plan)), capture_dtype_(chunk.dtype()) {
  c10::InferenceMode inference;
  const auto options = torch::TensorOptions().dtype(chunk.activation_dtype()).device(chunk.device());
  for (const auto& iv : plan_.interventions) {
    if (iv.vector.empty()) {
      vectors_.emplace_back();
      continue;
    }
    if (static_cast<int64_t>(iv.vector.size()) != chunk.config().dim)
      throw std::invalid_argument("intervention at " + layer_label(iv.layer) + ": vector of " + std::to_string(iv.vector.size()) +
                                  " values for dim " + std::to_string(chunk.config().dim));
    auto cpu = torch::from_blob(const_cast<float*>(iv.vector.data()), {static_cast<int64_t>(iv.vector.size())}, torch::kFloat32);
    vectors_.push_back(cpu.to(options, false, true));
  }
}

void LayerProbes::intervene(int64_t layer, uint32_t sample, int64_t start_pos, torch::Tensor& hidden) const {
  bool copied = false;
  const int64_t T = hidden.size(0), prompt_len = plan_.prompt_length(sample);
  for (size_t i = 0; i < plan_.interventions.size(); ++i) {
    const Intervention& iv = plan_.interventions[i];
    if (iv.layer != layer || !iv.applies_to(sample)) continue;
    for (int64_t a = 0; a < T;) {
      // the next run [a, b) of selected rows
      if (!iv.positions.selects(start_pos + a, prompt_len)) {
        ++a;
        continue;
      }
      int64_t b = a + 1;
      while (b < T && iv.positions.selects(start_pos + b, prompt_len)) ++b;
      if (!copied) hidden = hidden.clone(), copied = true;  // the model may still hold the tensor it passed
      auto rows = hidden.narrow(0, a, b - a);
      switch (iv.op) {
        case Intervention::Op::add: rows.add_(vectors_[i], iv.scale); break;
        case Intervention::Op::replace: rows.copy_(vectors_[i].expand_as(rows)); break;
        case Intervention::Op::zero: rows.zero_(); break;
        case Intervention::Op::scale: rows.mul_(iv.scale); break;
      }
      a = b;
    }
  }
}

LayerHook LayerProbes::hook(uint32_t sample, int64_t start_pos, CaptureSink sink) const {
  const bool intervenes = std::any_of(plan_.interventions.begin(), plan_.interventions.end(),
                                      [&](const Intervention& iv) { return iv.applies_to(sample); });
  const bool captures = !plan_.capture.empty() && sink;
  if (!intervenes && !captures) return nullptr;
  return [this, sample, start_pos, intervenes, captures, sink = std::move(sink)](int64_t layer, torch::Tensor& hidden) {
    if (intervenes) intervene(layer, sample, start_pos, hidden);
    if (!captures || !plan_.capture.wants(layer)) return;
    const int64_t T = hidden.size(0);
    const int64_t first = plan_.capture.last_only ? T - 1 : 0;
    // always a copy: the hidden state lives on in the forward pass
    auto rows = hidden.narrow(0, first, T - first).to(torch::TensorOptions().dtype(capture_dtype_).device(torch::kCPU), false, true);
    sink(sample, layer, start_pos + first, rows.contiguous());
  };
}

CaptureCollector::CaptureCollector(CaptureSpec spec, size_t n_samples, int64_t dim, torch::ScalarType dtype)
    : spec_(std::move(spec)), n_samples_(n_samples), dim_(dim), dtype_(dtype) {}

void CaptureCollector::add(uint32_t sample, int64_t layer, int64_t start_pos, const torch::Tensor& rows) {
  const std::string what = "capture of sample " + std::to_string(sample) + " " + layer_label(layer);
  if (sample >= n_samples_) throw ProtocolError(what + ": the run has " + std::to_string(n_samples_) + " samples");
  if (!spec_.wants(layer)) throw ProtocolError(what + ": that layer was not asked for");
  if (rows.dim() != 2 || rows.size(1) != dim_ || rows.size(0) < 1)
    throw ProtocolError(what + ": shape " + c10::str(rows.sizes()) + ", expected [rows, " + std::to_string(dim_) + "]");
  if (rows.scalar_type() != dtype_)
    throw ProtocolError(what + ": " + dtype_name(rows.scalar_type()) + ", the run's dtype is " + dtype_name(dtype_));
  if (spec_.last_only && rows.size(0) != 1)
    throw ProtocolError(what + ": " + std::to_string(rows.size(0)) + " rows; --capture-positions last sends one per step");
  Slot& slot = slots_[{sample, layer}];
  const int64_t expected = spec_.last_only ? (slot.positions.empty() ? 0 : slot.positions.back() + 1)
                                           : static_cast<int64_t>(slot.positions.size());
  if (spec_.last_only ? start_pos < expected : start_pos != expected)
    throw ProtocolError(what + ": rows start at position " + std::to_string(start_pos) + ", expected " +
                        (spec_.last_only ? "at least " : "") + std::to_string(expected));
  c10::InferenceMode inference;
  slot.parts.push_back(rows.to(torch::kCPU, false, true).contiguous());
  for (int64_t r = 0; r < rows.size(0); ++r) slot.positions.push_back(start_pos + r);
}

torch::Tensor CaptureCollector::hidden(uint32_t sample, int64_t layer) const {
  auto it = slots_.find({sample, layer});
  if (it == slots_.end()) return {};
  c10::InferenceMode inference;
  return it->second.parts.size() == 1 ? it->second.parts[0] : torch::cat(it->second.parts, 0);
}

std::vector<int64_t> CaptureCollector::positions(uint32_t sample, int64_t layer) const {
  auto it = slots_.find({sample, layer});
  return it == slots_.end() ? std::vector<int64_t>{} : it->second.positions;
}

void CaptureCollector::write(const std::filesystem::path& path, const std::vector<SampleProgress>& samples) const {
  nlohmann::json layers = nlohmann::json::array();
  for (int64_t l : spec_.layers) layers.push_back(layer_json(l));
  std::map<std::string, std::string> metadata = {{"format", "mdi-llm capture 1"},
                                                 {"layers", layers.dump()},
                                                 {"dtype", dtype_name(dtype_)},
                                                 {"positions", spec_.positions_name()},
                                                 {"n_samples", std::to_string(samples.size())}};
  std::vector<SafetensorsWriter::Entry> entries;
  std::vector<torch::Tensor> tensors;
  for (const auto& s : samples) {
    const auto id = static_cast<uint32_t>(s.index());
    metadata[sample_key(id) + ".prompt"] = valid_utf8(s.prompt());
    metadata[sample_key(id) + ".tokens"] = nlohmann::json(s.tokens()).dump();
    nlohmann::json positions = nlohmann::json::array();
    for (int64_t l : spec_.layers) {
      auto h = hidden(id, l);
      if (!h.defined()) continue;
      if (positions.empty()) positions = this->positions(id, l);
      entries.push_back({sample_key(id) + "." + layer_label(l), safetensors_dtype(dtype_), {h.size(0), h.size(1)}});
      tensors.push_back(h);
    }
    metadata[sample_key(id) + ".positions"] = positions.dump();
  }
  SafetensorsWriter writer(path, entries, metadata);
  for (size_t i = 0; i < entries.size(); ++i)
    writer.write(entries[i].name, tensors[i].data_ptr(), static_cast<uint64_t>(tensors[i].numel()) * tensors[i].element_size());
  writer.commit();
}

nlohmann::json logit_lens(const ModelChunk& head, const CaptureCollector& capture, const std::vector<SampleProgress>& samples,
                          const Tokenizer& tokenizer, int64_t k) {
  if (!head.spec().head) throw std::logic_error("logit lens needs the chunk with the head");
  c10::InferenceMode inference;
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : samples) {
    const auto id = static_cast<uint32_t>(s.index());
    nlohmann::json layers = nlohmann::json::array();
    int64_t position = -1;
    for (int64_t l : capture.spec().layers) {
      auto h = capture.hidden(id, l);
      if (!h.defined()) continue;
      position = capture.positions(id, l).back();
      auto logits = head.run_head(h.narrow(0, h.size(0) - 1, 1).to(head.device()), true)[0].to(torch::kCPU);
      auto top = logits.topk(std::min<int64_t>(k, logits.size(0)));
      auto values = std::get<0>(top).contiguous(), ids = std::get<1>(top).contiguous();
      nlohmann::json entry = {{"layer", layer_json(l)}, {"ids", nlohmann::json::array()}, {"tokens", nlohmann::json::array()},
                              {"logits", nlohmann::json::array()}};
      // the text each candidate would add after the token at `position`
      const int prev = static_cast<int>(s.tokens().at(static_cast<size_t>(position)));
      for (int64_t i = 0; i < ids.size(0); ++i) {
        const int token = static_cast<int>(ids[i].item<int64_t>());
        std::string text;
        try {
          Utf8Stream utf8;
          text = utf8.push(tokenizer.token_bytes(prev, token));
          text += utf8.finish();
        } catch (const TokenizerError&) {
          // an id the model has but the tokenizer lacks: no text
        }
        entry["ids"].push_back(token);
        entry["tokens"].push_back(text);
        entry["logits"].push_back(values[i].item<float>());
      }
      layers.push_back(std::move(entry));
    }
    if (position >= 0) out.push_back({{"sample", id}, {"position", position}, {"layers", std::move(layers)}});
  }
  return out;
}

std::vector<float> read_vector(const std::filesystem::path& path, const std::string& tensor) {
  SafetensorsFile file(path);
  const TensorInfo* info = nullptr;
  if (!tensor.empty()) {
    info = &file.at(tensor);
  } else {
    if (file.tensors().size() != 1)
      throw CheckpointError(path.string() + " holds " + std::to_string(file.tensors().size()) + " tensors; name one with \"tensor\"");
    info = &file.tensors()[0];
  }
  const auto& shape = info->shape;
  if (!(shape.size() == 1 || (shape.size() == 2 && shape[0] == 1)))
    throw CheckpointError(path.string() + ": tensor " + info->name + " has " + std::to_string(shape.size()) +
                          " dims; a vector is (dim) or (1, dim)");
  c10::InferenceMode inference;
  auto v = read_float(file, *info).reshape({-1}).contiguous();
  return {v.data_ptr<float>(), v.data_ptr<float>() + v.numel()};
}

torch::Tensor steering_vector(const std::filesystem::path& from, const std::filesystem::path& to, int64_t layer) {
  c10::InferenceMode inference;
  auto mean = [&](const std::filesystem::path& path) {
    SafetensorsFile file(path);
    const std::string suffix = "." + layer_label(layer);
    std::vector<torch::Tensor> rows;
    for (const auto& info : file.tensors())
      if (info.name.size() > suffix.size() && info.name.compare(info.name.size() - suffix.size(), suffix.size(), suffix) == 0)
        rows.push_back(read_float(file, info).to(torch::kFloat64));
    if (rows.empty()) throw CheckpointError(path.string() + " holds no capture of " + layer_label(layer) + " (tensors sample*" + suffix + ")");
    return torch::cat(rows, 0).mean(0);
  };
  auto a = mean(from), b = mean(to);
  if (a.size(0) != b.size(0))
    throw CheckpointError(from.string() + " and " + to.string() + " hold hidden states of different sizes (" +
                          std::to_string(a.size(0)) + ", " + std::to_string(b.size(0)) + ")");
  return (b - a).to(torch::kFloat32).contiguous();
}

void write_vector(const std::filesystem::path& path, const std::string& name, const torch::Tensor& vector,
                  const std::map<std::string, std::string>& metadata) {
  auto v = vector.to(torch::kCPU).to(torch::kFloat32).contiguous().reshape({-1});
  SafetensorsWriter writer(path, {{name, "F32", {v.size(0)}}}, metadata);
  writer.write(name, v.data_ptr(), static_cast<uint64_t>(v.numel()) * sizeof(float));
  writer.commit();
}

}  // namespace mdi
