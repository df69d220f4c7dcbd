#pragma once
// Standalone generation: every layer in one process. The reference the
// distributed ring is checked against.
#include <functional>
#include <vector>

#include "common/model.hpp"
#include "common/sample_progress.hpp"

namespace mdi {

// Called after each new token of a sample.
using TokenCallback = std::function<void(const SampleProgress& sample, int64_t token)>;

// The LayerHook of one forward pass of `sample`, whose first token is at
// `start_pos` (nullptr: none). Capture and interventions come in this way
// (common/hidden_states), in standalone runs and on every node of a ring alike.
using HookFactory = std::function<LayerHook(uint32_t sample, int64_t start_pos)>;

// Runs every sample to its stop: each pass gives every running sample one step,
// in micro-batches (pack_micro_batches). The model must hold the embedding and the head.
RunStats generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token,
                             const HookFactory& hooks = nullptr);

}  // namespace mdi
