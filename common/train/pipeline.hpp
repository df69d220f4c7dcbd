#pragma once
// One training step over the ring, and the same step in one process (the
// reference the ring is checked against).
//
//   forward:   starter stage 0 ─Activations─▶ secondary 1 ─▶ … ─▶ starter head + loss
//   backward:  starter head ─Gradients─▶ secondary N-1 ─▶ … ─▶ secondary 1 ─Gradients─▶ starter stage 0
//
// Gradients travel the same links as activations, the other way (each link is
// full duplex): a node sends them on the link it receives activations from.
// After its last backward, each node adds the squared norm of its gradients to a
// ControlScalar [sum] going once round the ring; the starter sends the total and
// the learning rate [total, lr] round once more, and every node clips and steps
// as it passes (and saves its stage when the plan says so). When that frame is
// back, every node has stepped. Every frame of a step carries the step number.
//
// Activations frames that carry the number of the step just finished are an
// evaluation pass (the validation loss): every node runs them forward without
// recording anything and passes them on; no gradient comes back.
#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/net/frame_link.hpp"
#include "common/train/stage.hpp"

namespace mdi {

// A micro-batch: inputs (rows) int64 and their next tokens (rows), b sequences back to back.
struct MicroBatch {
  torch::Tensor inputs, targets;
};
// Splits the step's sequences (seq_len + 1 tokens each) into `micro_batches` equal micro-batches.
std::vector<MicroBatch> split_batch(const std::vector<std::vector<int32_t>>& sequences, int64_t micro_batches);

// What one node did in one step.
struct StageStepFigures {
  double forward_s = 0, backward_s = 0, idle_s = 0;
  int64_t peak_held = 0;  // micro-batches whose activations it held at once
  int64_t peak_rss_bytes = 0;  // the process's peak resident memory so far
  nlohmann::json to_json() const;
};

struct StepFigures {
  double loss = 0;       // the batch's mean cross-entropy
  double grad_norm = 0;  // global, before clipping
  StageStepFigures starter;
};

// The reference: every layer in this process, the micro-batches one after the other.
class LocalTrainer {
 public:
  LocalTrainer(ModelChunk& model, const TrainingPlan& plan);
  StepFigures step(int64_t step, const std::vector<MicroBatch>& micro_batches, double lr);
  // The mean cross-entropy of the micro-batches after step `step`, without learning from them.
  double evaluate(int64_t step, const std::vector<MicroBatch>& micro_batches);
  StageOptimizer& optimizer() { return optimizer_; }

 private:
  ModelChunk& model_;
  TrainingPlan plan_;
  StageOptimizer optimizer_;
};

// The starter's part of a distributed step: its first layers, the head and the loss.
class StarterPipeline {
 public:
  StarterPipeline(ModelChunk& chunk, RingLinks& links, const TrainingPlan& plan, size_t n_nodes,
                  std::chrono::milliseconds send_timeout);
  // Throws LinkError naming the peer when the ring breaks, ProtocolError on a frame out of place.
  StepFigures step(int64_t step, const std::vector<MicroBatch>& micro_batches, double lr);
  // The evaluation pass after step `step` (the last one finished): the mean cross-entropy.
  double evaluate(int64_t step, const std::vector<MicroBatch>& micro_batches);
  // RunStop round the ring; waits up to `timeout` for it to come back.
  void finish(std::chrono::milliseconds timeout);
  StageOptimizer& optimizer() { return optimizer_; }

 private:
  ModelChunk& chunk_;
  RingLinks& links_;
  TrainingPlan plan_;
  size_t n_nodes_;
  std::chrono::milliseconds send_timeout_;
  StageOptimizer optimizer_;
};

// What a secondary reports of its training: the last step's figures and its last checkpoint.
class SecondaryTrainingStatus {
 public:
  void set_step(int64_t step, const StageStepFigures& figures);
  void set_checkpoint(int64_t step, const std::string& file, const std::string& sha256, uint64_t bytes);
  nlohmann::json to_json() const;  // {"step", "figures", "checkpoint": {"step", "file", "sha256", "bytes"}}

 private:
  mutable std::mutex mutex_;
  nlohmann::json state_ = nlohmann::json::object();
};

// Hands a stage file (step, file, sha256) to the starter; throws when it could not.
using StageUpload = std::function<void(int64_t step, const std::filesystem::path& file, const std::string& sha256)>;

// A secondary's training loop: steps until a RunStop has passed through or `cancel`.
// Its stage file of step k is <plan.checkpoint_dir>/step-k/secondary<index>.safetensors,
// or with plan.upload_stages a temporary file given to `upload` and removed.
void run_secondary_training(ModelChunk& chunk, RingLinks& links, const TrainingPlan& plan, size_t ring_index, size_t n_nodes,
                            SecondaryTrainingStatus& status, const std::atomic<bool>& cancel, std::chrono::milliseconds send_timeout,
                            const StageUpload& upload);

// <dir>/step-<step>: where every node writes its stage of that step.
std::filesystem::path checkpoint_step_dir(const std::filesystem::path& dir, int64_t step);

}  // namespace mdi
