#pragma once
// Fine-tuning one stage: the forward of a micro-batch with autograd recording
// (the model's training mode: the same forward as inference, on ATen ops), the
// loss at the head, and AdamW over the stage's trainable parameters with its
// state, saved and restored as one safetensors file per node.
//
// A micro-batch is b sequences of seq_len tokens, b * seq_len rows: each
// sequence is one span of the model's batched forward, from position 0 with a
// fresh cache, so no sequence sees another.
#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/model/model.hpp"
#include "common/train/plan.hpp"

namespace mdi {

// Hidden states (b * seq_len, dim), or with the embedding token ids (b * seq_len).
torch::Tensor training_forward(const ModelChunk& chunk, const torch::Tensor& input, int64_t seq_len);

// Sum of the cross-entropy of every row's next token, divided by `batch_tokens`
// (the whole step's), so that the micro-batches' losses add up to the batch mean.
torch::Tensor micro_batch_loss(const ModelChunk& chunk, const torch::Tensor& hidden, const torch::Tensor& targets, int64_t batch_tokens);

// Tensor names of a stage file: Hugging Face names, with the fused projections
// as the model stores them (gather splits them back).
namespace stage_tensor {
std::string fused_qkv(int64_t layer);      // model.layers.L.self_attn.qkv_proj.weight: q, k, v rows
std::string fused_gate_up(int64_t layer);  // model.layers.L.mlp.gate_up_proj.weight: gate, up rows
inline const std::string kExpAvg = "adamw.exp_avg.";
inline const std::string kExpAvgSq = "adamw.exp_avg_sq.";
}  // namespace stage_tensor

class StageOptimizer {
 public:
  struct Parameter {
    std::string name;
    torch::Tensor value;  // the model's own weight, updated in place
    torch::Tensor exp_avg, exp_avg_sq;
    bool decays;  // matrices decay, norm weights do not
  };

  // Puts `chunk` in training mode; the weights `trainable` selects in the chunk's
  // layers require gradients and get AdamW state, the others none.
  StageOptimizer(ModelChunk& chunk, const TrainableSet& trainable, OptimizerSettings settings);

  const std::vector<Parameter>& parameters() const { return parameters_; }
  // Sum of the squares of every gradient this stage holds.
  double grad_norm_sq() const;
  // One AdamW update with gradients scaled by grad_scale (clipping), then zeroes them.
  void step(double lr, double grad_scale);
  int64_t steps_taken() const { return steps_taken_; }

  // Every weight of the stage, and the AdamW state, as one safetensors file written
  // atomically (.partial, then renamed). Returns its sha256.
  std::string save(const std::filesystem::path& file, int64_t step) const;
  // Restores weights and state from save()'s file. Throws CheckpointError naming the
  // file and the tensor that is missing or has another shape.
  void load(const std::filesystem::path& file);

 private:
  // Every weight of the stage by stage-file name, trainable or not.
  std::vector<std::pair<std::string, torch::Tensor>> named_weights() const;

  ModelChunk& chunk_;
  OptimizerSettings settings_;
  std::vector<Parameter> parameters_;
  int64_t steps_taken_ = 0;
};

}  // namespace mdi
