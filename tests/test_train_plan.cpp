// The rules of fine-tuning without tensors: schedules, --train-layers, the
// learning rate, clipping, data packing and the /init "training" field.
#include <array>
#include <deque>
#include <fstream>
#include <set>

#include <gmock/gmock.h>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/train/data.hpp"
#include "common/train/loss_plot.hpp"
#include "common/train/plan.hpp"
#include "common/wire/init_request.hpp"
#include "tests/support.hpp"

namespace {
using mdi::PipelineSchedule;
using mdi::StageOp;

TEST(Schedule, GPipeRunsEveryForwardThenEveryBackward) {
  auto ops = mdi::secondary_schedule(PipelineSchedule::gpipe, 3, 1, 3);
  std::vector<StageOp> expected = {{StageOp::forward, 0}, {StageOp::forward, 1}, {StageOp::forward, 2},
                                   {StageOp::backward, 0}, {StageOp::backward, 1}, {StageOp::backward, 2}};
  EXPECT_EQ(ops, expected);
}

TEST(Schedule, OneFOneBWarmsUpByTheStagesAfterItThenAlternates) {
  auto ops = mdi::secondary_schedule(PipelineSchedule::one_f_one_b, 3, 1, 4);
  std::vector<StageOp> expected = {{StageOp::forward, 0}, {StageOp::forward, 1}, {StageOp::backward, 0}, {StageOp::forward, 2},
                                   {StageOp::backward, 1}, {StageOp::forward, 3}, {StageOp::backward, 2}, {StageOp::backward, 3}};
  EXPECT_EQ(ops, expected);
  EXPECT_EQ(mdi::starter_in_flight_limit(PipelineSchedule::one_f_one_b, 3, 8), 3);
  EXPECT_EQ(mdi::starter_in_flight_limit(PipelineSchedule::gpipe, 3, 8), 8);
  EXPECT_THROW(mdi::secondary_schedule(PipelineSchedule::gpipe, 3, 0, 4), std::invalid_argument);
}

// Runs one step of the whole ring with unbounded links: the starter injects up to its
// limit, runs the head as activations return and stage 0's backward as gradients do;
// each secondary follows its schedule. Returns each stage's peak of held micro-batches,
// or an empty vector on deadlock.
std::vector<int64_t> simulate_step(PipelineSchedule schedule, int64_t n, int64_t M) {
  std::vector<std::deque<int64_t>> fwd(n + 1), bwd(n + 1);  // fwd[s]: activations waiting at stage s; bwd[s]: gradients
  std::vector<std::vector<StageOp>> ops(n);
  std::vector<size_t> next_op(n, 0);
  std::vector<int64_t> held(n, 0), peak(n, 0);
  for (int64_t s = 1; s < n; ++s) ops[s] = mdi::secondary_schedule(schedule, n, s, M);
  const int64_t limit = mdi::starter_in_flight_limit(schedule, n, M);
  int64_t injected = 0, done = 0, returned = 0;
  std::vector<int64_t> head_waiting;
  for (int guard = 0; done < M; ++guard) {
    if (guard > 100000) return {};
    bool progressed = false;
    if (!fwd[n].empty()) {  // the head: loss, and its backward (1F1B: at once; GPipe: once all are back)
      head_waiting.push_back(fwd[n].front());
      fwd[n].pop_front();
      ++returned;
      if (schedule == PipelineSchedule::one_f_one_b || returned == M) {
        for (int64_t m : head_waiting) bwd[n - 1].push_back(m);
        head_waiting.clear();
      }
      progressed = true;
    } else if (injected < M && injected - done < limit) {
      fwd[1].push_back(injected++);
      peak[0] = std::max(peak[0], ++held[0]);
      progressed = true;
    } else if (!bwd[0].empty()) {
      bwd[0].pop_front();
      --held[0];
      ++done;
      progressed = true;
    }
    for (int64_t s = 1; s < n; ++s) {
      if (next_op[s] == ops[s].size()) continue;
      const StageOp op = ops[s][next_op[s]];
      auto& in = op.kind == StageOp::forward ? fwd[s] : bwd[s];
      if (in.empty()) continue;
      EXPECT_EQ(in.front(), op.micro_batch) << "stage " << s;
      in.pop_front();
      if (op.kind == StageOp::forward) {
        fwd[s + 1].push_back(op.micro_batch);
        peak[s] = std::max(peak[s], ++held[s]);
      } else {
        bwd[s - 1].push_back(op.micro_batch);
        --held[s];
      }
      ++next_op[s];
      progressed = true;
    }
    if (!progressed) return {};
  }
  return peak;
}

TEST(Schedule, BothSchedulesFinishAndOneFOneBHoldsAtMostTheStageCount) {
  for (int64_t n : {2, 3, 4})
    for (int64_t M : {1, 2, 4, 8}) {
      auto gpipe = simulate_step(PipelineSchedule::gpipe, n, M);
      auto one_f = simulate_step(PipelineSchedule::one_f_one_b, n, M);
      ASSERT_EQ(gpipe.size(), static_cast<size_t>(n)) << "GPipe deadlocks with " << n << " stages, " << M << " micro-batches";
      ASSERT_EQ(one_f.size(), static_cast<size_t>(n)) << "1F1B deadlocks with " << n << " stages, " << M << " micro-batches";
      for (int64_t s = 0; s < n; ++s) {
        EXPECT_EQ(gpipe[s], M) << "stage " << s;
        EXPECT_LE(one_f[s], std::min(M, s == 0 ? n : n - s)) << "stage " << s << " of " << n << ", " << M << " micro-batches";
      }
      if (M > n) {
        EXPECT_LT(one_f[0], gpipe[0]);
      }
    }
  EXPECT_DOUBLE_EQ(mdi::theoretical_bubble(3, 8), 2.0 / 10.0);
}

TEST(TrainableSet, ParsesLayersRangesEmbedAndHeadAndRefusesTheRest) {
  auto all = mdi::parse_trainable_set("all", 5);
  EXPECT_EQ(all.layers.size(), 5u);
  EXPECT_TRUE(all.embedding && all.head);
  EXPECT_EQ(all.to_string(), "embed,0-4,head");
  auto some = mdi::parse_trainable_set("3-4,1,head", 5);
  EXPECT_EQ(some.to_string(), "1,3-4,head");
  EXPECT_FALSE(some.embedding);
  EXPECT_TRUE(some.trains_layer(3) && !some.trains_layer(2));
  EXPECT_THAT([] { mdi::parse_trainable_set("2,7", 5); },
              testing::ThrowsMessage<mdi::TrainingPlanError>(testing::HasSubstr("layer 7 does not exist")));
  EXPECT_THAT([] { mdi::parse_trainable_set("x", 5); },
              testing::ThrowsMessage<mdi::TrainingPlanError>(testing::HasSubstr("\"x\" is not a layer number")));
  EXPECT_THAT([] { mdi::parse_trainable_set("4-2", 5); }, testing::ThrowsMessage<mdi::TrainingPlanError>(testing::HasSubstr("empty")));
}

TEST(Optimizer, LearningRateWarmsUpLinearlyAndClippingCapsTheNorm) {
  mdi::OptimizerSettings s;
  s.lr = 1e-3;
  s.warmup = 4;
  EXPECT_DOUBLE_EQ(mdi::learning_rate(s, 1), 0.25e-3);
  EXPECT_DOUBLE_EQ(mdi::learning_rate(s, 4), 1e-3);
  EXPECT_DOUBLE_EQ(mdi::learning_rate(s, 9), 1e-3);
  EXPECT_DOUBLE_EQ(mdi::clip_factor(0.25, 1.0), 1.0);
  EXPECT_NEAR(mdi::clip_factor(16.0, 1.0), 0.25, 1e-6);
  EXPECT_DOUBLE_EQ(mdi::clip_factor(16.0, 0.0), 1.0);
}

TEST(TrainingData, PacksSequencesWithTheirNextTokensAndHoldsOutValidation) {
  std::vector<int32_t> tokens(101);
  for (int i = 0; i <= 100; ++i) tokens[i] = i;
  mdi::TrainingData data(tokens, 10, 0.2, 7, "test");
  EXPECT_EQ(data.n_train() + data.n_validation(), 10u);
  EXPECT_EQ(data.n_validation(), 2u);
  auto first = data.batch(1, 4);
  ASSERT_EQ(first.size(), 4u);
  for (auto& s : first) {
    ASSERT_EQ(s.size(), 11u);
    EXPECT_EQ(s.front() % 10, 0);
    EXPECT_EQ(s.back(), s.front() + 10);
  }
  // an epoch visits every training sequence once, and never a validation one
  std::set<int32_t> seen;
  for (int64_t step = 1; step <= 2; ++step)
    for (auto& s : data.batch(step, 4)) seen.insert(s.front());
  EXPECT_EQ(seen.size(), 8u);
  for (auto& v : data.validation()) EXPECT_EQ(seen.count(v.front()), 0u);
  // the same seed gives the same order; another seed another
  EXPECT_EQ(mdi::TrainingData(tokens, 10, 0.2, 7, "test").batch(3, 4), data.batch(3, 4));
  EXPECT_NE(mdi::TrainingData(tokens, 10, 0.2, 8, "test").batch(1, 8), data.batch(1, 8));
}

TEST(TrainingData, AFileShorterThanOneSequenceIsRefusedNamingIt) {
  EXPECT_THAT([] { mdi::TrainingData(std::vector<int32_t>(10, 5), 10, 0.0, 1, "--data short.txt"); },
              testing::ThrowsMessage<mdi::TrainingDataError>(testing::AllOf(
                  testing::HasSubstr("--data short.txt holds 10 tokens"), testing::HasSubstr("--seq-len 10 needs 11"))));
}

TEST(TrainingData, JsonLinesAreDocumentsEachEndingInEos) {
  MDI_REQUIRE_SHARED(shared);
  auto tokenizer = mdi::load_tokenizer(shared / "models/stories260K/tok512.bin");
  mdi::test::ScratchDir dir;
  std::ofstream(dir / "docs.jsonl") << "{\"text\": \"Once upon a time\"}\n\n{\"text\": \"The cat sat\"}\n";
  auto data = mdi::TrainingData::load(dir / "docs.jsonl", *tokenizer, 2, 0.0, 1);
  const auto a = tokenizer->encode("Once upon a time", true), b = tokenizer->encode("The cat sat", true);
  EXPECT_EQ(data.n_tokens(), a.size() + b.size() + 2);
  EXPECT_EQ(data.sequence(0)[0], tokenizer->bos_id());
  std::ofstream(dir / "bad.jsonl") << "{\"txt\": 1}\n";
  EXPECT_THAT([&] { mdi::TrainingData::load(dir / "bad.jsonl", *tokenizer, 2, 0.0, 1); },
              testing::ThrowsMessage<mdi::TrainingDataError>(testing::HasSubstr("bad.jsonl:1: a JSON line needs a string field \"text\"")));
}

nlohmann::json training_init_body() {
  nlohmann::json nodes = {{"nodes",
                           {{"starter", {{"addr", "127.0.0.1"}, {"communication", {{"port", 8088}}}, {"inference", {{"port_in", 5088}, {"port_out", 5089}}}}},
                            {"secondary",
                             {{{"addr", "127.0.0.1"}, {"communication", {{"starter_addr", "127.0.0.1"}, {"port", 8090}}}, {"inference", {{"port_in", 5090}, {"port_out", 5091}}}}}}}}};
  mdi::ModelConfig model;
  model.dim = 64, model.hidden_dim = 172, model.n_layers = 5, model.n_heads = 8, model.n_kv_heads = 4, model.vocab_size = 512;
  model.max_seq_len = 512;
  mdi::TrainingPlan plan;
  plan.schedule = PipelineSchedule::one_f_one_b;
  plan.micro_batches = 4;
  plan.seq_len = 32;
  plan.trainable = mdi::parse_trainable_set("all", 5);
  plan.steps = 10;
  return {{"run_id", uint64_t{1}}, {"ring_index", uint64_t{1}}, {"nodes_config", nodes}, {"model", model.to_hf_json()}, {"layers", {3, 5}},
          {"dtype", "float32"}, {"max_seq_len", 512}, {"chunk", {{"sha256", std::string(64, 'a')}}}, {"training", plan.to_json()}};
}

TEST(InitTraining, TheTrainingFieldRoundTripsAndEveryBadValueIsNamed) {
  auto request = mdi::InitRequest::parse(training_init_body());
  ASSERT_TRUE(request.training);
  EXPECT_EQ(request.training->schedule, PipelineSchedule::one_f_one_b);
  EXPECT_EQ(request.training->micro_batches, 4);
  EXPECT_EQ(mdi::InitRequest::parse(request.to_json()).training->to_json(), request.training->to_json());

  auto refused = [](const std::function<void(nlohmann::json&)>& change, const std::string& message) {
    auto body = training_init_body();
    change(body);
    EXPECT_THAT([&] { mdi::InitRequest::parse(body); }, testing::ThrowsMessage<mdi::InitRequestError>(testing::HasSubstr(message)))
        << body["training"].dump();
  };
  refused([](auto& b) { b["training"]["schedule"] = "zigzag"; }, "schedule \"zigzag\" is not one of gpipe, 1f1b");
  refused([](auto& b) { b["training"]["micro_batches"] = 0; }, "\"micro_batches\" must be an integer in 1..4096");
  refused([](auto& b) { b["training"]["seq_len"] = 600; }, "\"seq_len\" must be an integer in 1..512");
  refused([](auto& b) { b["training"]["train_layers"] = "9"; }, "layer 9 does not exist");
  refused([](auto& b) { b["training"]["optimizer"]["lr"] = -1; }, "\"lr\" must be a number");
  refused([](auto& b) { b["training"]["optimizer"].erase("beta2"); }, "missing field \"beta2\"");
  refused([](auto& b) { b["training"]["first_step"] = 11; }, "\"first_step\" must be an integer in 1..10");
  refused([](auto& b) { b["training"]["resume"]["file"] = "x.safetensors"; }, "\"file\" and \"sha256\" come together");
  refused([](auto& b) { b["dtype"] = "bfloat16"; }, "training runs in float32");
  refused([](auto& b) { b["training"]["upload_stages"] = "yes"; }, "\"upload_stages\" must be true or false");
  refused([](auto& b) { b["training"] = 3; }, "training must be an object");
}

// The RGB of pixel (x, y) of loss_curve_png()'s image: its scanlines sit in stored deflate
// blocks of 65535 bytes, each behind a 5-byte header, after the zlib header.
std::array<uint8_t, 3> plot_pixel(const std::string& png, int x, int y) {
  const size_t idat_data = 8 + (12 + 13) + 8;
  const size_t raw = static_cast<size_t>(y) * (1 + mdi::kLossPlotWidth * 3) + 1 + static_cast<size_t>(x) * 3;
  std::array<uint8_t, 3> rgb{};
  for (size_t i = 0; i < 3; ++i) rgb[i] = static_cast<uint8_t>(png.at(idat_data + 2 + ((raw + i) / 65535 + 1) * 5 + raw + i));
  return rgb;
}

TEST(LossPlot, IsAPngWithTheTrainingCurveInBlueOnWhite) {
  std::map<int64_t, double> train = {{1, 4.0}, {2, 3.0}, {3, 1.0}}, validation = {{3, 2.0}};
  const std::string png = mdi::loss_curve_png(train, validation);
  ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n"));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  EXPECT_EQ(png.substr(16, 8), std::string("\0\0\x01\xe0\0\0\x01\x40", 8));  // 480 x 320
  const size_t raw = static_cast<size_t>(mdi::kLossPlotHeight) * (1 + mdi::kLossPlotWidth * 3);
  const size_t blocks = (raw + 65534) / 65535;
  EXPECT_EQ(png.size(), 8 + (12 + 13) + (12 + 2 + blocks * 5 + raw + 4) + 12);
  // the first point, step 1 at the largest loss, is the top left corner of the plot area
  EXPECT_EQ(plot_pixel(png, 40, 10), (std::array<uint8_t, 3>{31, 119, 180}));
  EXPECT_EQ(plot_pixel(png, 300, 100), (std::array<uint8_t, 3>{255, 255, 255}));
  EXPECT_EQ(plot_pixel(png, 470, 10 + 280 / 2), (std::array<uint8_t, 3>{214, 39, 40})) << "the validation loss at step 3";
}

}  // namespace
