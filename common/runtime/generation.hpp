#pragma once
// Standalone generation: every layer in one process. The reference the
// distributed ring is checked against.
#include <atomic>
#include <functional>
#include <stdexcept>
#include <vector>

#include "common/model/model.hpp"
#include "common/runtime/sample_progress.hpp"

namespace mdi {

// Called after each new token of a sample.
using TokenCallback = std::function<void(const SampleProgress& sample, int64_t token)>;

// The LayerHook of one forward pass of `sample`, whose first token is at
// `start_pos` (nullptr: none). Capture and interventions come in this way
// (common/interp/hidden_states), in standalone runs and on every node of a ring alike.
using HookFactory = std::function<LayerHook(uint32_t sample, int64_t start_pos)>;

// Samples' next steps as one micro-batch: their pending tokens one after another, a span each.
struct StepBatch {
  std::vector<int64_t> input;
  std::vector<SequenceSpan> spans;
  // Appends the tokens `sample` has not fed yet, at its position, with its cache and hook.
  void add(const SampleProgress& sample, KvCache& cache, LayerHook hook);
  // Micro-batches of at most `max_samples` of `samples` (pack_micro_batches), as indices into it.
  static std::vector<std::vector<size_t>> plan(const std::vector<const SampleProgress*>& samples, size_t max_samples);
};

// Thrown by a generation whose cancel flag was set (the starter's SIGINT and SIGTERM):
// the samples keep their tokens so far, the RunStats its figures so far.
class RunInterrupted : public std::runtime_error {
 public:
  RunInterrupted() : std::runtime_error("interrupted") {}
};

// Runs every sample to its stop: each pass gives every running sample one step,
// in micro-batches (pack_micro_batches). The model must hold the embedding and the head.
// `stats` is filled as tokens come, so it holds what was done when the run ends early.
// Throws RunInterrupted once `cancel` is set (checked before every forward pass).
void generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token,
                         RunStats& stats, const HookFactory& hooks = nullptr, const std::atomic<bool>* cancel = nullptr);

}  // namespace mdi
