#pragma once
// Standalone generation: every layer in one process. The reference the
// distributed ring is checked against.
#include <functional>
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

// Runs every sample to its stop: each pass gives every running sample one step,
// in micro-batches (pack_micro_batches). The model must hold the embedding and the head.
RunStats generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token,
                             const HookFactory& hooks = nullptr);

}  // namespace mdi
