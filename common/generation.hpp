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

// Runs every sample to its stop, one step of each in turn, as the ring
// interleaves them. The model must hold the embedding and the head.
RunStats generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token);

}  // namespace mdi
