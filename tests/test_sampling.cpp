#include "common/model/sampling.hpp"
#include "common/runtime/sample_progress.hpp"

#include <limits>
#include <map>

#include "tests/support.hpp"

namespace {

TEST(Sampling, GreedyTakesTheFirstMaximum) {
  mdi::Sampler s({0.0f, 0, 1.0f}, 1);
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(s.sample(logits.data(), 4), 1);
}

TEST(Sampling, SameSeedSameDrawsDifferentSeedDifferentDraws) {
  std::vector<float> logits(100);
  for (int i = 0; i < 100; ++i) logits[i] = 0.05f * float(i % 17);
  auto draws = [&](uint64_t seed) {
    mdi::Sampler s({1.0f, 0, 1.0f}, seed);
    std::vector<int64_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(*s.sample(logits.data(), 100));
    return out;
  };
  EXPECT_EQ(draws(7), draws(7));
  EXPECT_NE(draws(7), draws(8));
}

TEST(Sampling, TopKNeverLeavesTheKBest) {
  std::vector<float> logits = {5.0f, 4.0f, 3.0f, 2.9f, 2.8f, 2.7f};
  mdi::Sampler s({2.0f, 2, 1.0f}, 3);
  std::map<int64_t, int> seen;
  for (int i = 0; i < 500; ++i) seen[*s.sample(logits.data(), 6)]++;
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen.count(0) && seen.count(1));
}

TEST(Sampling, TopPKeepsTheSmallestSetReachingTheMass) {
  // probabilities ≈ 0.665, 0.245, 0.090: top-p 0.8 keeps the first two
  std::vector<float> logits = {2.0f, 1.0f, 0.0f};
  mdi::Sampler s({1.0f, 0, 0.8f}, 5);
  std::map<int64_t, int> seen;
  for (int i = 0; i < 2000; ++i) seen[*s.sample(logits.data(), 3)]++;
  EXPECT_EQ(seen.count(2), 0u);
  EXPECT_GT(seen[1], 300);
}

TEST(Sampling, NonFiniteLogitsChooseNoTokenInEveryMode) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // Sorting these with the old comparator was undefined behaviour (not a strict weak order).
  std::vector<float> logits(1000, 0.5f);
  for (size_t i = 0; i < logits.size(); i += 3) logits[i] = nan;
  std::vector<float> one_infinity = {0.1f, -inf, 0.3f};
  for (mdi::SamplingParams params : {mdi::SamplingParams{0.0f, 0, 1.0f}, mdi::SamplingParams{0.8f, 0, 1.0f},
                                     mdi::SamplingParams{0.8f, 40, 1.0f}, mdi::SamplingParams{0.8f, 0, 0.9f}}) {
    mdi::Sampler s(params, 1);
    EXPECT_EQ(s.sample(logits.data(), static_cast<int64_t>(logits.size())), std::nullopt) << params.temperature;
    EXPECT_EQ(s.sample(one_infinity.data(), 3), std::nullopt) << params.temperature;
  }
}

TEST(Sampling, SampleSeedsDifferPerIndex) {
  EXPECT_NE(mdi::Sampler::sample_seed(1, 0), mdi::Sampler::sample_seed(1, 1));
  EXPECT_EQ(mdi::Sampler::sample_seed(1, 2), mdi::Sampler::sample_seed(1, 2));
}

TEST(Sampling, BadParametersAreRejected) {
  EXPECT_THROW(mdi::Sampler({-1.0f, 0, 1.0f}, 0), std::invalid_argument);
  EXPECT_THROW(mdi::Sampler({1.0f, 0, 0.0f}, 0), std::invalid_argument);
}

// A sample's bookkeeping, the same in standalone runs and on the ring: which
// tokens the next pass feeds, and why it stops.
mdi::ModelConfig context_of(int64_t max_seq_len) {
  mdi::ModelConfig config;
  config.vocab_size = 4;
  config.max_seq_len = max_seq_len;
  config.stop_token_ids = {2};
  return config;
}

std::vector<float> logits_for(int64_t token) {
  std::vector<float> logits(4, 0.0f);
  logits[token] = 5.0f;
  return logits;
}

mdi::SampleProgress greedy_sample(std::vector<int64_t> prompt, int64_t max_new, const mdi::ModelConfig& config) {
  return mdi::SampleProgress(0, "p", std::move(prompt), max_new, mdi::Sampler({0.0f, 0, 1.0f}, 1), config);
}

TEST(SampleProgress, FeedsThePromptThenOneTokenPerStep) {
  const auto config = context_of(64);
  auto s = greedy_sample({1, 3, 3}, 5, config);
  EXPECT_EQ(s.pending_pos(), 0);
  EXPECT_EQ(s.pending_count(), 3);
  EXPECT_EQ(s.pending_input(), (std::vector<int64_t>{1, 3, 3}));
  s.mark_fed();
  EXPECT_EQ(s.advance(logits_for(3).data(), 4), 3);
  EXPECT_EQ(s.pending_pos(), 3);
  EXPECT_EQ(s.pending_input(), (std::vector<int64_t>{3}));
  EXPECT_TRUE(s.running());
  EXPECT_EQ(s.generated(), 1);
}

TEST(SampleProgress, StopsAtAStopTokenAtTheLengthAndAtTheContext) {
  const auto config = context_of(64);
  auto eos = greedy_sample({1}, 5, config);
  eos.advance(logits_for(2).data(), 4);
  EXPECT_EQ(eos.stop_reason(), mdi::StopReason::eos);
  EXPECT_EQ(eos.tokens(), (std::vector<int64_t>{1, 2})) << "the stop token is kept";

  auto length = greedy_sample({1}, 2, config);
  length.advance(logits_for(3).data(), 4);
  EXPECT_TRUE(length.running());
  length.advance(logits_for(3).data(), 4);
  EXPECT_EQ(length.stop_reason(), mdi::StopReason::length);

  const auto small = context_of(3);
  auto context = greedy_sample({1, 3}, 10, small);
  context.advance(logits_for(3).data(), 4);
  EXPECT_TRUE(context.running()) << "the third token still has a position, the last one";
  context.mark_fed();
  context.advance(logits_for(3).data(), 4);
  EXPECT_EQ(context.stop_reason(), mdi::StopReason::context);
  EXPECT_EQ(context.tokens().size(), 4u) << "the token chosen from the last position's logits is kept";

  EXPECT_EQ(greedy_sample({1}, 0, config).stop_reason(), mdi::StopReason::length) << "no tokens asked for";
  EXPECT_THROW(greedy_sample({1, 3, 3, 3}, 1, small), std::invalid_argument);
}

TEST(SampleProgress, NanLogitsStopTheSampleWithoutAToken) {
  const auto config = context_of(64);
  auto s = greedy_sample({1, 3}, 5, config);
  s.mark_fed();
  std::vector<float> logits = logits_for(3);
  logits[1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(s.advance(logits.data(), 4), std::nullopt);
  EXPECT_EQ(s.stop_reason(), mdi::StopReason::non_finite_logits);
  EXPECT_STREQ(mdi::stop_reason_name(s.stop_reason()), "non_finite_logits");
  EXPECT_EQ(s.tokens(), (std::vector<int64_t>{1, 3})) << "no token was made up";
}

}  // namespace
