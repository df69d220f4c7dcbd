#include "common/model/sampling.hpp"

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
    for (int i = 0; i < 50; ++i) out.push_back(s.sample(logits.data(), 100));
    return out;
  };
  EXPECT_EQ(draws(7), draws(7));
  EXPECT_NE(draws(7), draws(8));
}

TEST(Sampling, TopKNeverLeavesTheKBest) {
  std::vector<float> logits = {5.0f, 4.0f, 3.0f, 2.9f, 2.8f, 2.7f};
  mdi::Sampler s({2.0f, 2, 1.0f}, 3);
  std::map<int64_t, int> seen;
  for (int i = 0; i < 500; ++i) seen[s.sample(logits.data(), 6)]++;
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen.count(0) && seen.count(1));
}

TEST(Sampling, TopPKeepsTheSmallestSetReachingTheMass) {
  // probabilities ≈ 0.665, 0.245, 0.090: top-p 0.8 keeps the first two
  std::vector<float> logits = {2.0f, 1.0f, 0.0f};
  mdi::Sampler s({1.0f, 0, 0.8f}, 5);
  std::map<int64_t, int> seen;
  for (int i = 0; i < 2000; ++i) seen[s.sample(logits.data(), 3)]++;
  EXPECT_EQ(seen.count(2), 0u);
  EXPECT_GT(seen[1], 300);
}

TEST(Sampling, SampleSeedsDifferPerIndex) {
  EXPECT_NE(mdi::Sampler::sample_seed(1, 0), mdi::Sampler::sample_seed(1, 1));
  EXPECT_EQ(mdi::Sampler::sample_seed(1, 2), mdi::Sampler::sample_seed(1, 2));
}

TEST(Sampling, BadParametersAreRejected) {
  EXPECT_THROW(mdi::Sampler({-1.0f, 0, 1.0f}, 0), std::invalid_argument);
  EXPECT_THROW(mdi::Sampler({1.0f, 0, 0.0f}, 0), std::invalid_argument);
}

}  // namespace
