#include "common/store/model_store.hpp"

#include <fstream>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/store/atomic_file.hpp"

namespace mdi {

namespace fs = std::filesystem;

namespace {
constexpr const char* kSourceKey = "mdi_source";
constexpr const char* kDtypeKey = "mdi_dtype";

// Writes `names` from `reader` into one safetensors file, converting each tensor to `dtype` as it goes.
std::string write_tensors(const CheckpointReader& reader, const std::vector<std::string>& names, const fs::path& path,
                          torch::ScalarType dtype, const std::map<std::string, std::string>& metadata,
                          const ProgressCallback& progress, uint64_t& done, uint64_t total) {
  std::vector<SafetensorsWriter::Entry> entries;
  for (auto& n : names) entries.push_back({n, safetensors_dtype(dtype), tensor_shape(reader.config(), n)});
  SafetensorsWriter writer(path, entries, metadata);
  for (auto& n : names) {
    auto source = reader.read(n);
    auto t = source.to(dtype).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    writer.write(n, t.data_ptr(), bytes);
    release_mapped_pages(source);
    done += bytes;
    if (progress) progress(done, total);
  }
  return writer.commit();
}

uint64_t tensor_bytes(const ModelConfig& c, const std::vector<std::string>& names, torch::ScalarType dtype) {
  uint64_t total = 0;
  for (auto& n : names) {
    uint64_t numel = 1;
    for (auto d : tensor_shape(c, n)) numel *= static_cast<uint64_t>(d);
    total += numel * torch::elementSize(dtype);
  }
  return total;
}

void copy_atomic(const fs::path& from, const fs::path& to) {
  fs::path partial = to.string() + ".partial";
  fs::copy_file(from, partial, fs::copy_options::overwrite_existing);
  fs::rename(partial, to);
}

// The tokenizer files of a model directory but those named in `keep`, so that the one installed is the one loaded.
void remove_tokenizers(const fs::path& dir, const std::set<std::string>& keep = {}) {
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.bin"})
    if (!keep.count(name)) fs::remove(dir / name);
}

// Removes every split of the model in `dir` before another model replaces it there: a split
// left behind would hold the old weights (or dtype) under the new model's name.
void remove_splits(const fs::path& dir, const std::string& old_model, const std::string& new_model) {
  const fs::path chunks = dir / "chunks";
  std::set<std::string> names;
  if (fs::is_directory(chunks))
    for (const auto& entry : fs::directory_iterator(chunks)) names.insert(entry.path().filename().string());
  std::string splits;
  for (const auto& name : names) splits += (splits.empty() ? "" : ", ") + name;
  spdlog::warn("{} held {}; converting {} replaces it{}", dir.string(), old_model, new_model,
               splits.empty() ? std::string() : " and removes its splits (" + splits + "), which would no longer match it");
  fs::remove_all(chunks);
}
}  // namespace

bool write_model_directory(const CheckpointReader& reader, const fs::path& dir, torch::ScalarType dtype, const std::string& source_id,
                           const ProgressCallback& progress) {
  const fs::path weights = dir / "model.safetensors";
  if (fs::exists(dir / "config.json") && fs::exists(weights)) {
    SafetensorsFile existing(weights);
    auto metadata = [&](const char* key, const char* unrecorded) {
      auto it = existing.metadata().find(key);
      return it == existing.metadata().end() ? std::string(unrecorded) : it->second;
    };
    const std::string held_source = metadata(kSourceKey, "a model of unrecorded source"), held_dtype = metadata(kDtypeKey, "unrecorded dtype");
    if (held_source == source_id && held_dtype == dtype_name(dtype)) {
      spdlog::info("reusing the converted model in {}", dir.string());
      if (auto tok = reader.tokenizer()) install_tokenizer(dir, *tok);
      return false;
    }
    remove_splits(dir, held_source + " as " + held_dtype, source_id + " as " + dtype_name(dtype));
  }
  fs::create_directories(dir);
  const ModelConfig& c = reader.config();
  auto names = chunk_tensor_names(c, {{0, c.n_layers}, true, true});
  uint64_t done = 0;
  write_tensors(reader, names, weights, dtype,
                {{"format", "pt"}, {kSourceKey, source_id}, {kDtypeKey, dtype_name(dtype)}}, progress, done,
                tensor_bytes(c, names, dtype));
  nlohmann::json config = c.to_hf_json();
  config["torch_dtype"] = dtype_name(dtype);
  write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n");

  if (auto tok = reader.tokenizer()) {
    install_tokenizer(dir, *tok);
  } else {
    spdlog::warn("{} ships no tokenizer: writing a synthetic byte-level tokenizer.bin (vocab {}); --tokenizer PATH ships a real one",
                 reader.description(), c.vocab_size);
    remove_tokenizers(dir);
    write_synthetic_tokenizer(dir / "tokenizer.bin", c.vocab_size);
  }
  return true;
}

void install_tokenizer(const fs::path& dir, const fs::path& tokenizer) {
  const auto file = fs::is_directory(tokenizer) ? tokenizer_in(tokenizer) : std::optional<fs::path>(tokenizer);
  if (!file) throw CheckpointError(tokenizer.string() + ": holds no tokenizer.json, tokenizer.model or tokenizer.bin");
  const std::string ext = file->extension().string();
  const fs::path target = dir / (ext == ".json" ? "tokenizer.json" : ext == ".model" ? "tokenizer.model" : "tokenizer.bin");
  // tokenizer.json's special tokens (BOS among them) may live in the config beside it
  const fs::path config = file->parent_path() / "tokenizer_config.json";
  const bool with_config = ext == ".json" && fs::exists(config);
  if (fs::exists(target) && fs::equivalent(*file, target)) {  // the directory's own: only the others go
    remove_tokenizers(dir, with_config ? std::set<std::string>{"tokenizer.json", "tokenizer_config.json"}
                                       : std::set<std::string>{target.filename().string()});
    return;
  }
  remove_tokenizers(dir);
  copy_atomic(*file, target);
  if (with_config) copy_atomic(config, dir / "tokenizer_config.json");
}

std::unique_ptr<Tokenizer> load_tokenizer_for(const fs::path& path, const ModelConfig& config) {
  auto tokenizer = load_tokenizer(path);
  if (tokenizer->vocab_size() > config.vocab_size)
    throw CheckpointError("tokenizer " + path.string() + " has " + std::to_string(tokenizer->vocab_size()) +
                          " tokens, more than the model's vocabulary of " + std::to_string(config.vocab_size) +
                          ": pass the model's own tokenizer (--tokenizer PATH)");
  return tokenizer;
}

ChunkManifest write_chunks(const fs::path& dir, const std::vector<int64_t>& layer_counts, const ProgressCallback& progress) {
  auto model = open_hf_directory(dir);
  const ModelConfig& c = model->config();
  check_layer_counts(c, layer_counts.size(), layer_counts);
  const torch::ScalarType dtype = model->read(tensor_name::kEmbedding).scalar_type();
  const fs::path manifest_file = manifest_path(dir, layer_counts.size());
  fs::create_directories(manifest_file.parent_path());

  ChunkManifest manifest;
  manifest.model = c;
  manifest.dtype = dtype_name(dtype);
  int64_t begin = 0;
  for (size_t i = 0; i < layer_counts.size(); ++i) {
    ChunkEntry e;
    e.role = i == 0 ? "starter" : "secondary";
    e.index = i == 0 ? 0 : static_cast<int64_t>(i - 1);
    e.file = i == 0 ? "starter.safetensors" : "secondary" + std::to_string(i - 1) + ".safetensors";
    e.layer_begin = begin;
    e.layer_end = begin + layer_counts[i];
    e.embedding = e.head = (i == 0);  // the starter opens and closes the ring
    begin = e.layer_end;
    manifest.nodes.push_back(e);
  }
  uint64_t total = 0, done = 0;
  for (auto& e : manifest.nodes)
    total += tensor_bytes(c, chunk_tensor_names(c, {{e.layer_begin, e.layer_end}, e.embedding, e.head}), dtype);
  for (auto& e : manifest.nodes) {
    auto names = chunk_tensor_names(c, {{e.layer_begin, e.layer_end}, e.embedding, e.head});
    const fs::path file = manifest_file.parent_path() / e.file;
    e.sha256 = write_tensors(*model, names, file, dtype, {{"format", "pt"}}, progress, done, total);
    e.bytes = fs::file_size(file);
  }
  // The manifest comes last: a directory without it is an unfinished split.
  write_file_atomic(manifest_file.string(), manifest.to_json());
  return manifest;
}

NodeChunk open_chunk_file(const ChunkManifest& manifest, const ChunkEntry& entry, const fs::path& file) {
  NodeChunk chunk;
  chunk.entry = entry;
  chunk.file = file;
  const fs::path model_dir = file.parent_path().parent_path().parent_path();
  chunk.reader = open_safetensors(manifest.model, {file}, tokenizer_in(model_dir), "chunk " + file.string());
  return chunk;
}

NodeChunk open_node_chunk(const fs::path& model_dir, size_t n_nodes, size_t ring_index) {
  const fs::path path = manifest_path(model_dir, n_nodes);
  if (!fs::exists(path))
    throw CheckpointError(model_dir.string() + ": no split for " + std::to_string(n_nodes) + " nodes (" + path.string() +
                          " is missing); run: prepare_model " + model_dir.string() + " --n-nodes " + std::to_string(n_nodes));
  auto manifest = ChunkManifest::load(path);
  const ChunkEntry& entry = ring_index == 0 ? manifest.starter() : manifest.secondary(static_cast<int64_t>(ring_index - 1));
  return open_chunk_file(manifest, entry, path.parent_path() / entry.file);
}

void write_synthetic_tokenizer(const fs::path& path, int64_t vocab_size) {
  std::string out;
  auto put_i32 = [&](int32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); };
  auto put_f32 = [&](float v) { out.append(reinterpret_cast<const char*>(&v), 4); };
  std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n"};
  for (int b = 0; b < 256 && static_cast<int64_t>(pieces.size()) < vocab_size; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    pieces.push_back(hex);
  }
  // Printable ASCII as single characters (" " among them: encoding prepends it to
  // every text), then filler pieces " a" … " z", " aa" …, so plain words merge.
  for (char c = ' '; c <= '~' && static_cast<int64_t>(pieces.size()) < vocab_size; ++c) pieces.push_back(std::string(1, c));
  for (int64_t n = 0; static_cast<int64_t>(pieces.size()) < vocab_size; ++n) {
    std::string word;
    for (int64_t k = n; ; k = k / 26 - 1) {
      word.insert(word.begin(), static_cast<char>('a' + k % 26));
      if (k < 26) break;
    }
    pieces.push_back(" " + word);
  }
  size_t max_len = 0;
  for (auto& p : pieces) max_len = std::max(max_len, p.size());
  put_i32(static_cast<int32_t>(max_len));
  for (size_t i = 0; i < pieces.size(); ++i) {
    put_f32(i < 259 + 95 ? 0.0f : -static_cast<float>(i));
    put_i32(static_cast<int32_t>(pieces[i].size()));
    out += pieces[i];
  }
  write_file_atomic(path.string(), out);
}

}  // namespace mdi
