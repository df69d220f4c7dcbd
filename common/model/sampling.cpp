#include "common/model/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace mdi {

Sampler::Sampler(SamplingParams params, uint64_t seed) : params_(params), rng_(seed) {
  if (params.temperature < 0) throw std::invalid_argument("temperature must be >= 0, got " + std::to_string(params.temperature));
  if (params.top_k < 0) throw std::invalid_argument("top-k must be >= 0, got " + std::to_string(params.top_k));
  if (!(params.top_p > 0 && params.top_p <= 1)) throw std::invalid_argument("top-p must be in (0, 1], got " + std::to_string(params.top_p));
}

uint64_t Sampler::sample_seed(uint64_t run_seed, uint64_t index) {
  // splitmix64 of (seed, index): neighbouring indices get unrelated streams.
  uint64_t z = run_seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::optional<int64_t> Sampler::sample(const float* logits, int64_t vocab) {
  if (!std::all_of(logits, logits + vocab, [](float logit) { return std::isfinite(logit); })) return std::nullopt;
  if (params_.temperature == 0.0f) {
    // First maximum wins, as in llama2.c, so greedy ids match it exactly.
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  candidates_.resize(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) candidates_[i] = {logits[i] / params_.temperature, i};
  auto by_logit_desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = static_cast<size_t>(params_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit_desc);
  } else if (params_.top_p < 1.0f) {
    std::sort(candidates_.begin(), candidates_.end(), by_logit_desc);
  }
  candidates_.resize(keep);
  // softmax over the kept candidates
  float max_logit = candidates_[0].first;
  for (auto& c : candidates_) max_logit = std::max(max_logit, c.first);
  double total = 0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max_logit);
    total += c.first;
  }
  if (params_.top_p < 1.0f) {
    // candidates are sorted: keep the smallest prefix whose mass reaches top_p
    double mass = 0;
    size_t n = 0;
    while (n < candidates_.size()) {
      mass += candidates_[n++].first / total;
      if (mass >= params_.top_p) break;
    }
    candidates_.resize(n);
    total = 0;
    for (auto& c : candidates_) total += c.first;
  }
  double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (auto& c : candidates_) {
    r -= c.first;
    if (r <= 0) return c.second;
  }
  return candidates_.back().second;
}

}  // namespace mdi
