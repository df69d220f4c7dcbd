#include "common/train/checkpoint.hpp"

#include <fstream>
#include <map>

#include <spdlog/spdlog.h>

#include "common/store/atomic_file.hpp"
#include "common/store/model_store.hpp"
#include "common/store/sha256.hpp"
#include "common/train/stage.hpp"

namespace mdi {

namespace fs = std::filesystem;

namespace {
constexpr const char* kManifest = "manifest.json";
constexpr const char* kStepPrefix = "step-";

std::optional<int64_t> step_of(const fs::path& dir) {
  const std::string name = dir.filename().string();
  if (name.rfind(kStepPrefix, 0) != 0) return std::nullopt;
  const std::string digits = name.substr(std::string(kStepPrefix).size());
  if (digits.empty() || digits.size() > 15 || digits.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  return std::stoll(digits);
}

TrainingCheckpoint load_step(const fs::path& dir) {
  TrainingCheckpoint c;
  c.dir = dir;
  try {
    c.stages = ChunkManifest::load(dir / kManifest);
    std::ifstream in(dir / kManifest);
    const auto j = nlohmann::json::parse(in);
    c.step = j.at("step").get<int64_t>();
    c.run = j.value("training", nlohmann::json::object());
  } catch (const std::exception& e) {
    throw CheckpointError((dir / kManifest).string() + ": not a training checkpoint manifest (" + e.what() + ")");
  }
  return c;
}

// Canonical name → (fused stage tensor, first row, rows) for the projections a stage stores fused.
struct Source {
  std::string tensor;
  int64_t row = 0, rows = -1;  // rows -1: the whole tensor
};

class TrainingCheckpointReader : public CheckpointReader {
 public:
  explicit TrainingCheckpointReader(const TrainingCheckpoint& checkpoint) : checkpoint_(checkpoint) {
    const ModelConfig& c = checkpoint.stages.model;
    for (const ChunkEntry& entry : checkpoint.stages.nodes) {
      const fs::path file = checkpoint.dir / entry.file;
      const std::string digest = sha256_file(file);
      if (digest != entry.sha256)
        throw CheckpointError(file.string() + " has sha256 " + digest + ", the manifest says " + entry.sha256 + ": the checkpoint is damaged");
      files_.push_back(std::make_unique<SafetensorsFile>(file));
      for (const TensorInfo& t : files_.back()->tensors()) where_[t.name] = files_.back().get();
    }
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const std::string qkv = stage_tensor::fused_qkv(l), gate_up = stage_tensor::fused_gate_up(l);
      sources_[tensor_name::layer(l, "self_attn.q_proj")] = {qkv, 0, c.dim};
      sources_[tensor_name::layer(l, "self_attn.k_proj")] = {qkv, c.dim, c.kv_dim()};
      sources_[tensor_name::layer(l, "self_attn.v_proj")] = {qkv, c.dim + c.kv_dim(), c.kv_dim()};
      sources_[tensor_name::layer(l, "mlp.gate_proj")] = {gate_up, 0, c.hidden_dim};
      sources_[tensor_name::layer(l, "mlp.up_proj")] = {gate_up, c.hidden_dim, c.hidden_dim};
    }
  }

  const ModelConfig& config() const override { return checkpoint_.stages.model; }
  bool has(const std::string& name) const override { return where_.count(source(name).tensor) > 0; }
  torch::Tensor read(const std::string& name) const override {
    const Source s = source(name);
    auto file = where_.find(s.tensor);
    if (file == where_.end()) throw CheckpointError(description() + ": no tensor \"" + s.tensor + "\"");
    const TensorInfo& info = file->second->at(s.tensor);
    auto t = torch::from_blob(const_cast<uint8_t*>(file->second->data(info)), info.shape, torch_dtype(info.dtype));
    return s.rows < 0 ? t : t.narrow(0, s.row, s.rows);
  }
  std::optional<fs::path> tokenizer() const override {
    for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer.bin"})
      if (fs::exists(checkpoint_.dir.parent_path() / name)) return checkpoint_.dir.parent_path() / name;
    return std::nullopt;
  }
  std::string description() const override {
    return "training checkpoint " + checkpoint_.dir.string() + " (step " + std::to_string(checkpoint_.step) + ")";
  }

 private:
  Source source(const std::string& name) const {
    auto it = sources_.find(name);
    return it == sources_.end() ? Source{name} : it->second;
  }
  TrainingCheckpoint checkpoint_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
  std::map<std::string, Source> sources_;
};
}  // namespace

void write_training_manifest(const TrainingCheckpoint& checkpoint) {
  auto j = nlohmann::json::parse(checkpoint.stages.to_json());
  j["step"] = checkpoint.step;
  j["training"] = checkpoint.run;
  write_file_atomic((checkpoint.dir / kManifest).string(), j.dump(2) + "\n");
}

TrainingCheckpoint find_training_checkpoint(const fs::path& dir) {
  if (fs::exists(dir / kManifest)) return load_step(dir);
  if (!fs::is_directory(dir)) throw CheckpointError("--resume " + dir.string() + ": no such directory");
  std::optional<fs::path> latest;
  int64_t latest_step = -1;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto step = step_of(entry.path());
    if (step && *step > latest_step && fs::exists(entry.path() / kManifest)) latest = entry.path(), latest_step = *step;
  }
  if (!latest) throw CheckpointError(dir.string() + " holds no finished checkpoint (no step-*/" + kManifest + ")");
  return load_step(*latest);
}

void remove_unfinished_steps(const fs::path& out) {
  if (!fs::is_directory(out)) return;
  for (const auto& entry : fs::directory_iterator(out))
    if (step_of(entry.path()) && !fs::exists(entry.path() / kManifest)) {
      spdlog::warn("removing the unfinished checkpoint {}", entry.path().string());
      fs::remove_all(entry.path());
    }
}

std::unique_ptr<CheckpointReader> open_training_checkpoint(const TrainingCheckpoint& checkpoint) {
  return std::make_unique<TrainingCheckpointReader>(checkpoint);
}

ChunkManifest gather_training_checkpoint(const TrainingCheckpoint& checkpoint, const fs::path& out) {
  auto reader = open_training_checkpoint(checkpoint);
  const auto dtype = parse_dtype(checkpoint.stages.dtype);
  write_model_directory(*reader, out, dtype, reader->description(), nullptr);
  std::vector<int64_t> counts;
  for (const ChunkEntry& entry : checkpoint.stages.nodes) counts.push_back(entry.layer_end - entry.layer_begin);
  reader.reset();
  return write_chunks(out, counts, nullptr);
}

}  // namespace mdi
