// Hidden-state capture, interventions and the logit lens, standalone and on a
// 3-node ring of real processes on loopback, on a random model of
// stories260K's shape (so the tests run without ../shared). The ring must give
// bitwise the same hidden states (float32) and the same tokens as one process.
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/interp/hidden_states.hpp"
#include "common/interp/interventions.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/store/safetensors.hpp"
#include "common/wire/init_request.hpp"
#include "tests/support.hpp"

namespace {
namespace fs = std::filesystem;
using mdi::test::ChildProcess;
using std::chrono::seconds;

class Capture : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    scratch_ = new mdi::test::ScratchDir();
    model_dir_ = scratch_->path() / "model";
    auto reader = mdi::open_random("random:stories260K", 7);
    mdi::write_model_directory(*reader, model_dir_, torch::kFloat32, "random", nullptr);
    mdi::write_chunks(model_dir_, mdi::balanced_layer_counts(reader->config(), 3), nullptr);
    std::ofstream(scratch_->path() / "prompts.txt") << "Once upon a time\n\nThe cat sat on the mat\n\nA dog ran\n";
    std::ofstream(scratch_->path() / "happy.txt") << "She was happy and smiled\n";
    std::ofstream(scratch_->path() / "sad.txt") << "He was sad and cried\n";
  }
  static void TearDownTestSuite() {
    delete scratch_;
    scratch_ = nullptr;
  }

  static fs::path path(const std::string& name) { return scratch_->path() / name; }

  // A loopback nodes-config of 3 nodes on free ports.
  fs::path write_config(const std::string& name) {
    const auto config = mdi::test::loopback_nodes_config(3, {{"connect_s", 20}, {"accept_s", 20}, {"receive_s", 20}, {"http_init_s", 30}});
    const fs::path file = path(name + ".json");
    std::ofstream(file) << config.dump(2);
    return file;
  }

  // Two secondaries on `config`; --keep-nodes runs leave them idle for the next starter.
  std::vector<std::unique_ptr<ChildProcess>> start_secondaries(const fs::path& config) {
    std::vector<std::unique_ptr<ChildProcess>> out;
    for (size_t i = 0; i < 2; ++i)
      out.push_back(std::make_unique<ChildProcess>(
          std::vector<std::string>{(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", config.string(), std::to_string(i),
                                   "--device", "cpu", "--threads", "1", "--chunk-cache", path("cache" + std::to_string(i)).string(),
                                   "--chunk-dir", scratch_->path().string()},
          scratch_->path(), config.stem().string() + "-secondary" + std::to_string(i)));
    return out;
  }

  struct StarterRun {
    int exit_code;
    nlohmann::json result;
    std::string err;
  };

  StarterRun run_starter(const std::string& name, std::vector<std::string> args) {
    const fs::path out = path(name + ".json");
    std::vector<std::string> argv = {(mdi::test::bin_dir() / "starter").string(), "--ckpt", model_dir_.string(), "--device", "cpu",
                                     "--threads", "1", "--out", out.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess starter(argv, scratch_->path(), name);
    auto code = starter.wait(seconds(240));
    StarterRun run{code.value_or(-1), nullptr, starter.err()};
    if (code == 0) run.result = nlohmann::json::parse(mdi::test::read_file(out));
    return run;
  }

  static std::vector<std::string> greedy(const std::string& prompt_file = "prompts.txt", int n_samples = 3, int n_tokens = 12) {
    return {"--temperature", "0", "--n-samples", std::to_string(n_samples), "--n-tokens", std::to_string(n_tokens),
            "--prompt", "FILE:" + path(prompt_file).string()};
  }
  static std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  static std::vector<std::vector<int64_t>> tokens_of(const StarterRun& run) {
    std::vector<std::vector<int64_t>> out;
    for (auto& s : run.result["samples"]) out.push_back(s["tokens"].get<std::vector<int64_t>>());
    return out;
  }

  // Same tensors (names, dtypes, shapes, bytes) and same metadata.
  static void expect_bitwise_equal(const fs::path& a_path, const fs::path& b_path, const std::string& what) {
    mdi::SafetensorsFile a(a_path), b(b_path);
    EXPECT_EQ(a.metadata(), b.metadata()) << what;
    ASSERT_EQ(a.tensors().size(), b.tensors().size()) << what;
    for (const auto& ta : a.tensors()) {
      const mdi::TensorInfo* tb = b.find(ta.name);
      ASSERT_NE(tb, nullptr) << what << ": " << ta.name << " missing";
      EXPECT_EQ(ta.dtype, tb->dtype) << what << ": " << ta.name;
      EXPECT_EQ(ta.shape, tb->shape) << what << ": " << ta.name;
      ASSERT_EQ(ta.bytes, tb->bytes) << what << ": " << ta.name;
      EXPECT_EQ(std::memcmp(a.data(ta), b.data(*tb), ta.bytes), 0) << what << ": " << ta.name << " differs";
    }
  }

  static inline mdi::test::ScratchDir* scratch_ = nullptr;
  static inline fs::path model_dir_;
};

TEST_F(Capture, HiddenStatesOfEveryLayerAreBitwiseIdenticalOnThreeNodesAndStandaloneAndTokensDoNotChange) {
  auto plain = run_starter("plain", greedy());
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  const std::vector<std::string> capture_all = {"--capture", "all", "--logit-lens", "5"};
  auto alone = run_starter("alone-capture", plus(greedy(), plus(capture_all, {"--capture-out", path("alone.safetensors").string()})));
  ASSERT_EQ(alone.exit_code, 0) << alone.err;
  EXPECT_EQ(tokens_of(alone), tokens_of(plain)) << "capturing changed the tokens (standalone)";
  auto alone_last = run_starter("alone-last", plus(greedy(), {"--capture", "embed,1,3-4", "--capture-positions", "last", "--capture-out",
                                                              path("alone-last.safetensors").string()}));
  ASSERT_EQ(alone_last.exit_code, 0) << alone_last.err;

  const auto config = write_config("capture");
  auto secondaries = start_secondaries(config);
  const std::vector<std::string> ring = {"--nodes-config", config.string()};
  // Standalone runs batch their 3 samples; this ring run does too (--micro-batch 3), the next one
  // sends them one per frame: captures do not depend on the batching.
  auto distributed = run_starter("ring-capture", plus(greedy(), plus(ring, plus(capture_all, {"--keep-nodes", "--micro-batch", "3", "--capture-out",
                                                                                             path("ring.safetensors").string()}))));
  ASSERT_EQ(distributed.exit_code, 0) << distributed.err;
  EXPECT_EQ(tokens_of(distributed), tokens_of(plain)) << "capturing changed the tokens (3 nodes)";
  auto ring_last = run_starter("ring-last", plus(greedy(), plus(ring, {"--capture", "embed,1,3-4", "--capture-positions", "last",
                                                                       "--capture-out", path("ring-last.safetensors").string()})));
  ASSERT_EQ(ring_last.exit_code, 0) << ring_last.err;
  for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << "a secondary did not exit on PUT /stop\n" << s->err();

  expect_bitwise_equal(path("alone.safetensors"), path("ring.safetensors"), "--capture all");
  expect_bitwise_equal(path("alone-last.safetensors"), path("ring-last.safetensors"), "--capture-positions last");

  // every layer, every sample, every position fed through the model
  mdi::SafetensorsFile file(path("ring.safetensors"));
  EXPECT_EQ(file.metadata().at("layers"), R"(["embed",0,1,2,3,4])");
  EXPECT_EQ(file.metadata().at("dtype"), "float32");
  EXPECT_EQ(file.metadata().at("positions"), "all");
  const auto tokens = tokens_of(plain);
  for (size_t s = 0; s < 3; ++s) {
    const std::string key = "sample" + std::to_string(s);
    EXPECT_EQ(nlohmann::json::parse(file.metadata().at(key + ".tokens")).get<std::vector<int64_t>>(), tokens[s]);
    for (const std::string layer : {"embed", "layer0", "layer1", "layer2", "layer3", "layer4"}) {
      const auto& info = file.at(key + "." + layer);
      // the last token is never fed: it has no hidden state
      EXPECT_EQ(info.shape, (std::vector<int64_t>{int64_t(tokens[s].size()) - 1, 64})) << key << "." << layer;
    }
  }
  mdi::SafetensorsFile last(path("ring-last.safetensors"));
  EXPECT_EQ(last.metadata().at("positions"), "last");
  EXPECT_EQ(last.find("sample0.layer0"), nullptr);
  const int64_t prompt0 = int64_t(plain.result["samples"][0]["prompt_tokens"].size());
  EXPECT_EQ(last.at("sample0.layer4").shape, (std::vector<int64_t>{int64_t(tokens[0].size()) - prompt0, 64}));
  // a "last" row is the same row as in the "all" capture
  const auto& all4 = file.at("sample0.layer4");
  const auto& last4 = last.at("sample0.layer4");
  EXPECT_EQ(std::memcmp(file.data(all4) + (prompt0 - 1) * 64 * 4, last.data(last4), 64 * 4), 0);

  // logit lens: the same both ways; at the last layer its top token is the token greedy chose
  ASSERT_TRUE(alone.result.contains("logit_lens"));
  EXPECT_EQ(alone.result["logit_lens"], distributed.result["logit_lens"]);
  for (auto& entry : distributed.result["logit_lens"]) {
    const size_t s = entry["sample"], position = entry["position"];
    ASSERT_EQ(entry["layers"].size(), 6u);
    EXPECT_EQ(entry["layers"][0]["layer"], "embed");
    const auto& top = entry["layers"][5];
    EXPECT_EQ(top["layer"], 4);
    EXPECT_EQ(top["ids"].size(), 5u);
    EXPECT_EQ(top["ids"][0].get<int64_t>(), tokens[s].at(position + 1)) << "sample " << s;
  }
}

TEST_F(Capture, InterventionsGiveTheSameTokensOnThreeNodesAndStandaloneAndChangeThem) {
  // a steering vector from two captures: mean(happy) - mean(sad) at layer 2
  for (const std::string mood : {"happy", "sad"}) {
    auto run = run_starter(mood, plus(greedy(mood + ".txt", 1, 4), {"--capture", "2", "--capture-out", path(mood + ".safetensors").string()}));
    ASSERT_EQ(run.exit_code, 0) << run.err;
  }
  ChildProcess steer({(mdi::test::bin_dir() / "starter").string(), "steering-vector", "--from", path("sad.safetensors").string(), "--to",
                      path("happy.safetensors").string(), "--layer", "2", "--out", path("steer.safetensors").string()},
                     scratch_->path(), "steering-vector");
  ASSERT_EQ(steer.wait(seconds(60)), 0) << steer.err();
  {
    auto mean = [](const fs::path& file) {
      mdi::SafetensorsFile f(file);
      const auto& info = f.at("sample0.layer2");
      return torch::from_blob(const_cast<uint8_t*>(f.data(info)), info.shape, torch::kFloat32).to(torch::kFloat64).mean(0);
    };
    auto expected = (mean(path("happy.safetensors")) - mean(path("sad.safetensors"))).to(torch::kFloat32);
    auto v = mdi::read_vector(path("steer.safetensors"), "steer");
    ASSERT_EQ(v.size(), 64u);
    EXPECT_TRUE(torch::allclose(torch::from_blob(v.data(), {64}, torch::kFloat32), expected, 1e-6, 1e-6));
  }

  // all four ops, on the starter's layer 0 and the embedding, secondary 0's layer 2 and secondary 1's layer 4
  nlohmann::json interventions = {
      {"interventions",
       {{{"layer", 2}, {"op", "add"}, {"vector", {{"file", "steer.safetensors"}, {"tensor", "steer"}}}, {"scale", 6.0}, {"positions", "generated"}},
        {{"layer", 0}, {"op", "scale"}, {"scale", 1.5}, {"samples", {1}}},
        {{"layer", 4}, {"op", "zero"}, {"samples", {0, 2}}, {"positions", {3, 9}}},
        {{"layer", "embed"}, {"op", "replace"}, {"vector", std::vector<float>(64, 0.25f)}, {"samples", {2}}, {"positions", "prompt"}}}}};
  std::ofstream(path("interventions.json")) << interventions.dump(1);
  const std::vector<std::string> steered = {"--interventions", path("interventions.json").string(), "--capture", "all"};

  auto plain = run_starter("steer-plain", greedy());
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  auto alone = run_starter("steer-alone", plus(greedy(), plus(steered, {"--capture-out", path("steer-alone.safetensors").string()})));
  ASSERT_EQ(alone.exit_code, 0) << alone.err;

  const auto config = write_config("steer");
  auto secondaries = start_secondaries(config);
  auto distributed = run_starter("steer-ring", plus(greedy(), plus(steered, {"--nodes-config", config.string(), "--capture-out",
                                                                             path("steer-ring.safetensors").string()})));
  ASSERT_EQ(distributed.exit_code, 0) << distributed.err;
  for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << s->err();

  EXPECT_EQ(tokens_of(distributed), tokens_of(alone)) << "an intervention acts differently on the ring";
  expect_bitwise_equal(path("steer-alone.safetensors"), path("steer-ring.safetensors"), "hidden states under interventions");
  const auto base = tokens_of(plain), changed = tokens_of(alone);
  for (size_t s = 0; s < 3; ++s) EXPECT_NE(changed[s], base[s]) << "the interventions left sample " << s << " unchanged";

  // what the file says happened, where it is simple to check
  mdi::SafetensorsFile file(path("steer-alone.safetensors"));
  const auto& embed2 = file.at("sample2.embed");
  const float* e = reinterpret_cast<const float*>(file.data(embed2));
  const int64_t prompt2 = int64_t(plain.result["samples"][2]["prompt_tokens"].size());
  for (int64_t i = 0; i < prompt2 * 64; ++i) ASSERT_EQ(e[i], 0.25f) << "replace at embed, sample 2, prompt positions";
  EXPECT_NE(e[prompt2 * 64], 0.25f) << "replace reached a generated position";
  const float* l4 = reinterpret_cast<const float*>(file.data(file.at("sample0.layer4")));
  for (int64_t i = 0; i < 64; ++i) ASSERT_EQ(l4[3 * 64 + i], 0.0f) << "zero at layer 4, sample 0, position 3";
  EXPECT_NE(l4[2 * 64], 0.0f);
}

TEST_F(Capture, BadInterventionsAndCaptureFlagsAreRefusedNamingTheField) {
  struct Case {
    nlohmann::json file;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{{{"layer", 1}, {"op", "add"}, {"vector", {1.0, 2.0, 3.0}}}}, "interventions.json[0].vector has 3 values; the model's dim is 64"},
      {{{{"layer", 9}, {"op", "zero"}}}, "[0].layer 9 is outside 0..4"},
      {{{{"layer", 1}, {"op", "ablate"}}}, "[0].op \"ablate\" is not one of add, replace, zero, scale"},
      {{{{"layer", 1}, {"op", "scale"}}}, "[0].scale: missing"},
      {{{{"layer", 1}, {"op", "zero"}, {"samples", {5}}}}, "[0].samples[0] 5 is outside 0..2"},
      {{{{"layer", 1}, {"op", "zero"}, {"position", "all"}}}, "[0].position: unknown key"},
      {{{{"layer", 1}, {"op", "add"}, {"vector", {{"file", "missing.safetensors"}}}}}, "[0].vector: "},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::ofstream(path("interventions.json")) << cases[i].file.dump();
    auto run = run_starter("bad-interventions" + std::to_string(i), plus(greedy(), {"--interventions", path("interventions.json").string()}));
    EXPECT_EQ(run.exit_code, 1) << cases[i].file;
    EXPECT_NE(run.err.find(cases[i].expect), std::string::npos) << run.err;
  }
  auto bad_layer = run_starter("bad-capture", plus(greedy(), {"--capture", "0,7", "--capture-out", path("x.safetensors").string()}));
  EXPECT_EQ(bad_layer.exit_code, 1);
  EXPECT_NE(bad_layer.err.find("--capture: layer 7"), std::string::npos) << bad_layer.err;
  auto no_out = run_starter("no-capture-out", plus(greedy(), {"--capture", "all"}));
  EXPECT_EQ(no_out.exit_code, 1);
  EXPECT_NE(no_out.err.find("--capture-out"), std::string::npos) << no_out.err;
}

TEST(CaptureSpec, ParsesLayerListsRangesAndAll) {
  auto spec = mdi::parse_capture_spec("embed, 0,3-4,3", "last", 5);
  EXPECT_EQ(spec.layers, (std::vector<int64_t>{mdi::kEmbedLayer, 0, 3, 4}));
  EXPECT_TRUE(spec.last_only);
  EXPECT_EQ(mdi::parse_capture_spec("all", "all", 3).layers, (std::vector<int64_t>{-1, 0, 1, 2}));
  EXPECT_THROW(mdi::parse_capture_spec("4-2", "all", 5), mdi::InterpretabilityError);
  EXPECT_THROW(mdi::parse_capture_spec("x", "all", 5), mdi::InterpretabilityError);
  EXPECT_THROW(mdi::parse_capture_spec("1", "first", 5), mdi::InterpretabilityError);
}

TEST(Interventions, AHugeBadValueIsQuotedInAtMost80Characters) {
  // /init carries interventions: a wide value must not be echoed back whole.
  nlohmann::json layer = nlohmann::json::array();
  for (int i = 0; i < 5000; ++i) layer.push_back(i);
  const nlohmann::json entries = {{{"layer", layer}, {"op", "zero"}}};
  const std::string error = mdi::test::error_of<mdi::InterpretabilityError>(
      [&] { mdi::parse_interventions(entries, {4, 64}, "/init: interpretability.interventions"); });
  EXPECT_NE(error.find("must be \"embed\" or a layer number"), std::string::npos) << error;
  EXPECT_LT(error.size(), 250u) << error;
  EXPECT_NE(error.find("[0,1,2,"), std::string::npos) << error;
}

TEST(InitInterpretability, RoundTripsExactlyAndIsCheckedAgainstTheNodesLayers) {
  mdi::InitRequest r;
  r.run_id = 1;
  r.ring_index = 1;
  r.nodes_json = {{"nodes",
                   {{"starter", {{"addr", "127.0.0.1"}, {"communication", {{"port", 8088}}}, {"inference", {{"port_in", 5088}, {"port_out", 5089}}}}},
                    {"secondary",
                     {{{"addr", "127.0.0.1"},
                       {"communication", {{"port", 8089}, {"starter_addr", "127.0.0.1"}}},
                       {"inference", {{"port_in", 5090}, {"port_out", 5091}}}}}}}}};
  r.nodes = mdi::parse_nodes_config(r.nodes_json, "test");
  r.model = mdi::open_random("random:stories260K", 1)->config();
  r.layer_begin = 2;
  r.layer_end = 4;
  r.dtype = "float32";
  r.max_seq_len = 64;
  r.chunk_sha256 = std::string(64, 'a');
  std::vector<float> v(64);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 1.0f / float(i + 3) - 0.1234567f;  // not short decimals
  mdi::Intervention iv;
  iv.layer = 3;
  iv.op = mdi::Intervention::Op::add;
  iv.vector = v;
  iv.scale = 0.3f;
  iv.samples = std::vector<int64_t>{1};
  iv.positions.kind = mdi::PositionSelector::Kind::list;
  iv.positions.list = {2, 5};
  r.interpretability.capture = mdi::parse_capture_spec("2,3", "all", 5);
  r.interpretability.interventions = {iv};
  r.interpretability.prompt_lengths = {4, 6};

  auto back = mdi::InitRequest::parse(nlohmann::json::parse(r.to_json().dump()));
  ASSERT_EQ(back.interpretability.interventions.size(), 1u);
  EXPECT_EQ(back.interpretability.interventions[0].vector, v) << "vectors must cross /init bit for bit";
  EXPECT_EQ(back.interpretability.interventions[0].scale, 0.3f);
  EXPECT_EQ(back.interpretability.capture.layers, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(back.interpretability.prompt_lengths, (std::vector<int64_t>{4, 6}));
  EXPECT_FALSE(mdi::InitRequest::parse(r.to_json()).interpretability.capture.last_only);

  auto refused = [&](const std::function<void(nlohmann::json&)>& change) {
    auto j = r.to_json();
    change(j["interpretability"]);
    try {
      mdi::InitRequest::parse(j);
    } catch (const mdi::InitRequestError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(refused([](auto& j) { j["interventions"][0]["layer"] = 1; }).find("interventions[0].layer layer1 is not held by this node"),
            std::string::npos);
  EXPECT_NE(refused([](auto& j) { j["interventions"][0]["vector"].erase(0); }).find("interventions[0].vector has 63 values"),
            std::string::npos);
  EXPECT_NE(refused([](auto& j) { j["interventions"][0]["vector"] = {{"file", "/etc/passwd"}}; }).find("must be inline"), std::string::npos);
  EXPECT_NE(refused([](auto& j) { j["interventions"][0]["samples"] = {2}; }).find("samples[0] 2 is outside 0..1"), std::string::npos);
  EXPECT_NE(refused([](auto& j) { j["capture"]["layers"] = {"embed"}; }).find("capture.layers[0] embed is not held"), std::string::npos);
  EXPECT_NE(refused([](auto& j) { j["extra"] = 1; }).find("interpretability.extra: unknown key"), std::string::npos);
}

}  // namespace
