// prepare_model: conversion, splitting, partition tables, presets, bad input.
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/store/partition.hpp"
#include "tests/support.hpp"

namespace {
namespace fs = std::filesystem;

const std::vector<int64_t> kOnceUponATime = {1, 403, 407, 261, 378};

std::vector<int64_t> reference_tokens(const fs::path& shared) {
  std::ifstream in(shared / "reference" / "llama2c_greedy.json");
  return nlohmann::json::parse(in)[0]["tokens"].get<std::vector<int64_t>>();  // "Once upon a time", 200 steps
}

// Greedy generation through chunks chained in one process, as the ring chains them.
std::vector<int64_t> greedy_through(const std::vector<mdi::ModelChunk>& chunks, std::vector<int64_t> tokens, size_t total) {
  std::vector<mdi::KvCache> caches;
  for (auto& c : chunks) caches.push_back(c.new_cache());
  int64_t pos = 0;
  std::vector<int64_t> input = tokens;
  while (tokens.size() < total) {
    torch::Tensor x = torch::tensor(input);
    for (size_t i = 0; i < chunks.size(); ++i) x = chunks[i].forward(x, caches[i], pos);
    pos += int64_t(input.size());
    const int64_t next = x[0].argmax().item<int64_t>();
    tokens.push_back(next);
    if (next == 1 || next == 2) break;
    input = {next};
  }
  return tokens;
}

std::vector<mdi::ModelChunk> load_split(const fs::path& dir, size_t n_nodes) {
  auto manifest = mdi::ChunkManifest::load(mdi::manifest_path(dir, n_nodes));
  std::vector<mdi::ModelChunk> chunks;
  // Ring order: the starter's layers, the secondaries', then the starter's head.
  auto starter = mdi::open_node_chunk(dir, n_nodes, 0);
  chunks.push_back(mdi::load_chunk(*starter.reader, {starter.spec().layers, true, false}, torch::kCPU, torch::kFloat32));
  for (size_t i = 1; i < n_nodes; ++i) {
    auto node = mdi::open_node_chunk(dir, n_nodes, i);
    chunks.push_back(mdi::load_chunk(*node.reader, node.spec(), torch::kCPU, torch::kFloat32));
  }
  const auto& c = manifest.model;
  chunks.push_back(mdi::load_chunk(*starter.reader, {{c.n_layers, c.n_layers}, false, true}, torch::kCPU, torch::kFloat32));
  return chunks;
}

TEST(Prepare, EverySplitOfStories260KGivesTheReferenceGreedyTokens) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  auto reader = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", shared / "models/stories260K/tok512.bin");
  ASSERT_TRUE(mdi::write_model_directory(*reader, dir.path(), torch::kFloat32, "stories260K", nullptr));
  EXPECT_FALSE(mdi::write_model_directory(*reader, dir.path(), torch::kFloat32, "stories260K", nullptr)) << "not reused";
  EXPECT_TRUE(fs::exists(dir / "tokenizer.bin"));
  const auto expected = reference_tokens(shared);
  for (size_t n = 1; n <= 5; ++n) {
    auto manifest = mdi::write_chunks(dir.path(), mdi::balanced_layer_counts(reader->config(), n), nullptr);
    ASSERT_EQ(manifest.nodes.size(), n);
    for (auto& e : manifest.nodes) {
      auto file = mdi::manifest_path(dir.path(), n).parent_path() / e.file;
      EXPECT_EQ(fs::file_size(file), e.bytes);
      EXPECT_EQ(e.sha256.size(), 64u);
    }
    EXPECT_EQ(greedy_through(load_split(dir.path(), n), kOnceUponATime, expected.size()), expected) << n << " nodes";
  }
}

TEST(Prepare, HuggingFaceDirectoryLoadsBackWithTheSameTokensAsTheLlama2cOriginal) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  auto original = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  mdi::write_model_directory(*original, dir.path(), torch::kFloat32, "x", nullptr);
  auto converted = mdi::open_checkpoint(dir.path().string());
  EXPECT_EQ(converted->config(), original->config());
  auto whole = [](const mdi::CheckpointReader& r) {
    std::vector<mdi::ModelChunk> v;
    v.push_back(mdi::load_chunk(r, {{0, r.config().n_layers}, true, true}, torch::kCPU, torch::kFloat32));
    return v;
  };
  auto a = greedy_through(whole(*original), kOnceUponATime, 120), b = greedy_through(whole(*converted), kOnceUponATime, 120);
  EXPECT_EQ(a, b);
  const auto reference = reference_tokens(shared);
  EXPECT_EQ(a, std::vector<int64_t>(reference.begin(), reference.begin() + 120));
}

TEST(Prepare, ShardedHuggingFaceDirectoryWithAnIndexGivesTheSameTokens) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  auto original = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  const auto& c = original->config();
  // two shards, split after layer 2, and the index that maps names to them
  const auto names = mdi::chunk_tensor_names(c, {{0, c.n_layers}, true, true});
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  std::vector<std::string> shard_names[2];
  for (auto& n : names) {
    const bool late = n.find("layers.3.") != std::string::npos || n.find("layers.4.") != std::string::npos || n == mdi::tensor_name::kFinalNorm;
    shard_names[late].push_back(n);
    index["weight_map"][n] = late ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  }
  for (int shard = 0; shard < 2; ++shard) {
    std::vector<mdi::SafetensorsWriter::Entry> entries;
    for (auto& n : shard_names[shard]) entries.push_back({n, "F32", mdi::tensor_shape(c, n)});
    mdi::SafetensorsWriter writer(dir / (shard == 0 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors"), entries);
    for (auto& n : shard_names[shard]) {
      auto t = original->read(n).contiguous();
      writer.write(n, t.data_ptr(), t.numel() * 4);
    }
    writer.commit();
  }
  std::ofstream(dir / "model.safetensors.index.json") << index.dump();
  std::ofstream(dir / "config.json") << c.to_hf_json().dump();
  auto sharded = mdi::open_checkpoint(dir.path().string());
  std::vector<mdi::ModelChunk> whole;
  whole.push_back(mdi::load_chunk(*sharded, {{0, c.n_layers}, true, true}, torch::kCPU, torch::kFloat32));
  const auto reference = reference_tokens(shared);
  EXPECT_EQ(greedy_through(whole, kOnceUponATime, reference.size()), reference);
}

TEST(Prepare, HalfPrecisionDirectoriesLoadAndGenerate) {
  MDI_REQUIRE_SHARED(shared);
  auto original = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    mdi::test::ScratchDir dir;
    mdi::write_model_directory(*original, dir.path(), dtype, "x", nullptr);
    mdi::SafetensorsFile file(dir / "model.safetensors");
    EXPECT_EQ(file.tensors()[0].dtype, mdi::safetensors_dtype(dtype));
    auto converted = mdi::open_checkpoint(dir.path().string());
    std::vector<mdi::ModelChunk> whole;
    whole.push_back(mdi::load_chunk(*converted, {{0, 5}, true, true}, torch::kCPU, torch::kFloat32));
    // half-precision weights, float32 arithmetic: the story starts as the reference does
    auto tokens = greedy_through(whole, kOnceUponATime, 20);
    const auto reference = reference_tokens(shared);
    EXPECT_EQ(tokens, std::vector<int64_t>(reference.begin(), reference.begin() + 20)) << mdi::dtype_name(dtype);
  }
}

mdi::ModelConfig preset(const std::string& name) { return mdi::open_random("random:" + name, 0)->config(); }

TEST(Prepare, RandomPresetsHaveTheRealModelsParameterCounts) {
  EXPECT_EQ(preset("tinyllama-1.1b").parameter_count(), 1100048384);
  EXPECT_EQ(preset("llama-2-7b").parameter_count(), 6738415616);
  EXPECT_EQ(preset("llama-3-8b").parameter_count(), 8030261248);
  EXPECT_EQ(preset("llama-3.1-70b").parameter_count(), 70553706496);
  EXPECT_EQ(preset("llama-3.1-70b").n_layers, 80);
}

TEST(Prepare, RandomStories260KWritesExactlyTheRealModelsTensors) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  auto random = mdi::open_random("random:stories260K", 3);
  auto real = mdi::open_llama2c(shared / "models/stories260K/stories260K.bin", std::nullopt);
  EXPECT_EQ(random->config(), real->config());
  mdi::write_model_directory(*random, dir.path(), torch::kFloat32, "r", nullptr);
  mdi::SafetensorsFile file(dir / "model.safetensors");
  int64_t numel = 0;
  for (auto& t : file.tensors()) numel += t.numel();
  EXPECT_EQ(numel, real->config().parameter_count());
  // random models get a synthetic byte-level tokenizer that round-trips text
  auto tokenizer = mdi::load_tokenizer(dir / "tokenizer.bin");
  auto ids = tokenizer->encode("Hello, wörld!", true);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(tokenizer->decode(ids), "Hello, wörld!");
}

TEST(Partition, StarterGetsFewerLayersBecauseItAlsoRunsTheHead) {
  auto c = preset("tinyllama-1.1b");  // 22 layers; the head weighs ~1.5 layers
  EXPECT_EQ(mdi::balanced_layer_counts(c, 1), (std::vector<int64_t>{22}));
  EXPECT_EQ(mdi::balanced_layer_counts(c, 2), (std::vector<int64_t>{10, 12}));
  EXPECT_EQ(mdi::balanced_layer_counts(c, 3), (std::vector<int64_t>{6, 8, 8}));
  auto big = preset("llama-3.1-70b");  // 80 layers over 4 GPUs
  EXPECT_EQ(mdi::balanced_layer_counts(big, 4), (std::vector<int64_t>{19, 20, 20, 21}));
}

TEST(Partition, WeightedNodesGetWorkInProportionToTheirSpeed) {
  auto c = preset("llama-2-7b");  // 32 layers, head ≈ 0.6 layer
  // a secondary twice as fast as the others gets twice the layers
  EXPECT_EQ(mdi::balanced_layer_counts(c, 3, {1, 2, 1}), (std::vector<int64_t>{7, 17, 8}));
  EXPECT_EQ(mdi::balanced_layer_counts(c, 2, {1, 3}), (std::vector<int64_t>{7, 25}));
}

TEST(Partition, ImpossibleRequestsAreRefusedWithAReason) {
  auto c = preset("stories260K");
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const mdi::PartitionError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(message([&] { mdi::balanced_layer_counts(c, 6); }).find("5 layers over 6 nodes"), std::string::npos);
  EXPECT_NE(message([&] { mdi::check_layer_counts(c, 2, {2, 2}); }).find("sum to 4"), std::string::npos);
  EXPECT_NE(message([&] { mdi::check_layer_counts(c, 3, {2, 3}); }).find("2 counts for 3 nodes"), std::string::npos);
  EXPECT_NE(message([&] { mdi::check_layer_counts(c, 2, {0, 5}); }).find("at least one layer"), std::string::npos);
  EXPECT_NE(message([&] { mdi::balanced_layer_counts(c, 2, {1, -1}); }).find("positive"), std::string::npos);
}

// Runs the prepare_model binary; returns (exit code, stderr).
std::pair<int, std::string> prepare(const mdi::test::ScratchDir& dir, std::vector<std::string> args) {
  args.insert(args.begin(), (mdi::test::bin_dir() / "prepare_model").string());
  mdi::test::ChildProcess p(args, dir.path(), "prepare");
  auto code = p.wait(std::chrono::seconds(120));
  return {code.value_or(-1), p.err()};
}

TEST(PrepareModelBinary, SplitsWithExplicitLayersAndPrintsTheTable) {
  mdi::test::ScratchDir dir;
  auto out = dir / "m";
  mdi::test::ChildProcess p({(mdi::test::bin_dir() / "prepare_model").string(), "random:stories260K", "--n-nodes", "3", "--layers",
                             "1,2,2", "--out", out.string()},
                            dir.path(), "prepare");
  ASSERT_EQ(p.wait(std::chrono::seconds(120)), 0) << p.err();
  EXPECT_NE(p.out().find("[  1,   3)"), std::string::npos) << p.out();
  auto manifest = mdi::ChunkManifest::load(mdi::manifest_path(out, 3));
  EXPECT_EQ(manifest.secondary(1).layer_begin, 3);
  EXPECT_EQ(manifest.secondary(1).layer_end, 5);
}

TEST(PrepareModelBinary, BadInputGivesOneLineNamingTheFileAndLeavesNoPartialOutput) {
  mdi::test::ScratchDir dir;
  auto out = dir / "out";
  // a config without required fields
  fs::create_directories(dir / "noconf");
  std::ofstream(dir / "noconf" / "config.json") << R"({"hidden_size": 64})";
  std::ofstream(dir / "noconf" / "model.safetensors") << "x";
  // a corrupt safetensors header
  fs::create_directories(dir / "corrupt");
  std::ofstream(dir / "corrupt" / "config.json") << mdi::open_random("random:stories260K", 0)->config().to_hf_json().dump();
  std::ofstream(dir / "corrupt" / "model.safetensors", std::ios::binary) << std::string("\x10\0\0\0\0\0\0\0{\"a\": broken}   ", 24);
  // a truncated llama2.c file
  std::ofstream(dir / "trunc.bin", std::ios::binary) << std::string("\x40\0\0\0\xac\0\0\0\x05\0\0\0\x08\0\0\0\x04\0\0\0\0\x02\0\0\0\x02\0\0", 28) << "xx";
  // dims near 2^30 whose tensor sizes pass 64 bits, and vocab_size INT32_MIN (an untied classifier)
  std::ofstream(dir / "huge.bin", std::ios::binary)
      << std::string("\0\0\0\x40\0\0\0\x40\0\0\0\x40\x10\0\0\0\x10\0\0\0\0\0\0\x80\0\x01\0\0", 28) << "xx";
  struct Case {
    std::string model, expect_file, expect_problem;
  } cases[] = {
      {(dir / "missing.bin").string(), "missing.bin", "no such file"},
      {(dir / "noconf").string(), "config.json", "intermediate_size"},
      {(dir / "corrupt").string(), "model.safetensors", "corrupt safetensors header"},
      {(dir / "trunc.bin").string(), "trunc.bin", "truncated"},
      {(dir / "huge.bin").string(), "huge.bin", "puts \"" + std::string(mdi::tensor_name::kEmbedding) + "\" (9223372036854775808 bytes)"},
  };
  for (auto& c : cases) {
    auto [code, err] = prepare(dir, {c.model, "--n-nodes", "2", "--out", out.string()});
    EXPECT_EQ(code, 1) << c.model;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_NE(err.find(c.expect_file), std::string::npos) << err;
    EXPECT_NE(err.find(c.expect_problem), std::string::npos) << err;
    EXPECT_FALSE(fs::exists(out / "model.safetensors")) << c.model;
    EXPECT_FALSE(fs::exists(mdi::manifest_path(out, 2))) << c.model;
  }
  auto [code, err] = prepare(dir, {"random:stories260K", "--n-nodes", "6", "--out", out.string()});
  EXPECT_EQ(code, 1);
  EXPECT_NE(err.find("5 layers over 6 nodes"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(out / "model.safetensors")) << "the split is checked before converting";
}

TEST(PrepareModelBinary, ARandomPresetWithADotKeepsItsWholeNameAsTheDefaultDirectory) {
  mdi::test::ScratchDir dir;
  // Too many nodes: it stops before writing 4 GB, after saying where it would have.
  auto [code, err] = prepare(dir, {"random:tinyllama-1.1b", "--n-nodes", "100"});
  EXPECT_EQ(code, 1);
  EXPECT_NE(err.find("into models/random-tinyllama-1.1b\n"), std::string::npos) << err;
}

// The ids the starter encodes `prompt` to with the tokenizer of model directory `model`.
std::vector<int64_t> starter_prompt_tokens(const mdi::test::ScratchDir& dir, const fs::path& model, const std::string& prompt) {
  mdi::test::ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--ckpt", model.string(), "--prompt", prompt,
                                   "--n-tokens", "1", "--threads", "1", "--out", (dir / "out.json").string()},
                                  dir.path(), "starter");
  EXPECT_EQ(starter.wait(std::chrono::seconds(60)), 0) << starter.err();
  return nlohmann::json::parse(mdi::test::read_file(dir / "out.json")).at("samples").at(0).at("prompt_tokens").get<std::vector<int64_t>>();
}

TEST(PrepareModelBinary, AnExplicitTokenizerIsShippedWithRandomWeightsAndInAnInPlaceSplit) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  // stories260K's shape with Llama 3's vocabulary
  auto config = mdi::open_random("random:stories260K", 0)->config();
  config.vocab_size = 128256;
  std::ofstream(dir / "config.json") << config.to_hf_json().dump();
  const auto llama3 = (shared / "tokenizers" / "llama3" / "tokenizer.json").string();
  const auto model = dir / "m";
  auto [code, err] = prepare(dir, {"random:" + (dir / "config.json").string(), "--tokenizer", llama3, "--n-nodes", "1", "--out", model.string()});
  ASSERT_EQ(code, 0) << err;
  EXPECT_EQ(err.find("ships no tokenizer"), std::string::npos) << err;
  EXPECT_NE(err.find("tokenizer " + llama3 + " (--tokenizer, 128256 tokens)"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(model / "tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(model / "tokenizer.bin")) << "no synthetic tokenizer beside the real one";
  // reference/tokenizers.json's "Hello, my dog is cute", after BOS
  EXPECT_EQ(starter_prompt_tokens(dir, model, "Hello, my dog is cute"),
            (std::vector<int64_t>{128000, 9906, 11, 856, 5679, 374, 19369}));

  // Splitting the directory in place with another tokenizer replaces the one it holds.
  const auto llama2 = (shared / "tokenizers" / "llama2" / "tokenizer.model").string();
  std::tie(code, err) = prepare(dir, {model.string(), "--tokenizer", llama2, "--n-nodes", "2"});
  ASSERT_EQ(code, 0) << err;
  EXPECT_NE(err.find("tokenizer " + llama2 + " (--tokenizer, 32000 tokens)"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(model / "tokenizer.json"));
  EXPECT_FALSE(fs::exists(model / "tokenizer_config.json"));
  EXPECT_EQ(starter_prompt_tokens(dir, model, "Hello, my dog is cute"), (std::vector<int64_t>{1, 15043, 29892, 590, 11203, 338, 274, 1082}));
}

TEST(PrepareModelBinary, ATokenizerLargerThanTheModelsVocabularyIsRefusedBeforeConverting) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const auto llama3 = (shared / "tokenizers" / "llama3" / "tokenizer.json").string();
  auto [code, err] = prepare(dir, {"random:stories260K", "--tokenizer", llama3, "--n-nodes", "1", "--out", (dir / "m").string()});
  EXPECT_EQ(code, 1);
  EXPECT_NE(err.find("tokenizer " + llama3 + " has 128256 tokens, more than the model's vocabulary of 512"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir / "m" / "model.safetensors"));
}

TEST(PrepareModelBinary, ConvertingAgainInAnotherDtypeRemovesTheOldModelsSplitsAndSaysSo) {
  mdi::test::ScratchDir dir;
  const auto model = dir / "m";
  for (const char* n_nodes : {"2", "3"}) {
    auto [code, err] = prepare(dir, {"random:stories260K", "--n-nodes", n_nodes, "--out", model.string()});
    ASSERT_EQ(code, 0) << err;
  }
  EXPECT_TRUE(fs::exists(mdi::manifest_path(model, 2))) << "the float32 model was reused for the second split";
  auto [code, err] = prepare(dir, {"random:stories260K", "--n-nodes", "3", "--dtype", "bfloat16", "--out", model.string()});
  ASSERT_EQ(code, 0) << err;
  EXPECT_NE(err.find(model.string() + " held random:stories260K seed 0 as float32; converting random:stories260K seed 0 as bfloat16 "
                     "replaces it and removes its splits (2nodes, 3nodes), which would no longer match it"),
            std::string::npos)
      << err;
  EXPECT_FALSE(fs::exists(mdi::manifest_path(model, 2))) << "a float32 split beside a bfloat16 model";
  EXPECT_EQ(mdi::ChunkManifest::load(mdi::manifest_path(model, 3)).dtype, "bfloat16");
  EXPECT_EQ(mdi::SafetensorsFile(mdi::manifest_path(model, 3).parent_path() / "secondary0.safetensors").tensors()[0].dtype, "BF16");
}

}  // namespace
