#pragma once
// Next-token choice from a row of logits. One Sampler per sample, each with
// its own RNG, so a sample's tokens do not depend on how samples interleave
// across nodes or batches.
#include <cstdint>
#include <optional>
#include <random>
#include <vector>

namespace mdi {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
};

class Sampler {
 public:
  Sampler(SamplingParams params, uint64_t seed);
  // logits: (vocab) float32. nullopt where one of them is NaN or infinite:
  // no token can be chosen from them (and sorting NaNs is undefined behaviour).
  std::optional<int64_t> sample(const float* logits, int64_t vocab);

  // Seed of sample `index` in a run seeded with `run_seed`.
  static uint64_t sample_seed(uint64_t run_seed, uint64_t index);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int64_t>> candidates_;  // reused across steps
};

}  // namespace mdi
