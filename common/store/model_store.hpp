#pragma once
// The canonical model directory that prepare_model writes and every node
// reads: a Hugging Face layout (config.json, model.safetensors, tokenizer)
// plus chunks/<N>nodes/ with one safetensors file per node and a manifest.
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "common/store/checkpoint.hpp"
#include "common/store/partition.hpp"

namespace mdi {

class Tokenizer;

// Bytes done, bytes in all.
using ProgressCallback = std::function<void(uint64_t done, uint64_t total)>;

// Converts `reader` into `dir` in `dtype`, tensor by tensor (peak memory near
// the largest tensor). `source_id` identifies the input; when `dir` already
// holds a conversion of the same source and dtype it is reused and this
// returns false. A conversion that replaces another model (another source or
// dtype) first removes that model's splits under chunks/, with a warning: they
// would no longer match the directory's model. The reader's tokenizer, where it
// has one, becomes the directory's (install_tokenizer), reused or not; a new
// conversion without one gets a synthetic tokenizer. Files appear atomically.
bool write_model_directory(const CheckpointReader& reader, const std::filesystem::path& dir, torch::ScalarType dtype,
                           const std::string& source_id, const ProgressCallback& progress);

// Splits the model in `dir` into chunks/<N>nodes/ by layer counts (starter first).
ChunkManifest write_chunks(const std::filesystem::path& dir, const std::vector<int64_t>& layer_counts, const ProgressCallback& progress);

// A node's chunk of a prepare_model directory, as a checkpoint reader.
// ring_index 0 is the starter, i the secondary i - 1.
struct NodeChunk {
  ChunkEntry entry;
  std::filesystem::path file;
  std::unique_ptr<CheckpointReader> reader;
  ChunkSpec spec() const { return {{entry.layer_begin, entry.layer_end}, entry.embedding, entry.head}; }
};
NodeChunk open_node_chunk(const std::filesystem::path& model_dir, size_t n_nodes, size_t ring_index);
NodeChunk open_chunk_file(const ChunkManifest& manifest, const ChunkEntry& entry, const std::filesystem::path& file);

// Makes `tokenizer` (a file, or a directory holding one) the tokenizer of the
// model directory `dir`: copied in under its canonical name, and every other
// tokenizer file there removed (a tokenizer.json would win over a tokenizer.bin).
void install_tokenizer(const std::filesystem::path& dir, const std::filesystem::path& tokenizer);

// Loads the tokenizer at `path` for a model of `config`: one with more tokens
// than the model's vocabulary (its ids would index past the embedding) is
// refused with an error naming both sizes.
std::unique_ptr<Tokenizer> load_tokenizer_for(const std::filesystem::path& path, const ModelConfig& config);

// A byte-level llama2.c tokenizer (BOS, EOS, 256 byte tokens, filler pieces)
// for random-weight models, which ship no tokenizer of their own.
void write_synthetic_tokenizer(const std::filesystem::path& path, int64_t vocab_size);

}  // namespace mdi
