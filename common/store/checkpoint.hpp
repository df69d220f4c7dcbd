#pragma once
// Checkpoint readers. Every format is presented the same way: a ModelConfig
// and tensors under Hugging Face Llama names in the half-split RoPE layout, so
// the model core knows one convention. Conversion (llama2.c's interleaved q/k
// rows) happens here, once, at read time.
#include <torch/torch.h>

#include <atomic>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model/model.hpp"
#include "common/model/model_config.hpp"
#include "common/store/safetensors.hpp"

namespace mdi {

// Hugging Face Llama tensor names.
namespace tensor_name {
inline const std::string kEmbedding = "model.embed_tokens.weight";
inline const std::string kFinalNorm = "model.norm.weight";
inline const std::string kLmHead = "lm_head.weight";
// `part` is e.g. "self_attn.q_proj", "mlp.down_proj", "input_layernorm".
std::string layer(int64_t index, const std::string& part);
}  // namespace tensor_name

// Every tensor a chunk needs, in a fixed order (embedding, layers, norm, head).
std::vector<std::string> chunk_tensor_names(const ModelConfig& config, const ChunkSpec& spec);
// The shape of a named tensor of this model.
std::vector<int64_t> tensor_shape(const ModelConfig& config, const std::string& name);
// The most bytes a safetensors file of the chunk's tensors can hold (float32 data and
// the largest header read): what a node may hash or accept as an upload for it.
uint64_t max_chunk_file_bytes(const ModelConfig& config, const ChunkSpec& spec);

class CheckpointReader {
 public:
  virtual ~CheckpointReader() = default;
  virtual const ModelConfig& config() const = 0;
  virtual bool has(const std::string& name) const = 0;
  // A CPU tensor in the checkpoint's own dtype. It may view a memory map that lives as long as the reader.
  virtual torch::Tensor read(const std::string& name) const = 0;
  // The tokenizer file that came with the checkpoint, if any.
  virtual std::optional<std::filesystem::path> tokenizer() const = 0;
  // One line for logs: format and path.
  virtual std::string description() const = 0;
};

// A llama2.c .bin (legacy float32 layout), with its tokenizer.bin if given.
std::unique_ptr<CheckpointReader> open_llama2c(const std::filesystem::path& bin, std::optional<std::filesystem::path> tokenizer);
// safetensors files holding (some of) a model's tensors under canonical names: a Hugging Face
// directory's shards, or one prepare_model chunk.
std::unique_ptr<CheckpointReader> open_safetensors(ModelConfig config, const std::vector<std::filesystem::path>& files,
                                                   std::optional<std::filesystem::path> tokenizer, std::string description);
// A Hugging Face directory: config.json + model.safetensors or model.safetensors.index.json; its
// tokenizer is `tokenizer` where given, else the one the directory holds (tokenizer_in).
std::unique_ptr<CheckpointReader> open_hf_directory(const std::filesystem::path& dir,
                                                    std::optional<std::filesystem::path> tokenizer = {});
// random:PRESET or random:path/config.json: real shapes, weights drawn from `seed` tensor by tensor.
// Random weights come with no tokenizer but the one given.
std::unique_ptr<CheckpointReader> open_random(const std::string& spec, uint64_t seed,
                                              std::optional<std::filesystem::path> tokenizer = {});
std::vector<std::string> random_preset_names();

// Any of the above, by what `spec` is; a `tokenizer` given wins over the one the model comes with.
// Errors name the path and the problem.
std::unique_ptr<CheckpointReader> open_checkpoint(const std::string& spec, std::optional<std::filesystem::path> tokenizer = {},
                                                  uint64_t seed = 0);

// Thrown by load_chunk when its `cancel` flag was set.
struct LoadCancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The tokenizer file a model directory holds: the first of tokenizer.json, tokenizer.model,
// tokenizer.bin (load_tokenizer's order), if any.
std::optional<std::filesystem::path> tokenizer_in(const std::filesystem::path& dir);

// Reads only the chunk's tensors, converted straight to `device` and `dtype`.
// `cancel` is checked before every layer, so a node told to stop gives up a long
// load within one layer's time.
ModelChunk load_chunk(const CheckpointReader& reader, const ChunkSpec& spec, torch::Device device, torch::ScalarType dtype,
                      const std::atomic<bool>* cancel = nullptr);

// A weight copied out of a reader's memory map (converted, fused or written out) no
// longer needs the map's pages: hand them back, so that the process holds each weight
// once. Only acts on tensors that view a read-only file map (storage without an
// allocator: the readers' from_blob views); the page cache keeps the data.
void release_mapped_pages(const torch::Tensor& source);

// safetensors dtype name ("F32", "BF16", "F16") of a torch dtype, and back.
std::string safetensors_dtype(torch::ScalarType dtype);
torch::ScalarType torch_dtype(const std::string& safetensors_dtype);

}  // namespace mdi
