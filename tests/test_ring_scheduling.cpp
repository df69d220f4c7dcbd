// The ring's loops (common/runtime/ring) over in-process links: scheduling,
// micro-batching, KV cache lifetimes and failures, with threads and no sockets.
// A random-weight stories260K-shaped model, so a fresh clone runs them too.
#include <torch/torch.h>

#include <future>

#include <gmock/gmock.h>

#include "common/net/in_process_link.hpp"
#include "common/runtime/generation.hpp"
#include "common/runtime/ring.hpp"
#include "common/store/checkpoint.hpp"

namespace {
using namespace mdi;
using namespace std::chrono_literals;
using ::testing::HasSubstr;

const CheckpointReader& random_model() {
  static const auto reader = open_random("random:stories260K", 7);
  return *reader;
}

ModelChunk chunk(LayerRange layers, bool ends) {
  return load_chunk(random_model(), {layers, ends, ends}, torch::kCPU, torch::kFloat32);
}

std::string node_name(size_t ring_index) { return "ring index " + std::to_string(ring_index); }

// Node i's to_next and node i+1's from_prev are the two ends of one in-process link.
// to_next[i] is node i's, to fail it as a dead node's socket would.
struct InProcessRing {
  std::vector<RingLinks> nodes;
  std::vector<InProcessLink*> to_next;
};
InProcessRing in_process_ring(size_t n_nodes) {
  InProcessRing ring;
  ring.nodes.resize(n_nodes);
  for (size_t i = 0; i < n_nodes; ++i) {
    const size_t next = (i + 1) % n_nodes;
    auto link = make_in_process_link(node_name(i), node_name(next));
    ring.to_next.push_back(link.a.get());
    ring.nodes[i].to_next = std::move(link.a);
    ring.nodes[next].from_prev = std::move(link.b);
  }
  return ring;
}

std::vector<SampleProgress> samples(const ModelConfig& config, size_t n, int64_t n_tokens) {
  std::vector<SampleProgress> out;
  for (size_t i = 0; i < n; ++i) {
    std::vector<int64_t> prompt{1};
    for (size_t k = 0; k <= i; ++k) prompt.push_back(static_cast<int64_t>(20 + 7 * k + i));
    out.emplace_back(static_cast<int64_t>(i), "", prompt, n_tokens, Sampler({0.9f, 40, 0.95f}, Sampler::sample_seed(3, i)), config);
  }
  return out;
}

std::vector<std::vector<int64_t>> tokens_of(const std::vector<SampleProgress>& samples) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& s : samples) out.push_back(s.tokens());
  return out;
}

// A secondary's stage on its own thread; get() rethrows what it threw.
std::future<void> start_stage(const ModelChunk& chunk, RingLinks& links, StageStats& stats, const std::atomic<bool>& cancel) {
  return std::async(std::launch::async, [&] { run_secondary_stage(chunk, links, stats, cancel, 5s, chunk.config().max_seq_len); });
}

Frame hidden_frame(uint32_t sample, uint32_t pos, int64_t rows, int64_t dim) {
  return activations_frame(sample, pos, torch::randn({rows, dim}));
}

TEST(RingScheduling, ThreeNodesGiveEachSampleItsStandaloneTokens) {
  const ModelChunk whole = chunk({0, 5}, true), starter = chunk({0, 2}, true), first = chunk({2, 4}, false),
                   second = chunk({4, 5}, false);
  auto reference = samples(whole.config(), 5, 12);
  RunStats reference_figures;
  generate_standalone(whole, reference, nullptr, reference_figures);

  for (size_t micro_batch : {1, 2, 5}) {
    InProcessRing ring = in_process_ring(3);
    StageStats stats[3];
    std::atomic<bool> cancel{false};
    auto stage1 = start_stage(first, ring.nodes[1], stats[1], cancel);
    auto stage2 = start_stage(second, ring.nodes[2], stats[2], cancel);
    auto run = samples(whole.config(), 5, 12);
    RingGenerationOptions options;
    options.micro_batch = micro_batch;
    size_t tokens_seen = 0;
    RunStats figures;
    run_starter_ring(starter, ring.nodes[0], run, [&](const SampleProgress&, int64_t) { ++tokens_seen; }, figures, stats[0], options);
    stage1.get();  // both passed the RunStop on and returned
    stage2.get();
    EXPECT_EQ(tokens_of(run), tokens_of(reference)) << "micro-batch " << micro_batch;
    EXPECT_EQ(static_cast<int64_t>(tokens_seen), figures.generated_tokens);
    EXPECT_EQ(stats[1].to_json()["live_samples"], 0) << "a finished run leaves no cache behind";
    // Samples travel together: with batches of 5 a secondary computes far fewer frames than steps.
    if (micro_batch == 5) {
      EXPECT_LE(stats[1].to_json()["frames"].get<int64_t>(), 12 + 1);
    }
  }
}

TEST(RingScheduling, SecondaryBatchesQueuedFramesAndFreesACacheOnSampleStop) {
  const ModelChunk stage_chunk = chunk({2, 4}, false);
  const int64_t dim = stage_chunk.config().dim;
  auto in = make_in_process_link("starter", "secondary");
  auto out = make_in_process_link("secondary", "next");
  RingLinks links{std::move(in.b), std::move(out.a)};

  // Three prompts queued before the stage looks: one pass computes them together.
  std::vector<Frame> sent;
  for (uint32_t sample = 0; sample < 3; ++sample) {
    sent.push_back(hidden_frame(sample, 0, 2 + sample, dim));
    in.a->send(sent.back(), 1s);
  }
  StageStats stats;
  std::atomic<bool> cancel{false};
  auto stage = start_stage(stage_chunk, links, stats, cancel);

  auto batch = out.b->receive(5s);
  ASSERT_TRUE(batch);
  ASSERT_EQ(batch->header.type, FrameType::ActivationBatch);
  const ActivationRows rows = activation_rows(*batch, dim, torch::kFloat32, stage_chunk.config().max_seq_len);
  ASSERT_EQ(rows.segments.size(), 3u);
  int64_t row = 0;
  for (uint32_t sample = 0; sample < 3; ++sample) {
    EXPECT_EQ(rows.segments[sample], (BatchSegment{sample, 0, 2 + sample}));
    KvCache cache = stage_chunk.new_cache();
    const auto alone = stage_chunk.run_layers(activations_tensor(sent[sample], dim, torch::kFloat32), cache, 0);
    EXPECT_TRUE(torch::equal(rows.rows.narrow(0, row, 2 + sample), alone)) << "sample " << sample << " differs from its pass alone";
    row += 2 + sample;
  }
  EXPECT_EQ(stats.to_json()["frames"], 1);

  // A SampleStop passes on and frees that sample's cache; its next step finds none.
  in.a->send(make_control_frame(FrameType::SampleStop, 1), 1s);
  auto stop = out.b->receive(5s);
  ASSERT_TRUE(stop);
  EXPECT_EQ(stop->header.type, FrameType::SampleStop);
  EXPECT_EQ(stats.to_json()["live_samples"], 2);
  in.a->send(hidden_frame(1, 3, 1, dim), 1s);
  try {
    stage.get();
    FAIL() << "a step of a freed sample was computed";
  } catch (const ProtocolError& e) {
    EXPECT_THAT(e.what(), HasSubstr("sample 1 at position 3, but this node holds no cache for it"));
  }
}

TEST(RingScheduling, ANodeThatDiesEndsTheStartersRunWithItsError) {
  const ModelChunk starter = chunk({0, 2}, true);
  InProcessRing ring = in_process_ring(2);
  // Secondary 0 takes the first step, then dies: both of its links fail.
  auto dying = std::async(std::launch::async, [&] {
    auto frame = ring.nodes[1].from_prev->receive(5s);
    ring.to_next[1]->fail("ring index 1 (in process): peer closed the connection");
    ring.to_next[0]->fail("ring index 1 (in process): peer closed the connection");
    return frame.has_value();
  });
  auto run = samples(starter.config(), 2, 8);
  StageStats stats;
  RunStats figures;
  try {
    run_starter_ring(starter, ring.nodes[0], run, nullptr, figures, stats, {});
    FAIL() << "the run went on without its secondary";
  } catch (const LinkError& e) {
    EXPECT_STREQ(e.what(), "ring index 1 (in process): peer closed the connection");
  }
  EXPECT_TRUE(dying.get());
}

TEST(RingScheduling, ACancelledRunEndsWithRunInterruptedKeepingItsTokensAndFigures) {
  const ModelChunk starter = chunk({0, 2}, true), rest = chunk({2, 5}, false);
  InProcessRing ring = in_process_ring(2);
  StageStats stats[2];
  std::atomic<bool> stage_cancel{false}, run_cancel{false};
  auto stage = start_stage(rest, ring.nodes[1], stats[1], stage_cancel);
  auto run = samples(starter.config(), 2, 50);
  RingGenerationOptions options;
  options.cancel = &run_cancel;
  size_t tokens_seen = 0;
  RunStats figures;
  EXPECT_THROW(run_starter_ring(starter, ring.nodes[0], run,
                                [&](const SampleProgress&, int64_t) {
                                  if (++tokens_seen == 5) run_cancel = true;  // as SIGINT sets it
                                },
                                figures, stats[0], options),
               RunInterrupted);
  EXPECT_GE(tokens_seen, 5u);
  EXPECT_LT(tokens_seen, 100u);
  EXPECT_EQ(figures.generated_tokens, static_cast<int64_t>(tokens_seen));
  EXPECT_EQ(run[0].generated() + run[1].generated(), static_cast<int64_t>(tokens_seen));
  EXPECT_TRUE(run[0].running() || run[1].running());
  stage_cancel = true;
  stage.get();
}

// A node that takes frames and never answers, as one whose compute hangs while its
// link threads keep the link alive.
TEST(RingScheduling, ARingThatStopsAnsweringEndsWithRingStalledAfterTheProgressTimeout) {
  const ModelChunk starter = chunk({0, 2}, true);
  InProcessRing ring = in_process_ring(2);
  std::atomic<bool> done{false};
  auto stuck = std::async(std::launch::async, [&] {
    size_t taken = 0;
    while (!done)
      if (ring.nodes[1].from_prev->receive(50ms)) ++taken;
    return taken;
  });
  auto run = samples(starter.config(), 2, 8);
  RingGenerationOptions options;
  options.progress_timeout = 300ms;
  StageStats stats;
  RunStats figures;
  const auto start = std::chrono::steady_clock::now();
  try {
    run_starter_ring(starter, ring.nodes[0], run, nullptr, figures, stats, options);
    FAIL() << "a ring that never answers was waited out";
  } catch (const RingStalled& e) {
    EXPECT_THAT(e.what(), HasSubstr("no frame came back around the ring for 300 ms (2 samples in flight)"));
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 3s);
  done = true;
  EXPECT_GE(stuck.get(), 1u);
}

TEST(RingScheduling, StarterRefusesActivationsOfASampleNotInFlight) {
  const ModelChunk starter = chunk({0, 2}, true);
  InProcessRing ring = in_process_ring(2);
  auto wrong_answer = std::async(std::launch::async, [&] {
    auto frame = ring.nodes[1].from_prev->receive(5s);
    ring.nodes[1].to_next->send(hidden_frame(7, 0, 1, starter.config().dim), 1s);
    return frame.has_value();
  });
  auto run = samples(starter.config(), 1, 8);
  StageStats stats;
  RunStats figures;
  try {
    run_starter_ring(starter, ring.nodes[0], run, nullptr, figures, stats, {});
    FAIL() << "activations of an unknown sample were taken";
  } catch (const ProtocolError& e) {
    EXPECT_THAT(e.what(), HasSubstr("activations for sample 7, which is not in flight, from ring index 1"));
  }
  EXPECT_TRUE(wrong_answer.get());
}

TEST(RingScheduling, SecondaryStageReturnsOnceCancelled) {
  const ModelChunk stage_chunk = chunk({2, 4}, false);
  InProcessRing ring = in_process_ring(2);
  StageStats stats;
  std::atomic<bool> cancel{false};
  auto stage = start_stage(stage_chunk, ring.nodes[1], stats, cancel);
  cancel = true;
  ASSERT_EQ(stage.wait_for(5s), std::future_status::ready) << "a cancelled stage kept waiting for frames";
  stage.get();
}

}  // namespace
