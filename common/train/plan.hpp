#pragma once
// Pipeline-parallel fine-tuning, as plain data and rules without tensors: the
// schedules (which micro-batch each stage runs forward or backward, in what
// order), which parameters train (--train-layers), the learning rate of a step,
// and the "training" field of /init that carries all of it to a secondary.
//
// Stages are the nodes in ring order: 0 is the starter's first layers (with the
// embedding), 1 .. n_stages-1 the secondaries; the starter also runs the head
// and the loss after the last secondary. A step's batch is split into
// micro-batches 0 .. M-1; activations go forward and gradients come back in
// micro-batch order on every link, so a stage needs no reordering.
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mdi {

struct TrainingPlanError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class PipelineSchedule {
  gpipe,        // every micro-batch forward, then every one backward
  one_f_one_b,  // after a warm-up, one forward then one backward: few activations held
};
// "gpipe" | "1f1b"; throws TrainingPlanError naming the value.
PipelineSchedule parse_schedule(const std::string& name);
const char* schedule_name(PipelineSchedule schedule);

struct StageOp {
  enum Kind { forward, backward } kind;
  int64_t micro_batch;
  bool operator==(const StageOp& o) const { return kind == o.kind && micro_batch == o.micro_batch; }
};

// A secondary's step (stage 1 .. n_stages-1): the order of its forwards and backwards.
// GPipe: F0..F(M-1), B0..B(M-1). 1F1B: min(M, n_stages - stage) forwards, then
// alternately a backward and a forward, then the remaining backwards; so stage s
// never holds the activations of more than n_stages - s micro-batches.
std::vector<StageOp> secondary_schedule(PipelineSchedule schedule, int64_t n_stages, int64_t stage, int64_t micro_batches);

// How many micro-batches the starter lets into the ring whose backward has not
// reached its own first layers yet: M for GPipe, min(M, n_stages) for 1F1B.
int64_t starter_in_flight_limit(PipelineSchedule schedule, int64_t n_stages, int64_t micro_batches);

// The idle fraction of an ideal pipeline with equal stages: (S - 1) / (M + S - 1).
double theoretical_bubble(int64_t n_stages, int64_t micro_batches);

// Which parameters train. --train-layers: "all", or a comma list of layer
// numbers, ranges A-B (inclusive), "embed" (the token embedding, and a tied
// head with it) and "head" (the final norm and an untied LM head).
struct TrainableSet {
  std::set<int64_t> layers;
  bool embedding = false;
  bool head = false;
  bool trains_layer(int64_t layer) const { return layers.count(layer) > 0; }
  std::string to_string() const;  // the same syntax, e.g. "embed,0-3,head"
};
// Throws TrainingPlanError naming the item that is no layer of a model of n_layers layers.
TrainableSet parse_trainable_set(const std::string& spec, int64_t n_layers);

// AdamW hyper-parameters, the same on every node.
struct OptimizerSettings {
  double lr = 3e-4;            // peak learning rate
  int64_t warmup = 0;          // steps of linear warm-up to lr
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;   // decoupled; matrices only (norm weights never decay)
  double clip = 1.0;           // global gradient norm cap; 0: no clipping
  nlohmann::json to_json() const;
  // Throws TrainingPlanError naming the field; `where` prefixes the message.
  static OptimizerSettings from_json(const nlohmann::json& j, const std::string& where);
};
// The learning rate of step `step` (1-based): linear warm-up over `warmup` steps, then lr.
double learning_rate(const OptimizerSettings& settings, int64_t step);
// What the gradients are multiplied by before the update: clip / norm when the
// global norm exceeds clip, else 1.
double clip_factor(double global_norm_sq, double clip);

// The "training" field of /init: what a secondary needs to train its layers.
struct TrainingPlan {
  PipelineSchedule schedule = PipelineSchedule::gpipe;
  int64_t micro_batches = 1;
  int64_t seq_len = 0;         // rows of one sequence: a micro-batch of b sequences is b * seq_len rows
  int64_t micro_batch_sequences = 1;  // b: what bounds a training frame (training_payload_cap)
  TrainableSet trainable;      // of the whole model; a node applies it to its own layers
  OptimizerSettings optimizer;
  int64_t first_step = 1;      // > 1 when resuming
  int64_t steps = 0;           // the last step
  int64_t save_every = 0;      // 0: save only after the last step
  std::string checkpoint_dir;  // the run's checkpoint directory ("" : no checkpoints)
  bool upload_stages = false;  // send each stage to the starter's control plane instead of writing it under checkpoint_dir
  std::string resume_file;     // this node's stage file of the checkpoint to resume from ("" : fresh start)
  std::string resume_sha256;   // what that file must hash to

  // Whether the step ends with a checkpoint.
  bool saves_after(int64_t step) const;
  nlohmann::json to_json() const;
  // Throws TrainingPlanError naming the field.
  static TrainingPlan from_json(const nlohmann::json& j, int64_t n_layers, int64_t max_seq_len);
};

}  // namespace mdi
