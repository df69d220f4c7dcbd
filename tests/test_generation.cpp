// Standalone generation against the exact greedy ids of llama2.c's run.c
// (../shared/reference/llama2c_greedy.json), and the starter binary at the end
// of the context, alone and on a 2-node ring.
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/runtime/generation.hpp"
#include "common/store/checkpoint.hpp"
#include "tests/support.hpp"

namespace {
using mdi::test::ChildProcess;
using std::chrono::seconds;

struct ReferenceCase {
  std::string model, tokenizer, prompt;
  std::vector<int64_t> prompt_tokens, tokens;
  int64_t steps;
};

std::vector<ReferenceCase> reference_cases(const std::filesystem::path& shared) {
  std::ifstream in(shared / "reference" / "llama2c_greedy.json");
  auto j = nlohmann::json::parse(in);
  std::vector<ReferenceCase> cases;
  for (auto& c : j)
    cases.push_back({c["model"], c["tokenizer"], c["prompt"], c["prompt_tokens"].get<std::vector<int64_t>>(),
                     c["tokens"].get<std::vector<int64_t>>(), c["steps"].get<int64_t>()});
  return cases;
}

std::vector<int64_t> greedy(const mdi::ModelChunk& model, const std::vector<int64_t>& prompt_tokens, int64_t n_tokens) {
  std::vector<mdi::SampleProgress> samples;
  samples.emplace_back(0, "", prompt_tokens, n_tokens, mdi::Sampler({0.0f, 0, 1.0f}, 0), model.config());
  mdi::RunStats stats;
  mdi::generate_standalone(model, samples, nullptr, stats);
  return samples[0].tokens();
}

TEST(Generation, GreedyTokensEqualLlama2cForEveryReferenceCase) {
  MDI_REQUIRE_SHARED(shared);
  for (auto& c : reference_cases(shared)) {
    auto reader = mdi::open_llama2c(shared / c.model, shared / c.tokenizer);
    auto model = mdi::load_chunk(*reader, {{0, reader->config().n_layers}, true, true}, torch::kCPU, torch::kFloat32);
    const int64_t budget = c.steps + 1 - int64_t(c.prompt_tokens.size());
    EXPECT_EQ(greedy(model, c.prompt_tokens, budget), c.tokens) << c.model << " prompt \"" << c.prompt << "\"";
  }
}

TEST(Generation, SeededSamplingIsReproducibleAndSeedDependent) {
  MDI_REQUIRE_SHARED(shared);
  auto reader = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  auto model = mdi::load_chunk(*reader, {{0, 5}, true, true}, torch::kCPU, torch::kFloat32);
  auto run = [&](uint64_t seed, size_t n_samples) {
    std::vector<mdi::SampleProgress> samples;
    for (size_t i = 0; i < n_samples; ++i)
      samples.emplace_back(i, "", std::vector<int64_t>{1}, 40, mdi::Sampler({0.9f, 50, 0.95f}, mdi::Sampler::sample_seed(seed, i)),
                           model.config());
    mdi::RunStats stats;
    mdi::generate_standalone(model, samples, nullptr, stats);
    std::vector<std::vector<int64_t>> out;
    for (auto& s : samples) out.push_back(s.tokens());
    return out;
  };
  auto a = run(42, 3), b = run(42, 3), c = run(43, 3);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a[0], a[1]) << "samples share a seed";
  // a sample's tokens do not depend on how many others run beside it
  EXPECT_EQ(run(42, 1)[0], a[0]);
}

TEST(Generation, Bfloat16OnCpuRunsAndMostlyAgreesWithFloat32) {
  MDI_REQUIRE_SHARED(shared);
  auto reader = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  auto fp32 = mdi::load_chunk(*reader, {{0, 5}, true, true}, torch::kCPU, torch::kFloat32);
  auto bf16 = mdi::load_chunk(*reader, {{0, 5}, true, true}, torch::kCPU, torch::kBFloat16);
  auto a = greedy(fp32, {1, 403, 407, 261, 378}, 40), b = greedy(bf16, {1, 403, 407, 261, 378}, 40);
  size_t agree = 0;
  while (agree < std::min(a.size(), b.size()) && a[agree] == b[agree]) ++agree;
  std::cout << "bf16 greedy agrees with fp32 for the first " << agree << " of " << a.size() << " ids\n";
  EXPECT_GE(agree, size_t(5 + 5)) << "bf16 diverges within 5 generated tokens";
}

// llama2.c's run.c (karpathy/llama2.c 350e04f, stderr printing each id) on aidreams260K, context 128:
// `run aidreams260K.bin -z tok512.bin -t 0 -n 128 -i "I dream of"` gives 129 ids, 7 of them the prompt:
// 128 forward passes, and the token chosen from the last position's logits is the 129th.
const std::vector<int64_t> kAidreamsToTheContextEnd = {
    1,   303, 281, 269, 435, 447, 275, 429, 464, 448, 464, 464, 464, 464, 464, 464, 448, 429, 468, 342, 358, 402, 327, 446, 299, 303,
    266, 437, 443, 434, 438, 451, 306, 443, 259, 430, 446, 299, 303, 266, 437, 443, 434, 438, 451, 306, 443, 259, 430, 446, 299, 303,
    384, 311, 434, 446, 262, 263, 428, 434, 436, 451, 275, 429, 464, 448, 464, 464, 464, 464, 464, 464, 464, 448, 429, 468, 342, 358,
    402, 327, 446, 262, 263, 428, 434, 436, 451, 275, 429, 464, 448, 464, 464, 464, 464, 464, 464, 448, 429, 468, 342, 358, 402, 327,
    446, 262, 429, 453, 435, 285, 361, 437, 431, 440, 437, 445, 430, 275, 429, 464, 448, 464, 464, 464, 464, 448, 429, 468, 342};

TEST(StarterAtTheContextEnd, EmitsTheTokenOfTheLastPositionAloneAndOnATwoNodeRing) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const auto model = shared / "models" / "aidreams260K";
  ChildProcess prepare({(mdi::test::bin_dir() / "prepare_model").string(), (model / "aidreams260K.bin").string(), "--tokenizer",
                        (model / "tok512.bin").string(), "--n-nodes", "2", "--out", (dir / "aidreams").string()},
                       dir.path(), "prepare");
  ASSERT_EQ(prepare.wait(seconds(60)), 0) << prepare.err();
  const auto config = mdi::test::loopback_nodes_config(2, {{"connect_s", 20}, {"accept_s", 20}, {"receive_s", 20}, {"http_init_s", 30}});
  std::ofstream(dir / "nodes.json") << config.dump(2);
  ChildProcess secondary({(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", (dir / "nodes.json").string(), "0", "--device",
                          "cpu", "--threads", "1", "--chunk-cache", (dir / "cache").string()},
                         dir.path(), "secondary0");

  for (const std::string mode : {"standalone", "ring"}) {
    std::vector<std::string> argv = {(mdi::test::bin_dir() / "starter").string(), "--ckpt", (dir / "aidreams").string(), "--prompt",
                                     "I dream of", "--n-tokens", "128", "--temperature", "0", "--threads", "1", "--out",
                                     (dir / (mode + ".json")).string()};
    if (mode == "ring") argv.insert(argv.end(), {"--nodes-config", (dir / "nodes.json").string()});
    ChildProcess starter(argv, dir.path(), "starter-" + mode);
    ASSERT_EQ(starter.wait(seconds(120)), 0) << mode << "\n" << starter.err();
    const auto sample = nlohmann::json::parse(mdi::test::read_file(dir / (mode + ".json"))).at("samples").at(0);
    EXPECT_EQ(sample.at("tokens").get<std::vector<int64_t>>(), kAidreamsToTheContextEnd) << mode;
    EXPECT_EQ(sample.at("stop_reason"), "context") << mode;
  }
  EXPECT_EQ(secondary.wait(seconds(30)), 0) << "the secondary did not exit on the starter's PUT /stop\n" << secondary.err();
}

}  // namespace
