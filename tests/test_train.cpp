// Fine-tuning with real processes on loopback: the starter's train subcommand
// alone (the reference) and over rings of 2 and 3 nodes, checkpoints, resume,
// gather, and the failures a user meets.
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/store/safetensors.hpp"
#include "common/store/sha256.hpp"
#include "tests/support.hpp"

namespace {
namespace fs = std::filesystem;
using mdi::test::ChildProcess;
using std::chrono::seconds;

// A short text the tests teach the model: a made-up story stories260K has never seen.
const std::string kStory =
    "Zorblax the purple dragon ate blue pancakes every Tuesday. He shared them with a tiny robot named Pim. "
    "Pim liked the syrup and the dragon liked the crumbs. Together they sang a song about the moon. ";

struct TrainRun {
  int exit_code = -1;
  std::string err;
};

class Train : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    scratch_ = new mdi::test::ScratchDir();
    if (auto shared = mdi::test::shared_dir()) {
      stories_ = scratch_->path() / "stories260K";
      auto reader = mdi::open_llama2c(*shared / "models/stories260K/stories260K.bin", *shared / "models/stories260K/tok512.bin");
      prepare(*reader, stories_);
      aidreams_ = scratch_->path() / "aidreams260K";
      auto other = mdi::open_llama2c(*shared / "models/aidreams260K/aidreams260K.bin", *shared / "models/aidreams260K/tok512.bin");
      prepare(*other, aidreams_);
    }
    // stories260K's shape with its own LM head, random weights
    auto config = mdi::open_random("random:stories260K", 0)->config();
    config.tied_embeddings = false;
    const fs::path config_file = scratch_->path() / "untied-config.json";
    std::ofstream(config_file) << config.to_hf_json().dump(2);
    untied_ = scratch_->path() / "untied";
    prepare(*mdi::open_random("random:" + config_file.string(), 11), untied_);
    std::ofstream(scratch_->path() / "story.txt") << kStory;
    std::ofstream(scratch_->path() / "short.txt") << "Too short.";
  }
  static void TearDownTestSuite() {
    delete scratch_;
    scratch_ = nullptr;
  }

  static void prepare(const mdi::CheckpointReader& reader, const fs::path& dir) {
    mdi::write_model_directory(reader, dir, torch::kFloat32, reader.description(), nullptr);
    for (size_t n : {2, 3}) mdi::write_chunks(dir, mdi::balanced_layer_counts(reader.config(), n), nullptr);
  }

  // A loopback nodes-config of n nodes on ports free now.
  fs::path write_config(size_t n_nodes, const std::string& name) {
    auto node = [] {
      return nlohmann::json{{"addr", "127.0.0.1"},
                            {"communication", {{"starter_addr", "127.0.0.1"}, {"port", mdi::test::free_tcp_port()}}},
                            {"inference", {{"port_in", mdi::test::free_tcp_port()}, {"port_out", mdi::test::free_tcp_port()}}}};
    };
    nlohmann::json config = {{"nodes", {{"starter", node()}, {"secondary", nlohmann::json::array()}}}};
    config["nodes"]["starter"]["communication"].erase("starter_addr");
    for (size_t i = 1; i < n_nodes; ++i) config["nodes"]["secondary"].push_back(node());
    const fs::path path = scratch_->path() / (name + ".json");
    std::ofstream(path) << config.dump(2);
    return path;
  }

  // The secondaries of `config`, up until the test ends.
  std::vector<std::unique_ptr<ChildProcess>> start_secondaries(const fs::path& config, size_t n_nodes) {
    std::vector<std::unique_ptr<ChildProcess>> nodes;
    for (size_t i = 0; i + 1 < n_nodes; ++i)
      nodes.push_back(std::make_unique<ChildProcess>(
          std::vector<std::string>{(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", config.string(), std::to_string(i),
                                   "--device", "cpu", "--threads", "1", "--chunk-cache",
                                   (scratch_->path() / ("cache-" + config.stem().string() + std::to_string(i))).string(),
                                   "--chunk-dir", scratch_->path().string()},
          scratch_->path(), config.stem().string() + "-secondary" + std::to_string(i)));
    return nodes;
  }

  TrainRun train(const std::string& name, const fs::path& model, std::vector<std::string> args, seconds limit = seconds(300)) {
    std::vector<std::string> argv = {(mdi::test::bin_dir() / "starter").string(), "train", "--ckpt", model.string(), "--threads", "1",
                                     "--data", (scratch_->path() / "story.txt").string(), "--log", (scratch_->path() / (name + ".csv")).string()};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess starter(argv, scratch_->path(), name);
    auto code = starter.wait(limit);
    return {code.value_or(-1), starter.err()};
  }

  // A column of the --log CSV (1: loss, 2: validation loss), by step; empty cells left out.
  std::map<int64_t, double> losses(const std::string& name, int column = 1) {
    std::map<int64_t, double> out;
    std::istringstream csv(mdi::test::read_file(scratch_->path() / (name + ".csv")));
    std::string line;
    std::getline(csv, line);
    while (std::getline(csv, line)) {
      std::istringstream row(line);
      std::vector<std::string> cells;
      for (std::string cell; std::getline(row, cell, ',');) cells.push_back(cell);
      if (!cells.at(static_cast<size_t>(column)).empty()) out[std::stoll(cells[0])] = std::stod(cells[static_cast<size_t>(column)]);
    }
    return out;
  }

  static inline mdi::test::ScratchDir* scratch_ = nullptr;
  static inline fs::path stories_, aidreams_, untied_;
};

// Every tensor of `files` against the same-named tensor of `reference`: the largest difference.
double max_difference(const std::vector<fs::path>& files, const fs::path& reference, size_t& compared) {
  mdi::SafetensorsFile ref(reference);
  double worst = 0;
  for (const fs::path& file : files) {
    mdi::SafetensorsFile f(file);
    for (const auto& info : f.tensors()) {
      const auto& r = ref.at(info.name);
      auto a = torch::from_blob(const_cast<uint8_t*>(f.data(info)), info.shape, torch::kFloat32);
      auto b = torch::from_blob(const_cast<uint8_t*>(ref.data(r)), r.shape, torch::kFloat32);
      worst = std::max(worst, (a - b).abs().max().item<double>());
      ++compared;
    }
  }
  return worst;
}

std::vector<fs::path> stage_files(const fs::path& step_dir, size_t n_nodes) {
  std::vector<fs::path> files = {step_dir / "starter.safetensors"};
  for (size_t i = 0; i + 1 < n_nodes; ++i) files.push_back(step_dir / ("secondary" + std::to_string(i) + ".safetensors"));
  return files;
}

TEST_F(Train, OneStepOnThreeNodesEqualsTheSingleProcessStepWithGPipeAnd1F1B) {
  auto shared = mdi::test::shared_dir();
  std::vector<std::pair<std::string, fs::path>> models = {{"untied", untied_}};
  if (shared) models.insert(models.begin(), {"stories260K", stories_});
  else std::cerr << "../shared is absent: checking the random untied model only\n";
  const std::vector<std::string> step = {"--steps", "1", "--batch-size", "8", "--micro-batches", "4", "--seq-len", "16", "--lr", "1e-2",
                                         "--val-fraction", "0.34", "--clip", "0.5"};
  for (auto& [label, model] : models) {
    auto args = step;
    const fs::path alone = scratch_->path() / ("alone-" + label);
    args.insert(args.end(), {"--out", alone.string()});
    auto reference = train("alone-" + label, model, args);
    ASSERT_EQ(reference.exit_code, 0) << reference.err;
    const double reference_loss = losses("alone-" + label).at(1);
    const double reference_validation = losses("alone-" + label, 2).at(1);
    EXPECT_GT(reference_loss, 0.5) << label;

    // the step changed the weights: a comparison with the unchanged model would fail
    {
      mdi::SafetensorsFile trained(alone / "step-1/starter.safetensors");
      mdi::SafetensorsFile base(model / "model.safetensors");
      const std::string name = "model.layers.2.mlp.down_proj.weight";
      auto a = torch::from_blob(const_cast<uint8_t*>(trained.data(trained.at(name))), trained.at(name).shape, torch::kFloat32);
      auto b = torch::from_blob(const_cast<uint8_t*>(base.data(base.at(name))), base.at(name).shape, torch::kFloat32);
      EXPECT_GT((a - b).abs().max().item<double>(), 5e-3) << label << ": the step did not move the weights";
    }

    for (const std::string schedule : {"gpipe", "1f1b"}) {
      const std::string name = "ring3-" + label + "-" + schedule;
      const auto config = write_config(3, name);
      auto secondaries = start_secondaries(config, 3);
      const fs::path out = scratch_->path() / name;
      auto ring_args = step;
      ring_args.insert(ring_args.end(), {"--nodes-config", config.string(), "--schedule", schedule, "--out", out.string()});
      auto run = train(name, model, ring_args);
      ASSERT_EQ(run.exit_code, 0) << name << "\n" << run.err;
      EXPECT_NEAR(losses(name).at(1), reference_loss, 1e-5) << name;
      EXPECT_NEAR(losses(name, 2).at(1), reference_validation, 1e-5) << name << ": the validation loss, after the step";
      size_t compared = 0;
      const double difference = max_difference(stage_files(out / "step-1", 3), alone / "step-1/starter.safetensors", compared);
      EXPECT_LE(difference, 1e-5) << name;
      std::cerr << name << ": loss " << losses(name).at(1) << " (alone " << reference_loss << "), largest difference of "
                << compared << " tensors " << difference << "\n";
      EXPECT_GT(compared, 3u * 2u) << name << ": weights and AdamW state of every stage";
      for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << name << ": a secondary did not exit\n" << s->err();
    }
  }
}

// A tensor of a safetensors file, as float32.
torch::Tensor tensor_of(const mdi::SafetensorsFile& file, const std::string& name) {
  const auto& info = file.at(name);
  return torch::from_blob(const_cast<uint8_t*>(file.data(info)), info.shape, torch::kFloat32);
}

TEST_F(Train, FrozenLayersKeepTheirWeightsAndGetNoOptimizerStateAloneAndOverTheRing) {
  const std::vector<std::string> step = {"--steps", "2", "--batch-size", "4", "--micro-batches", "2", "--seq-len", "16", "--lr", "1e-2",
                                         "--val-fraction", "0", "--train-layers", "2-3"};
  auto args = step;
  const fs::path alone = scratch_->path() / "frozen-alone";
  args.insert(args.end(), {"--out", alone.string()});
  auto reference = train("frozen-alone", untied_, args);
  ASSERT_EQ(reference.exit_code, 0) << reference.err;

  const auto config = write_config(3, "frozen-ring");
  auto secondaries = start_secondaries(config, 3);
  const fs::path ring = scratch_->path() / "frozen-ring";
  auto ring_args = step;
  ring_args.insert(ring_args.end(), {"--nodes-config", config.string(), "--schedule", "1f1b", "--out", ring.string()});
  auto run = train("frozen-ring", untied_, ring_args);
  ASSERT_EQ(run.exit_code, 0) << run.err;
  size_t compared = 0;
  EXPECT_LE(max_difference(stage_files(ring / "step-2", 3), alone / "step-2/starter.safetensors", compared), 1e-5);

  mdi::SafetensorsFile trained(alone / "step-2/starter.safetensors"), base(untied_ / "model.safetensors");
  for (const std::string name : {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.4.self_attn.o_proj.weight",
                                 "lm_head.weight", "model.norm.weight"})
    EXPECT_TRUE(torch::equal(tensor_of(trained, name), tensor_of(base, name))) << name << " is frozen but changed";
  for (const std::string name : {"model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight"})
    EXPECT_FALSE(torch::equal(tensor_of(trained, name), tensor_of(base, name))) << name << " trains but did not change";
  std::set<std::string> with_state;
  for (const auto& info : trained.tensors())
    if (info.name.rfind("adamw.exp_avg.", 0) == 0) with_state.insert(info.name.substr(std::string("adamw.exp_avg.").size()));
  std::set<std::string> expected;
  for (int layer : {2, 3})
    for (const char* part : {"input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_up_proj",
                             "mlp.down_proj"})
      expected.insert(mdi::tensor_name::layer(layer, part));
  EXPECT_EQ(with_state, expected) << "AdamW state for exactly the trainable tensors";
  for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << s->err();
}

// The error lines of a log ("[error]" lines), the last one being what the user reads.
std::vector<std::string> error_lines(const std::string& log) {
  std::vector<std::string> lines;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);)
    if (line.find("error") != std::string::npos && line.find("] [") != std::string::npos) lines.push_back(line);
  return lines;
}

std::vector<fs::path> unfinished_steps(const fs::path& out) {
  std::vector<fs::path> unfinished;
  if (!fs::exists(out)) return unfinished;
  for (const auto& entry : fs::directory_iterator(out))
    if (entry.is_directory() && !fs::exists(entry.path() / "manifest.json")) unfinished.push_back(entry.path());
  return unfinished;
}

TEST_F(Train, FineTuningOnTwoAndThreeNodesHalvesTheLossAndTheGatheredModelContinuesTheText) {
  MDI_REQUIRE_SHARED(shared);
  for (size_t n_nodes : {2, 3}) {
    const std::string name = "learn" + std::to_string(n_nodes);
    const auto config = write_config(n_nodes, name);
    auto secondaries = start_secondaries(config, n_nodes);
    const fs::path out = scratch_->path() / name;
    auto run = train(name, stories_, {"--nodes-config", config.string(), "--schedule", n_nodes == 2 ? "gpipe" : "1f1b", "--steps", "40",
                                      "--batch-size", "4", "--micro-batches", "2", "--seq-len", "32", "--lr", "4e-3", "--warmup", "4",
                                      "--val-fraction", "0", "--save-every", "20", "--out", out.string(), "--keep-nodes"});
    ASSERT_EQ(run.exit_code, 0) << run.err;
    const auto loss = losses(name);
    ASSERT_EQ(loss.size(), 40u);
    EXPECT_LT(loss.rbegin()->second, loss.begin()->second / 2) << name << ": from " << loss.begin()->second;
    EXPECT_TRUE(fs::exists(out / "step-20/manifest.json") && fs::exists(out / "step-40/manifest.json"));
    EXPECT_EQ(mdi::test::read_file(scratch_->path() / (name + ".png")).substr(0, 4), "\x89PNG") << "the loss curve beside the CSV";

    const fs::path gathered = scratch_->path() / (name + "-model");
    ChildProcess gather({(mdi::test::bin_dir() / "starter").string(), "gather", "--checkpoint", out.string(), "--out", gathered.string()},
                        scratch_->path(), name + "-gather");
    ASSERT_EQ(gather.wait(seconds(120)), 0) << gather.err();
    // the same text alone and over the ring the model was trained on
    for (bool ring : {false, true}) {
      const fs::path result = scratch_->path() / (name + (ring ? "-ring.json" : "-alone.json"));
      std::vector<std::string> argv = {(mdi::test::bin_dir() / "starter").string(), "--ckpt", gathered.string(), "--threads", "1",
                                       "--prompt", "Zorblax the purple dragon", "--n-tokens", "16", "--temperature", "0", "--out", result.string()};
      if (ring) argv.insert(argv.end(), {"--nodes-config", config.string()});
      ChildProcess generate(argv, scratch_->path(), name + (ring ? "-generate-ring" : "-generate"));
      ASSERT_EQ(generate.wait(seconds(120)), 0) << generate.err();
      const std::string text = nlohmann::json::parse(mdi::test::read_file(result))["samples"][0]["text"];
      EXPECT_NE(text.find("Zorblax the purple dragon ate blue pancakes"), std::string::npos) << name << (ring ? " ring: " : ": ") << text;
    }
    for (auto& s : secondaries) EXPECT_EQ(s->wait(seconds(30)), 0) << s->err();
  }
}

TEST_F(Train, ResumingFromADistributedCheckpointGivesTheLossesOfTheUninterruptedRun) {
  MDI_REQUIRE_SHARED(shared);
  const auto config = write_config(3, "resume");
  auto secondaries = start_secondaries(config, 3);
  const std::vector<std::string> common = {"--nodes-config", config.string(), "--schedule", "1f1b", "--batch-size", "4", "--micro-batches",
                                           "2", "--seq-len", "16", "--lr", "2e-3", "--warmup", "3", "--val-fraction", "0", "--keep-nodes"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.begin(), common.begin(), common.end());
    return more;
  };
  const fs::path whole = scratch_->path() / "resume-whole", split = scratch_->path() / "resume-split";
  ASSERT_EQ(train("resume-whole", stories_, with({"--steps", "6", "--out", whole.string()})).exit_code, 0);
  auto first = train("resume-first", stories_, with({"--steps", "3", "--out", split.string()}));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  auto rest = train("resume-rest", stories_, with({"--steps", "6", "--resume", split.string(), "--out", split.string()}));
  ASSERT_EQ(rest.exit_code, 0) << rest.err;
  const auto expected = losses("resume-whole"), got = losses("resume-rest");
  ASSERT_EQ(got.size(), 3u);
  for (int64_t step = 4; step <= 6; ++step) EXPECT_NEAR(got.at(step), expected.at(step), 1e-6) << "step " << step;
  EXPECT_NE(expected.at(4), expected.at(1));
}

TEST_F(Train, BadInputsGetOneLineNamingTheProblemAndLeaveNoCheckpoint) {
  MDI_REQUIRE_SHARED(shared);
  const fs::path out = scratch_->path() / "bad-out";
  // a data file shorter than one sequence
  auto short_data = train("bad-short", stories_, {"--data", (scratch_->path() / "short.txt").string(), "--seq-len", "64", "--out", out.string()});
  EXPECT_EQ(short_data.exit_code, 1);
  auto errors = error_lines(short_data.err);
  ASSERT_EQ(errors.size(), 1u) << short_data.err;
  EXPECT_NE(errors[0].find("short.txt holds"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("--seq-len 64 needs 65"), std::string::npos) << errors[0];

  // resuming another model's checkpoint
  const fs::path dreams = scratch_->path() / "bad-dreams";
  ASSERT_EQ(train("bad-dreams", aidreams_, {"--steps", "1", "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16", "--out", dreams.string()})
                .exit_code, 0);
  auto other = train("bad-other", stories_, {"--steps", "3", "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16",
                                             "--resume", dreams.string(), "--out", out.string()});
  EXPECT_EQ(other.exit_code, 1);
  errors = error_lines(other.err);
  ASSERT_EQ(errors.size(), 1u) << other.err;
  EXPECT_NE(errors[0].find("is a checkpoint of another model"), std::string::npos) << errors[0];
  EXPECT_FALSE(fs::exists(out / "step-1")) << "a refused run wrote a checkpoint";

  // a node killed in the middle of training
  const auto config = write_config(3, "bad-kill");
  auto secondaries = start_secondaries(config, 3);
  const fs::path killed_out = scratch_->path() / "bad-kill-out";
  const fs::path log = scratch_->path() / "bad-kill.csv";
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "train", "--ckpt", stories_.string(), "--threads", "1", "--data",
                        (scratch_->path() / "story.txt").string(), "--nodes-config", config.string(), "--steps", "100000", "--batch-size",
                        "4", "--micro-batches", "4", "--seq-len", "16", "--save-every", "1", "--out", killed_out.string(), "--log",
                        log.string()},
                       scratch_->path(), "bad-kill");
  // a few steps, each with a checkpoint, then secondary 1 dies mid-run
  ASSERT_TRUE(mdi::test::wait_until([&] { return fs::exists(killed_out / "step-3/manifest.json"); }, seconds(120))) << starter.err();
  secondaries[1]->kill(SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  const auto code = starter.wait(seconds(30));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  ASSERT_TRUE(code.has_value()) << "the starter did not stop after a node died\n" << starter.err();
  EXPECT_EQ(*code, 1);
  EXPECT_LE(took, 10.0);
  errors = error_lines(starter.err());
  ASSERT_FALSE(errors.empty()) << starter.err();
  EXPECT_NE(errors.back().find("secondary 1 (127.0.0.1:"), std::string::npos) << starter.err();
  EXPECT_NE(errors.back().find("stopped answering"), std::string::npos) << starter.err();
  EXPECT_TRUE(unfinished_steps(killed_out).empty()) << unfinished_steps(killed_out).front();
}

TEST_F(Train, ASecondaryStartedInBfloat16RefusesToTrainNamingItsFlag) {
  const auto config = write_config(2, "bf16");
  ChildProcess secondary({(mdi::test::bin_dir() / "secondary").string(), "--nodes-config", config.string(), "0", "--device", "cpu",
                          "--dtype", "bfloat16", "--chunk-cache", (scratch_->path() / "cache-bf16").string(),
                          "--chunk-dir", scratch_->path().string()},
                         scratch_->path(), "bf16-secondary");
  auto run = train("bf16", untied_, {"--nodes-config", config.string(), "--steps", "1", "--batch-size", "2", "--micro-batches", "1",
                                     "--seq-len", "16"});
  EXPECT_EQ(run.exit_code, 1);
  const auto errors = error_lines(run.err);
  ASSERT_FALSE(errors.empty()) << run.err;
  EXPECT_NE(errors.back().find("secondary 0"), std::string::npos) << errors.back();
  EXPECT_NE(errors.back().find("training runs in float32; this node was started with --dtype bfloat16"), std::string::npos) << errors.back();
}

TEST_F(Train, StagesSentToTheStarterMakeTheSameCheckpointAsStagesWrittenOnTheNodes) {
  std::map<bool, nlohmann::json> manifests;
  for (bool sent : {false, true}) {
    const std::string name = sent ? "sent" : "written";
    const auto config = write_config(3, name);
    auto secondaries = start_secondaries(config, 3);
    const fs::path out = scratch_->path() / ("stages-" + name);
    std::vector<std::string> args = {"--nodes-config", config.string(), "--steps", "2", "--batch-size", "4", "--micro-batches", "2",
                                      "--seq-len", "16", "--val-fraction", "0", "--save-every", "1", "--out", out.string()};
    if (sent) args.push_back("--stages-to-starter");
    auto run = train("stages-" + name, untied_, args);
    ASSERT_EQ(run.exit_code, 0) << run.err;
    manifests[sent] = nlohmann::json::parse(mdi::test::read_file(out / "step-2/manifest.json"));
    for (auto& s : secondaries) {
      EXPECT_EQ(s->wait(seconds(30)), 0) << s->err();
      EXPECT_EQ(s->err().find("sent the starter") != std::string::npos, sent) << s->err();
    }
    // what the manifest names is there, whole
    for (const auto& node : manifests[sent]["nodes"])
      EXPECT_EQ(mdi::sha256_file(out / "step-2" / node["file"].get<std::string>()), node["sha256"]) << name << " " << node.dump();
  }
  EXPECT_EQ(manifests[true]["nodes"], manifests[false]["nodes"]);
}

}  // namespace
