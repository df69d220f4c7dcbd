// The distributed ring with real processes on loopback: secondaries as
// daemons, the starter as a client, ports picked free by the test. MDI-LLM's
// own nodes-config files are used unchanged but for their port numbers.
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/net/http/control_plane.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "tests/support.hpp"

namespace {
namespace fs = std::filesystem;
using mdi::test::ChildProcess;
using std::chrono::seconds;

struct ReferenceCase {
  std::string prompt;
  std::vector<int64_t> tokens;
};

class Ring : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto shared = mdi::test::shared_dir();
    if (!shared) return;
    scratch_ = new mdi::test::ScratchDir();
    model_dir_ = scratch_->path() / "stories260K";
    auto reader = mdi::open_llama2c(*shared / "models/stories260K/stories260K.bin", *shared / "models/stories260K/tok512.bin");
    mdi::write_model_directory(*reader, model_dir_, torch::kFloat32, "stories260K", nullptr);
    for (size_t n : {2, 3}) mdi::write_chunks(model_dir_, mdi::balanced_layer_counts(reader->config(), n), nullptr);
    std::ifstream in(*shared / "reference/llama2c_greedy.json");
    for (auto& c : nlohmann::json::parse(in)) references_.push_back({c["prompt"], c["tokens"].get<std::vector<int64_t>>()});
    std::ofstream(scratch_->path() / "prompts.txt") << "Once upon a time\n\nThe cat sat on the mat\n";
  }
  static void TearDownTestSuite() {
    delete scratch_;
    scratch_ = nullptr;
  }
  void SetUp() override {
    if (!scratch_) GTEST_SKIP() << "../shared is absent (fresh clone): skipping ring tests on stories260K";
  }

  // MDI-LLM's config for n nodes, with free ports; written into the scratch dir.
  fs::path write_config(size_t n_nodes, const std::string& name) {
    auto shared = *mdi::test::shared_dir();
    std::ifstream in(shared / "mdi-configs" / (n_nodes == 2 ? "config_2gpus.json" : "configuration.json"));
    auto config = nlohmann::json::parse(in);
    auto set_ports = [](nlohmann::json& node) {
      node["communication"]["port"] = mdi::test::free_tcp_port();
      node["inference"]["port_in"] = mdi::test::free_tcp_port();
      node["inference"]["port_out"] = mdi::test::free_tcp_port();
    };
    set_ports(config["nodes"]["starter"]);
    for (auto& s : config["nodes"]["secondary"]) set_ports(s);
    const fs::path path = scratch_->path() / (name + ".json");
    std::ofstream(path) << config.dump(2);
    return path;
  }

  std::unique_ptr<ChildProcess> start_secondary(const fs::path& config, size_t index, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", config.string(), std::to_string(index),
                                     "--device", "cpu", "--threads", "1", "--chunk-cache", (scratch_->path() / ("cache" + std::to_string(index))).string(),
                                     "--chunk-dir", scratch_->path().string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return std::make_unique<ChildProcess>(args, scratch_->path(), config.stem().string() + "-secondary" + std::to_string(index));
  }

  struct StarterRun {
    int exit_code;
    nlohmann::json result;
    std::string err;
  };

  StarterRun run_starter(const std::string& log_name, std::vector<std::string> args) {
    const fs::path out = scratch_->path() / (log_name + "-out.json");  // beside, never over, the test's config files
    std::vector<std::string> argv = {(mdi::test::bin_dir() / "starter").string(), "--ckpt", model_dir_.string(), "--device", "cpu",
                                     "--threads", "1", "--out", out.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess starter(argv, scratch_->path(), log_name);
    auto code = starter.wait(seconds(240));
    StarterRun run{code.value_or(-1), nullptr, starter.err()};
    if (code == 0) run.result = nlohmann::json::parse(mdi::test::read_file(out));
    return run;
  }

  // The reference ids of `prompt`, cut to what a budget of n_tokens new tokens produces.
  std::vector<int64_t> expected(const std::string& prompt, size_t n_prompt_tokens, size_t n_tokens) {
    for (auto& r : references_)
      if (r.prompt == prompt) return {r.tokens.begin(), r.tokens.begin() + std::min(r.tokens.size(), n_prompt_tokens + n_tokens)};
    ADD_FAILURE() << "no reference for \"" << prompt << "\"";
    return {};
  }

  void expect_reference_greedy(const StarterRun& run, size_t n_samples, size_t n_tokens, const std::string& what) {
    ASSERT_EQ(run.exit_code, 0) << what << "\n" << run.err;
    const auto& samples = run.result["samples"];
    ASSERT_EQ(samples.size(), n_samples) << what;
    for (size_t i = 0; i < n_samples; ++i) {
      const std::string prompt = samples[i]["prompt"];
      EXPECT_EQ(prompt, i % 2 == 0 ? "Once upon a time" : "The cat sat on the mat") << what << " sample " << i;
      auto tokens = samples[i]["tokens"].get<std::vector<int64_t>>();
      EXPECT_EQ(tokens, expected(prompt, samples[i]["prompt_tokens"].size(), n_tokens)) << what << " sample " << i;
    }
  }

  std::vector<std::string> greedy_args(size_t n_samples, size_t n_tokens) {
    return {"--n-samples", std::to_string(n_samples), "--n-tokens", std::to_string(n_tokens), "--temperature", "0",
            "--prompt", "FILE:" + (scratch_->path() / "prompts.txt").string()};
  }

  static inline mdi::test::ScratchDir* scratch_ = nullptr;
  static inline fs::path model_dir_;
  static inline std::vector<ReferenceCase> references_;
};

TEST_F(Ring, GreedyTokensEqualTheReferenceOnTwoAndThreeNodesWithOneThreeAndFiveSamples) {
  const size_t n_tokens = 60;
  auto standalone = run_starter("standalone", greedy_args(5, n_tokens));
  expect_reference_greedy(standalone, 5, n_tokens, "standalone");

  for (size_t n_nodes : {2, 3}) {
    auto config = write_config(n_nodes, "greedy" + std::to_string(n_nodes));
    std::vector<std::unique_ptr<ChildProcess>> secondaries;
    for (size_t i = 0; i + 1 < n_nodes; ++i) secondaries.push_back(start_secondary(config, i));
    // the same secondaries serve every run: --keep-nodes leaves them idle for the next starter
    for (size_t n_samples : {1, 3, 5}) {
      const std::string what = std::to_string(n_nodes) + " nodes, " + std::to_string(n_samples) + " samples";
      const bool last = n_samples == 5;
      auto args = greedy_args(n_samples, n_tokens);
      args.insert(args.end(), {"--nodes-config", config.string()});
      if (!last) args.push_back("--keep-nodes");
      if (n_samples == 3) args.push_back("--upload-chunks");
      // 5 samples: micro-batches of 3 (the default for 2 nodes) and of all 5 (asked for on 3 nodes)
      if (last && n_nodes == 3) args.insert(args.end(), {"--micro-batch", "5"});
      auto run = run_starter("ring" + std::to_string(n_nodes) + "-" + std::to_string(n_samples), args);
      expect_reference_greedy(run, n_samples, n_tokens, what);
      if (run.exit_code == 0) {
        EXPECT_EQ(run.result["stats"]["n_nodes"], n_nodes);
        const auto frames = run.result["stats"]["nodes"]["secondary0"]["stage"]["frames"].get<int64_t>();
        int64_t steps = 0;  // forward passes of single samples
        for (auto& sample : run.result["samples"]) steps += sample["tokens"].size() - sample["prompt_tokens"].size();
        EXPECT_GT(frames, 0) << what;
        if (n_samples == 5) {
          EXPECT_LE(frames, steps / 2) << what << ": the samples should travel in micro-batches";
        }
      }
    }
    for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << "a secondary did not exit on PUT /stop\n" << s->err();
  }
}

TEST_F(Ring, SeededSamplingGivesTheSameSamplesOnOneTwoAndThreeNodes) {
  const std::vector<std::string> sampling = {"--n-samples", "3", "--n-tokens", "40", "--temperature", "0.9", "--top-k", "40",
                                             "--seed", "1234", "--prompt", "Once upon a time"};
  auto standalone = run_starter("seeded1", sampling);
  ASSERT_EQ(standalone.exit_code, 0) << standalone.err;
  auto tokens_of = [](const nlohmann::json& result) {
    std::vector<std::vector<int64_t>> out;
    for (auto& s : result["samples"]) out.push_back(s["tokens"].get<std::vector<int64_t>>());
    return out;
  };
  const auto reference = tokens_of(standalone.result);
  EXPECT_NE(reference[0], reference[1]) << "samples should differ: each has its own stream";
  for (size_t n_nodes : {2, 3}) {
    auto config = write_config(n_nodes, "seeded" + std::to_string(n_nodes));
    std::vector<std::unique_ptr<ChildProcess>> secondaries;
    for (size_t i = 0; i + 1 < n_nodes; ++i) secondaries.push_back(start_secondary(config, i));
    auto args = sampling;
    args.insert(args.end(), {"--nodes-config", config.string()});
    auto run = run_starter("seeded" + std::to_string(n_nodes), args);
    ASSERT_EQ(run.exit_code, 0) << run.err;
    EXPECT_EQ(tokens_of(run.result), reference) << n_nodes << " nodes";
  }
}

TEST_F(Ring, AWrongChunkIsRefusedNamingTheNodeAndWhatDiffers) {
  auto config = write_config(2, "wrongsha");
  // the 3-node split's chunk is not the one a 2-node run needs
  const fs::path wrong = mdi::manifest_path(model_dir_, 3).parent_path() / "secondary0.safetensors";
  auto secondary = start_secondary(config, 0, {"--chunk", wrong.string()});
  auto run = run_starter("wrongsha", {"--nodes-config", config.string(), "--n-tokens", "5", "--prompt", "Hi"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.err.find("secondary 0"), std::string::npos) << run.err;
  // The wrong file differs in size already, so the node says so without hashing it.
  EXPECT_NE(run.err.find("bytes, the starter's manifest says"), std::string::npos) << run.err;
  // the refused node is still idle and serving
  const auto port = nlohmann::json::parse(mdi::test::read_file(config))["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>();
  mdi::ControlClient client("127.0.0.1", port);
  auto status = client.request("GET", "/status");
  EXPECT_EQ(status.body["state"], "idle");
  EXPECT_NE(status.body["last_error"].get<std::string>().find("the starter's manifest says"), std::string::npos) << status.body;
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(30)), 0) << secondary->err();
}

}  // namespace
