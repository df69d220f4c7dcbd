#include "common/store/checkpoint.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

namespace mdi {

namespace fs = std::filesystem;

std::string tensor_name::layer(int64_t index, const std::string& part) {
  return "model.layers." + std::to_string(index) + "." + part + ".weight";
}

namespace {
const std::vector<std::string> kLayerParts = {
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};

[[noreturn]] void fail(const fs::path& path, const std::string& problem) { throw CheckpointError(path.string() + ": " + problem); }

nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail(path, "cannot open");
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    fail(path, std::string("malformed JSON: ") + e.what());
  }
}
}  // namespace

std::optional<fs::path> tokenizer_in(const fs::path& dir) {
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer.bin"})
    if (fs::exists(dir / name)) return dir / name;
  return std::nullopt;
}

std::vector<std::string> chunk_tensor_names(const ModelConfig& config, const ChunkSpec& spec) {
  std::vector<std::string> names;
  if (spec.embedding) names.push_back(tensor_name::kEmbedding);
  for (int64_t l = spec.layers.begin; l < spec.layers.end; ++l)
    for (auto& part : kLayerParts) names.push_back(tensor_name::layer(l, part));
  if (spec.head) {
    names.push_back(tensor_name::kFinalNorm);
    if (!config.tied_embeddings)
      names.push_back(tensor_name::kLmHead);
    else if (!spec.embedding)
      names.push_back(tensor_name::kEmbedding);
  }
  return names;
}

uint64_t max_chunk_file_bytes(const ModelConfig& config, const ChunkSpec& spec) {
  uint64_t bytes = 8 + kMaxSafetensorsHeaderBytes;
  for (const std::string& name : chunk_tensor_names(config, spec)) {
    uint64_t numel = 1;
    for (int64_t extent : tensor_shape(config, name)) numel *= static_cast<uint64_t>(extent);
    bytes += 4 * numel;
  }
  return bytes;
}

std::vector<int64_t> tensor_shape(const ModelConfig& c, const std::string& name) {
  if (name == tensor_name::kEmbedding || name == tensor_name::kLmHead) return {c.vocab_size, c.dim};
  if (name == tensor_name::kFinalNorm) return {c.dim};
  auto ends_with = [&](const char* suffix) {
    const std::string s = std::string(suffix) + ".weight";
    return name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with("layernorm")) return {c.dim};
  if (ends_with("q_proj") || ends_with("o_proj")) return {c.dim, c.dim};
  if (ends_with("k_proj") || ends_with("v_proj")) return {c.kv_dim(), c.dim};
  if (ends_with("gate_proj") || ends_with("up_proj")) return {c.hidden_dim, c.dim};
  if (ends_with("down_proj")) return {c.dim, c.hidden_dim};
  throw CheckpointError("unknown tensor name \"" + name + "\"");
}

std::string safetensors_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "F32";
    case torch::kBFloat16: return "BF16";
    case torch::kFloat16: return "F16";
    default: throw CheckpointError(std::string("no safetensors dtype for ") + c10::toString(dtype));
  }
}

torch::ScalarType torch_dtype(const std::string& name) {
  if (name == "F32") return torch::kFloat32;
  if (name == "BF16") return torch::kBFloat16;
  if (name == "F16") return torch::kFloat16;
  throw CheckpointError("unsupported tensor dtype " + name + " (expected F32, BF16 or F16)");
}

// ---------------------------------------------------------------- llama2.c

namespace {
// HF's permute for q/k rows: llama2.c (like Meta's checkpoints) rotates adjacent
// pairs (x0, x1), (x2, x3)…; Hugging Face rotates the halves (x0, x_{d/2})….
torch::Tensor interleaved_to_half_split(const torch::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({n_heads, rows / n_heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

class Llama2cReader : public CheckpointReader {
 public:
  Llama2cReader(const fs::path& path, std::optional<fs::path> tokenizer)
      : path_(path), file_(std::make_shared<MappedFile>(path)), tokenizer_(std::move(tokenizer)) {
    constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);
    if (file_->size() < kHeaderBytes) fail(path, "truncated llama2.c checkpoint: " + std::to_string(file_->size()) + " bytes, header needs 28");
    int32_t h[7];
    std::memcpy(h, file_->data(), sizeof h);
    config_.dim = h[0];
    config_.hidden_dim = h[1];
    config_.n_layers = h[2];
    config_.n_heads = h[3];
    config_.n_kv_heads = h[4];
    // In 64 bits: std::abs(INT32_MIN) is undefined.
    config_.vocab_size = h[5] < 0 ? -int64_t{h[5]} : int64_t{h[5]};
    config_.max_seq_len = h[6];
    // llama2.c marks an untied classifier by a negative vocab_size.
    config_.tied_embeddings = h[5] > 0;
    config_.bos_token_id = 1;
    // llama2.c stops at BOS too: its stories are separated by BOS in training.
    config_.stop_token_ids = {2, 1};
    try {
      config_.validate();
    } catch (const ConfigError& e) {
      fail(path, std::string("not a llama2.c checkpoint (bad header): ") + e.what());
    }
    const int64_t L = config_.n_layers, dim = config_.dim, kv = config_.kv_dim(), hid = config_.hidden_dim;
    size_t offset = kHeaderBytes;
    // Each tensor's size is checked against what is left of the file as it is
    // added: dims of up to 2^31 multiply past 64 bits, and a wrapped sum could
    // pass a check made once at the end. validate() made every dim positive.
    auto add = [&](const std::string& name, std::vector<int64_t> shape) {
      uint64_t bytes = sizeof(float);
      bool overflow = false;
      for (auto d : shape) overflow |= __builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes);
      if (overflow || bytes > file_->size() - offset) {
        fail(path, "truncated llama2.c checkpoint: " + std::to_string(file_->size()) + " bytes, its header puts \"" +
                       name + "\" (" + (overflow ? std::string("over 2^64") : std::to_string(bytes)) +
                       " bytes) at byte " + std::to_string(offset));
      }
      layout_[name] = {offset, shape};
      offset += bytes;
    };
    // The legacy layout stores each kind of tensor for all layers together.
    add(tensor_name::kEmbedding, {config_.vocab_size, dim});
    add("rms_att", {L, dim});
    add("wq", {L, dim, dim});
    add("wk", {L, kv, dim});
    add("wv", {L, kv, dim});
    add("wo", {L, dim, dim});
    add("rms_ffn", {L, dim});
    add("w1", {L, hid, dim});
    add("w2", {L, dim, hid});
    add("w3", {L, hid, dim});
    add(tensor_name::kFinalNorm, {dim});
    add("freq_cis", {2, config_.max_seq_len, config_.head_dim() / 2});  // unused: RoPE is computed
    if (!config_.tied_embeddings) add(tensor_name::kLmHead, {config_.vocab_size, dim});
  }

  const ModelConfig& config() const override { return config_; }
  std::optional<fs::path> tokenizer() const override { return tokenizer_; }
  std::string description() const override { return "llama2.c checkpoint " + path_.string(); }

  bool has(const std::string& name) const override {
    try {
      source_of(name);
      return true;
    } catch (const CheckpointError&) {
      return false;
    }
  }

  torch::Tensor read(const std::string& name) const override {
    auto [kind, layer] = source_of(name);
    torch::Tensor all = mapped(kind);
    torch::Tensor t = layer < 0 ? all : all[layer];
    if (kind == "wq") return interleaved_to_half_split(t, config_.n_heads);
    if (kind == "wk") return interleaved_to_half_split(t, config_.n_kv_heads);
    return t;
  }

 private:
  struct Slot {
    size_t offset;
    std::vector<int64_t> shape;
  };

  torch::Tensor mapped(const std::string& kind) const {
    const Slot& slot = layout_.at(kind);
    auto file = file_;  // the tensor keeps the mapping alive
    return torch::from_blob(const_cast<uint8_t*>(file_->data() + slot.offset), slot.shape, [file](void*) {},
                            torch::kFloat32);
  }

  // llama2.c kind and layer (-1: not per layer) of a canonical name.
  std::pair<std::string, int64_t> source_of(const std::string& name) const {
    static const std::map<std::string, std::string> kinds = {
        {"input_layernorm", "rms_att"},  {"self_attn.q_proj", "wq"}, {"self_attn.k_proj", "wk"},
        {"self_attn.v_proj", "wv"},      {"self_attn.o_proj", "wo"}, {"post_attention_layernorm", "rms_ffn"},
        {"mlp.gate_proj", "w1"},         {"mlp.up_proj", "w3"},      {"mlp.down_proj", "w2"}};
    if (layout_.count(name)) return {name, -1};
    const std::string prefix = "model.layers.";
    if (name.rfind(prefix, 0) == 0) {
      size_t dot = name.find('.', prefix.size());
      int64_t layer = std::stoll(name.substr(prefix.size(), dot - prefix.size()));
      std::string part = name.substr(dot + 1, name.size() - dot - 1 - std::string(".weight").size());
      auto it = kinds.find(part);
      if (it != kinds.end() && layer >= 0 && layer < config_.n_layers) return {it->second, layer};
    }
    throw CheckpointError(path_.string() + ": has no tensor \"" + name + "\"");
  }

  fs::path path_;
  std::shared_ptr<MappedFile> file_;
  std::optional<fs::path> tokenizer_;
  ModelConfig config_;
  std::map<std::string, Slot> layout_;
};

// ---------------------------------------------------------------- safetensors

class SafetensorsReader : public CheckpointReader {
 public:
  SafetensorsReader(ModelConfig config, const std::vector<fs::path>& files, std::optional<fs::path> tokenizer,
                    std::string description)
      : config_(std::move(config)), tokenizer_(std::move(tokenizer)), description_(std::move(description)) {
    for (auto& path : files) {
      auto file = std::make_shared<SafetensorsFile>(path);
      for (auto& info : file->tensors()) owner_[info.name] = file;
    }
  }

  const ModelConfig& config() const override { return config_; }
  std::optional<fs::path> tokenizer() const override { return tokenizer_; }
  std::string description() const override { return description_; }
  bool has(const std::string& name) const override { return owner_.count(name) > 0; }

  torch::Tensor read(const std::string& name) const override {
    auto it = owner_.find(name);
    if (it == owner_.end()) throw CheckpointError(description_ + ": has no tensor \"" + name + "\"");
    auto file = it->second;
    const TensorInfo& info = file->at(name);
    auto expected = tensor_shape(config_, name);
    if (info.shape != expected)
      throw CheckpointError(file->path().string() + ": tensor \"" + name + "\" has shape " + c10::str(c10::IntArrayRef(info.shape)) +
                            ", the config needs " + c10::str(c10::IntArrayRef(expected)));
    return torch::from_blob(const_cast<uint8_t*>(file->data(info)), info.shape, [file](void*) {}, torch_dtype(info.dtype));
  }

 private:
  ModelConfig config_;
  std::optional<fs::path> tokenizer_;
  std::string description_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> owner_;
};

// ---------------------------------------------------------------- random

struct RandomPreset {
  const char* name;
  const char* description;
  ModelConfig config;
};

ModelConfig llama(int64_t dim, int64_t hidden, int64_t layers, int64_t heads, int64_t kv_heads, int64_t vocab, int64_t ctx,
                  bool tied, double theta = 10000.0) {
  ModelConfig c;
  c.dim = dim, c.hidden_dim = hidden, c.n_layers = layers, c.n_heads = heads, c.n_kv_heads = kv_heads;
  c.vocab_size = vocab, c.max_seq_len = ctx, c.tied_embeddings = tied, c.rope_theta = theta;
  return c;
}

ModelConfig llama3(ModelConfig c) {
  c.bos_token_id = 128000;
  c.stop_token_ids = {128001, 128009};
  return c;
}

const std::vector<RandomPreset>& random_presets() {
  static const std::vector<RandomPreset> presets = [] {
    ModelConfig stories260k = llama(64, 172, 5, 8, 4, 512, 512, true);
    stories260k.stop_token_ids = {2, 1};
    ModelConfig stories15m = llama(288, 768, 6, 6, 6, 32000, 256, true);
    stories15m.stop_token_ids = {2, 1};
    ModelConfig llama31_70b = llama3(llama(8192, 28672, 80, 64, 8, 128256, 131072, false, 500000.0));
    llama31_70b.has_rope_scaling = true;
    llama31_70b.stop_token_ids = {128001, 128008, 128009};
    return std::vector<RandomPreset>{
        {"stories260K", "TinyStories 260K (llama2.c)", stories260k},
        {"stories15M", "TinyStories 15M (llama2.c)", stories15m},
        {"nanollama-304m", "NanoLlama 304M (MDI-LLM)", llama(1024, 5120, 12, 16, 16, 32000, 2048, false)},
        {"tinyllama-1.1b", "TinyLlama 1.1B", llama(2048, 5632, 22, 32, 4, 32000, 2048, false)},
        {"llama-2-7b", "Llama 2 7B", llama(4096, 11008, 32, 32, 32, 32000, 4096, false)},
        {"llama-3-8b", "Llama 3 8B", llama3(llama(4096, 14336, 32, 32, 8, 128256, 8192, false, 500000.0))},
        {"llama-3.1-70b", "Llama 3.1 70B", llama31_70b},
    };
  }();
  return presets;
}

class RandomReader : public CheckpointReader {
 public:
  RandomReader(ModelConfig config, uint64_t seed, std::optional<fs::path> tokenizer, std::string description)
      : config_(std::move(config)), seed_(seed), tokenizer_(std::move(tokenizer)), description_(std::move(description)) {}

  const ModelConfig& config() const override { return config_; }
  std::optional<fs::path> tokenizer() const override { return tokenizer_; }
  std::string description() const override { return description_; }
  bool has(const std::string& name) const override {
    if (name == tensor_name::kLmHead) return !config_.tied_embeddings;
    try {
      tensor_shape(config_, name);
      return true;
    } catch (const CheckpointError&) {
      return false;
    }
  }

  torch::Tensor read(const std::string& name) const override {
    auto shape = tensor_shape(config_, name);
    if (shape.size() == 1) return torch::ones(shape, torch::kFloat32);  // norm weights
    // Each tensor has its own stream, so any subset reads the same values.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed_ ^ std::hash<std::string>{}(name));
    return torch::randn(shape, generator, torch::kFloat32).mul_(0.02);
  }

 private:
  ModelConfig config_;
  uint64_t seed_;
  std::optional<fs::path> tokenizer_;
  std::string description_;
};
}  // namespace

std::unique_ptr<CheckpointReader> open_llama2c(const fs::path& bin, std::optional<fs::path> tokenizer) {
  return std::make_unique<Llama2cReader>(bin, std::move(tokenizer));
}

std::unique_ptr<CheckpointReader> open_safetensors(ModelConfig config, const std::vector<fs::path>& files,
                                                   std::optional<fs::path> tokenizer, std::string description) {
  return std::make_unique<SafetensorsReader>(std::move(config), files, std::move(tokenizer), std::move(description));
}

std::unique_ptr<CheckpointReader> open_hf_directory(const fs::path& dir, std::optional<fs::path> tokenizer) {
  if (!fs::is_directory(dir)) fail(dir, "not a directory");
  if (!fs::exists(dir / "config.json")) fail(dir, "no config.json: not a Hugging Face model directory");
  ModelConfig config = ModelConfig::from_hf_json(read_json_file(dir / "config.json"), (dir / "config.json").string());
  std::vector<fs::path> files;
  if (fs::exists(dir / "model.safetensors")) {
    files.push_back(dir / "model.safetensors");
  } else if (fs::exists(dir / "model.safetensors.index.json")) {
    auto index = read_json_file(dir / "model.safetensors.index.json");
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      fail(dir / "model.safetensors.index.json", "has no \"weight_map\" object");
    std::set<std::string> shards;
    for (auto& [name, file] : index["weight_map"].items()) shards.insert(file.get<std::string>());
    for (auto& shard : shards) {
      if (fs::path(shard).has_parent_path()) fail(dir / "model.safetensors.index.json", "shard \"" + shard + "\" is not a plain file name");
      files.push_back(dir / shard);
    }
  } else {
    fail(dir, "holds neither model.safetensors nor model.safetensors.index.json");
  }
  return open_safetensors(config, files, tokenizer ? tokenizer : tokenizer_in(dir), "Hugging Face model " + dir.string());
}

std::vector<std::string> random_preset_names() {
  std::vector<std::string> names;
  for (auto& p : random_presets()) names.push_back(p.name);
  return names;
}

std::unique_ptr<CheckpointReader> open_random(const std::string& spec, uint64_t seed, std::optional<fs::path> tokenizer) {
  const std::string what = spec.substr(std::string("random:").size());
  for (auto& p : random_presets())
    if (what == p.name) return std::make_unique<RandomReader>(p.config, seed, tokenizer, std::string("random-weight ") + p.description);
  if (what.size() > 5 && what.substr(what.size() - 5) == ".json") {
    ModelConfig config = ModelConfig::from_hf_json(read_json_file(what), what);
    return std::make_unique<RandomReader>(config, seed, tokenizer, "random-weight model of " + what);
  }
  std::string names;
  for (auto& n : random_preset_names()) names += (names.empty() ? "" : ", ") + n;
  throw CheckpointError("\"" + spec + "\": unknown random preset; presets are " + names + ", or random:path/config.json");
}

std::unique_ptr<CheckpointReader> open_checkpoint(const std::string& spec, std::optional<fs::path> tokenizer, uint64_t seed) {
  if (spec.rfind("random:", 0) == 0) return open_random(spec, seed, tokenizer);
  fs::path path(spec);
  if (!fs::exists(path)) fail(path, "no such file or directory");
  if (fs::is_directory(path)) return open_hf_directory(path, tokenizer);
  if (path.extension() == ".bin") {
    if (!tokenizer) {
      // llama2.c keeps its tokenizer beside the model under a few usual names.
      for (const char* name : {"tokenizer.bin", "tok512.bin"})
        if (fs::exists(path.parent_path() / name)) tokenizer = path.parent_path() / name;
    }
    return open_llama2c(path, tokenizer);
  }
  fail(path, "unknown checkpoint format: expected a llama2.c .bin, a model directory, or random:PRESET");
}

void release_mapped_pages(const torch::Tensor& source) {
  if (!source.is_cpu() || source.storage().allocator() != nullptr) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(source.data_ptr()) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(source.data_ptr()) + source.nbytes()) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

ModelChunk load_chunk(const CheckpointReader& reader, const ChunkSpec& spec, torch::Device device, torch::ScalarType dtype,
                      const std::atomic<bool>* cancel) {
  const ModelConfig& c = reader.config();
  if (spec.layers.begin < 0 || spec.layers.end > c.n_layers || spec.layers.begin > spec.layers.end)
    throw CheckpointError(reader.description() + ": layer range [" + std::to_string(spec.layers.begin) + ", " +
                          std::to_string(spec.layers.end) + ") is outside the model's " + std::to_string(c.n_layers) + " layers");
  c10::InferenceMode inference;
  auto load = [&](const std::string& name) {
    auto source = reader.read(name);
    auto t = source.to(device, dtype).contiguous();
    if (t.data_ptr() != source.data_ptr()) release_mapped_pages(source);
    return t;
  };
  auto load_fused = [&](std::initializer_list<std::string> names) {
    std::vector<torch::Tensor> sources, parts;
    for (auto& n : names) sources.push_back(reader.read(n)), parts.push_back(sources.back().to(dtype));
    auto fused = torch::cat(parts, 0).to(device);
    for (auto& source : sources) release_mapped_pages(source);
    return fused;
  };
  ChunkWeights w;
  if (spec.embedding) w.embedding = load(tensor_name::kEmbedding);
  for (int64_t l = spec.layers.begin; l < spec.layers.end; ++l) {
    if (cancel && *cancel)
      throw LoadCancelled(reader.description() + ": loading cancelled at layer " + std::to_string(l));
    auto name = [&](const char* part) { return tensor_name::layer(l, part); };
    LayerWeights lw;
    lw.attn_norm = load(name("input_layernorm"));
    lw.wqkv = load_fused({name("self_attn.q_proj"), name("self_attn.k_proj"), name("self_attn.v_proj")});
    lw.wo = load(name("self_attn.o_proj"));
    lw.ffn_norm = load(name("post_attention_layernorm"));
    lw.w_gate_up = load_fused({name("mlp.gate_proj"), name("mlp.up_proj")});
    lw.w_down = load(name("mlp.down_proj"));
    w.layers.push_back(std::move(lw));
  }
  if (spec.head) {
    w.final_norm = load(tensor_name::kFinalNorm);
    if (!c.tied_embeddings)
      w.lm_head = load(tensor_name::kLmHead);
    else
      w.lm_head = spec.embedding ? w.embedding : load(tensor_name::kEmbedding);
  }
  spdlog::debug("loaded layers [{}, {}){}{} from {} to {} as {}", spec.layers.begin, spec.layers.end,
                spec.embedding ? " + embedding" : "", spec.head ? " + head" : "", reader.description(), device.str(),
                dtype_name(dtype));
  return ModelChunk(c, spec, std::move(w), device, dtype);
}

}  // namespace mdi
