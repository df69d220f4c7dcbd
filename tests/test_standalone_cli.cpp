// The starter's command line as a careless user meets it: mistakes refused
// before any loading, --tokenizer honoured wherever it is given, and a warning
// where a run cannot give what was asked.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <csignal>
#include <fstream>

#include <gmock/gmock.h>

#include "tests/support.hpp"

namespace {

struct Outcome {
  int code;
  std::string err;
};

Outcome run_starter(const mdi::test::ScratchDir& dir, std::vector<std::string> args) {
  args.insert(args.begin(), (mdi::test::bin_dir() / "starter").string());
  mdi::test::ChildProcess starter(args, dir.path(), "starter");
  const auto code = starter.wait(std::chrono::seconds(60));
  return {code.value_or(-1), starter.err() + starter.out()};
}

TEST(StarterCli, TopPZeroIsRefusedAtParseTime) {
  mdi::test::ScratchDir dir;
  // The model does not exist: a refusal that names --top-p came before any loading.
  const auto [code, err] = run_starter(dir, {"--ckpt", (dir / "absent").string(), "--top-p", "0"});
  EXPECT_NE(code, 0);
  EXPECT_NE(err.find("--top-p"), std::string::npos) << err;
  EXPECT_NE(err.find("0 would keep no token"), std::string::npos) << err;
  EXPECT_EQ(err.find("absent"), std::string::npos) << "refused before looking at the model: " << err;
}

TEST(StarterCli, PlotsWithoutTimeRunIsRefusedNamingBoth) {
  mdi::test::ScratchDir dir;
  const auto [code, err] = run_starter(dir, {"--ckpt", (dir / "absent").string(), "-p"});
  EXPECT_NE(code, 0);
  EXPECT_NE(err.find("--plots requires --time-run"), std::string::npos) << err;
}

TEST(StarterCli, AnOutputThatIsOneOfTheRunsInputsIsRefusedBeforeTheRun) {
  mdi::test::ScratchDir dir;
  const auto config = dir / "config.json";
  const std::string text = R"({"nodes": {"starter": {"addr": "127.0.0.1", "communication": {"port": 8088}}}})";
  std::ofstream(config) << text;
  std::ofstream(dir / "prompts.txt") << "Once\n";
  for (const auto& [args, named] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--nodes-config", config.string(), "--out", config.string()}, "--out " + config.string() + " is the --nodes-config file"},
           {{"--prompt", "FILE:" + (dir / "prompts.txt").string(), "--out", (dir / "prompts.txt").string()}, "is the --prompt FILE: file"}}) {
    std::vector<std::string> argv = {"--ckpt", (dir / "absent").string()};
    argv.insert(argv.end(), args.begin(), args.end());
    const auto [code, err] = run_starter(dir, argv);
    EXPECT_EQ(code, 1);
    EXPECT_NE(err.find(named), std::string::npos) << err;
  }
  EXPECT_EQ(mdi::test::read_file(config), text);
  EXPECT_EQ(mdi::test::read_file(dir / "prompts.txt"), "Once\n");
}

TEST(StarterCli, NTokensPastTheContextWarnsAndStopsThere) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const auto model = shared / "models" / "stories260K";
  // 5 prompt tokens in a context of 16: 16 positions, and the last one's logits give a 17th token
  auto run = [&](const std::string& n_tokens) {
    auto outcome = run_starter(dir, {"--ckpt", (model / "stories260K.bin").string(), "--tokenizer", (model / "tok512.bin").string(),
                                     "--prompt", "Once upon a time", "--block-size", "16", "--n-tokens", n_tokens, "--temperature",
                                     "0", "--out", (dir / "out.json").string()});
    EXPECT_EQ(outcome.code, 0) << outcome.err;
    return std::make_pair(outcome.err, nlohmann::json::parse(mdi::test::read_file(dir / "out.json")).at("samples").at(0));
  };
  const auto [past_err, past] = run("100");
  EXPECT_NE(past_err.find("--n-tokens 100 pass the context of 16 tokens"), std::string::npos) << past_err;
  EXPECT_EQ(past.at("tokens").size(), 17u) << past.dump();
  EXPECT_EQ(past.at("stop_reason"), "context");
  const auto [fits_err, fits] = run("12");
  EXPECT_EQ(fits_err.find("pass the context"), std::string::npos) << "5 + 12 tokens fit a context of 16: " << fits_err;
  EXPECT_EQ(fits.at("tokens").size(), 17u) << fits.dump();
  EXPECT_EQ(fits.at("stop_reason"), "length");
}

TEST(StarterCli, ABfloat16ModelRunsInBfloat16UnlessDtypeSaysOtherwise) {
  mdi::test::ScratchDir dir;
  mdi::test::ChildProcess prepare({(mdi::test::bin_dir() / "prepare_model").string(), "random:stories260K", "--dtype",
                                   "bfloat16", "--n-nodes", "2", "--out", (dir / "m").string()},
                                  dir.path(), "prepare");
  ASSERT_EQ(prepare.wait(std::chrono::seconds(60)), 0) << prepare.err();
  const std::vector<std::string> run = {"--ckpt", (dir / "m").string(), "--prompt", "Hi", "--n-tokens", "2"};
  const auto own = run_starter(dir, run);
  EXPECT_EQ(own.code, 0) << own.err;
  EXPECT_NE(own.err.find("dtype bfloat16: the weights' own (--dtype overrides)"), std::string::npos) << own.err;
  EXPECT_NE(own.err.find(", bfloat16 on cpu"), std::string::npos) << own.err;
  auto with_flag = run;
  with_flag.insert(with_flag.end(), {"--dtype", "float32"});
  const auto overridden = run_starter(dir, with_flag);
  EXPECT_EQ(overridden.code, 0) << overridden.err;
  EXPECT_NE(overridden.err.find(", float32 on cpu"), std::string::npos) << overridden.err;
}

TEST(StarterCli, TextThatIsNotUtf8IsWrittenWithReplacementCharactersAndExactIds) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const auto model = shared / "models" / "stories260K";
  // A stray 0xFF byte: the tokenizer's byte-fallback piece <0xFF> (id 258) carries it.
  const auto [code, err] = run_starter(
      dir, {"--ckpt", (model / "stories260K.bin").string(), "--tokenizer", (model / "tok512.bin").string(), "--prompt",
            "Once \xff upon", "--n-tokens", "4", "--temperature", "0", "--out", (dir / "out.json").string(),
            "--capture", "0", "--capture-out", (dir / "capture.safetensors").string()});
  ASSERT_EQ(code, 0) << err;
  const auto out = nlohmann::json::parse(mdi::test::read_file(dir / "out.json"));
  const auto& sample = out.at("samples").at(0);
  EXPECT_EQ(sample.at("prompt"), "Once \xEF\xBF\xBD upon");
  const auto ids = sample.at("prompt_tokens").get<std::vector<int64_t>>();
  EXPECT_NE(std::find(ids.begin(), ids.end(), 258), ids.end()) << sample.dump();
  EXPECT_NE(sample.at("text").get<std::string>().find("\xEF\xBF\xBD"), std::string::npos) << sample.dump();
  EXPECT_TRUE(std::filesystem::exists(dir / "capture.safetensors")) << err;
}

std::vector<int64_t> prompt_tokens_in(const std::filesystem::path& out) {
  return nlohmann::json::parse(mdi::test::read_file(out)).at("samples").at(0).at("prompt_tokens").get<std::vector<int64_t>>();
}

TEST(StarterCli, AnExplicitTokenizerWinsForAModelDirectoryARandomModelAndARingAndIsLogged) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const auto tok512 = (shared / "models" / "stories260K" / "tok512.bin").string();
  // random weights: prepare_model writes its synthetic byte-level tokenizer into the directory
  mdi::test::ChildProcess prepare({(mdi::test::bin_dir() / "prepare_model").string(), "random:stories260K", "--n-nodes", "2", "--out",
                                   (dir / "m").string()},
                                  dir.path(), "prepare");
  ASSERT_EQ(prepare.wait(std::chrono::seconds(60)), 0) << prepare.err();
  const auto config = mdi::test::loopback_nodes_config(2, {{"connect_s", 20}, {"accept_s", 20}, {"receive_s", 20}, {"http_init_s", 30}});
  std::ofstream(dir / "nodes.json") << config.dump(2);
  mdi::test::ChildProcess secondary({(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", (dir / "nodes.json").string(), "0",
                                     "--device", "cpu", "--threads", "1", "--chunk-cache", (dir / "cache").string()},
                                    dir.path(), "secondary0");
  const std::vector<int64_t> tok512_ids = {1, 403, 407, 261, 378};  // "Once upon a time", reference/llama2c_greedy.json
  const std::vector<std::vector<std::string>> runs = {
      {"--ckpt", (dir / "m").string()},
      {"--ckpt", "random:stories260K"},
      {"--ckpt", (dir / "m").string(), "--nodes-config", (dir / "nodes.json").string()},
  };
  for (const auto& where : runs) {
    std::vector<std::string> args = {"--tokenizer", tok512, "--prompt", "Once upon a time", "--n-tokens", "2", "--threads", "1", "--out",
                                     (dir / "out.json").string()};
    args.insert(args.begin(), where.begin(), where.end());
    const auto [code, err] = run_starter(dir, args);
    ASSERT_EQ(code, 0) << where[1] << "\n" << err;
    EXPECT_EQ(prompt_tokens_in(dir / "out.json"), tok512_ids) << where.back();
    EXPECT_NE(err.find("tokenizer " + tok512 + " (--tokenizer, 512 tokens)"), std::string::npos) << err;
  }
  EXPECT_EQ(secondary.wait(std::chrono::seconds(30)), 0) << secondary.err();

  // Llama 2's 32000 tokens would index past this model's 512-row embedding.
  const auto llama2 = (shared / "tokenizers" / "llama2" / "tokenizer.model").string();
  for (const std::string& ckpt : {(dir / "m").string(), std::string("random:stories260K")}) {
    const auto [code, err] = run_starter(dir, {"--ckpt", ckpt, "--tokenizer", llama2, "--prompt", "Hi", "--n-tokens", "1"});
    EXPECT_EQ(code, 1) << ckpt;
    EXPECT_NE(err.find("tokenizer " + llama2 + " has 32000 tokens, more than the model's vocabulary of 512"), std::string::npos) << err;
  }
}

// A run of minutes (4 layers of dim 1024 on one thread, 2000 tokens), stopped by a signal
// once its text streams: it prints and writes what it has, and says why it stopped.
TEST(StarterCli, SigintOrSigtermStopsAStandaloneRunKeepingItsTokensInOutAndOnStdout) {
  mdi::test::ScratchDir dir;
  mdi::test::ChildProcess prepare({(mdi::test::bin_dir() / "prepare_model").string(), "random:stories260K", "--n-nodes", "1", "--out",
                                   (dir / "m").string()},
                                  dir.path(), "prepare");
  ASSERT_EQ(prepare.wait(std::chrono::seconds(60)), 0) << prepare.err();
  const nlohmann::json shape = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 1024}, {"intermediate_size", 4096},
                                {"num_hidden_layers", 4}, {"num_attention_heads", 8}, {"num_key_value_heads", 8},
                                {"vocab_size", 512}, {"max_position_embeddings", 2048}, {"rms_norm_eps", 1e-5},
                                {"tie_word_embeddings", false}};
  std::ofstream(dir / "slow.json") << shape.dump();
  for (const auto& [signal, name] : std::vector<std::pair<int, std::string>>{{SIGINT, "SIGINT"}, {SIGTERM, "SIGTERM"}}) {
    const auto out = dir / (name + ".json");
    mdi::test::ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--ckpt", "random:" + (dir / "slow.json").string(),
                                     "--tokenizer", (dir / "m" / "tokenizer.bin").string(), "--prompt", "Once", "--n-tokens", "2000",
                                     "--threads", "1", "--seed", "3", "--out", out.string()},
                                    dir.path(), "starter-" + name);
    ASSERT_TRUE(mdi::test::wait_until([&] { return starter.out().size() > 30; }, std::chrono::seconds(60))) << starter.err();
    starter.kill(signal);
    const auto code = starter.wait(std::chrono::seconds(10));
    ASSERT_TRUE(code.has_value()) << name << " did not stop the run within 10 s";
    EXPECT_EQ(*code, 128 + signal) << starter.err();
    EXPECT_THAT(starter.err(), testing::HasSubstr("interrupted by " + name));
    const std::string printed = starter.out();
    EXPECT_THAT(printed, testing::EndsWith(" [interrupted]\n"));

    const auto result = nlohmann::json::parse(mdi::test::read_file(out));
    EXPECT_EQ(result.at("error"), "interrupted by " + name);
    const auto& sample = result.at("samples").at(0);
    EXPECT_EQ(sample.at("stop_reason"), "interrupted");
    const auto n_tokens = sample.at("tokens").size(), n_prompt = sample.at("prompt_tokens").size();
    EXPECT_GT(n_tokens, n_prompt);
    EXPECT_LT(n_tokens, n_prompt + 2000);
    EXPECT_EQ(result.at("stats").at("generated_tokens"), n_tokens - n_prompt);
    // what streamed is the text --out holds, up to the note
    EXPECT_EQ(printed.substr(0, printed.size() - std::string(" [interrupted]\n").size()), sample.at("text").get<std::string>());
  }
}

}  // namespace
