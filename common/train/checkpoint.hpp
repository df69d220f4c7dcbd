#pragma once
// Distributed training checkpoints. Every node writes its stage (weights and
// AdamW state) as <out>/step-<k>/<role>.safetensors on its own disk; the
// starter writes <out>/step-<k>/manifest.json last, naming the step, the model,
// each stage's layer range and each file's sha256. A step directory without a
// manifest is unfinished and never read. The run's tokenizer lies in <out>.
//
// gather_training_checkpoint() turns a step into the canonical model directory
// prepare_model writes (config.json, model.safetensors, tokenizer, chunks/), so
// inference and any new split work on it unchanged.
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/store/checkpoint.hpp"
#include "common/store/partition.hpp"

namespace mdi {

struct TrainingCheckpoint {
  std::filesystem::path dir;  // the step directory
  int64_t step = 0;
  ChunkManifest stages;       // one entry per node: its stage file, layers and sha256
  nlohmann::json run;         // the settings of the run that wrote it (for the record)
};

// Writes dir/manifest.json atomically; the stage files must be complete already.
void write_training_manifest(const TrainingCheckpoint& checkpoint);

// `dir` is a step directory or a run's --out (then its latest step with a manifest).
// Throws CheckpointError naming the directory and what is missing.
TrainingCheckpoint find_training_checkpoint(const std::filesystem::path& dir);

// Removes the step directories of `out` that have no manifest: what a failed run left.
void remove_unfinished_steps(const std::filesystem::path& out);

// The checkpoint's weights under canonical names (the fused projections split back),
// as a reader that write_model_directory() takes.
std::unique_ptr<CheckpointReader> open_training_checkpoint(const TrainingCheckpoint& checkpoint);

// Writes the canonical model directory `out` from the checkpoint, split for the
// checkpoint's node count as it was trained. Returns that split's manifest.
ChunkManifest gather_training_checkpoint(const TrainingCheckpoint& checkpoint, const std::filesystem::path& out);

}  // namespace mdi
