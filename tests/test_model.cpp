// The model core against an independent, deliberately plain forward pass
// written the way llama2.c's run.c computes it (interleaved RoPE, one
// position at a time, heads in a loop), on llama2.c files the test writes.
#include <torch/torch.h>

#include <fstream>

#include <gmock/gmock.h>
#include <nlohmann/json.hpp>

#include "common/model/model.hpp"
#include "common/store/checkpoint.hpp"
#include "tests/support.hpp"

namespace {

struct RawLlama2c {
  mdi::ModelConfig config;
  torch::Tensor embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls;
};

RawLlama2c random_raw_model(int64_t n_heads, int64_t n_kv_heads, bool tied, uint64_t seed) {
  torch::manual_seed(seed);
  RawLlama2c m;
  auto& c = m.config;
  // Odd sizes reach the kernels' edges: 53 rows and 53-wide rows of the FFN, 41 of the head.
  c.dim = 32, c.hidden_dim = 53, c.n_layers = 2, c.n_heads = n_heads, c.n_kv_heads = n_kv_heads;
  c.vocab_size = 41, c.max_seq_len = 64, c.tied_embeddings = tied;
  const int64_t L = c.n_layers, d = c.dim, kv = c.kv_dim(), h = c.hidden_dim;
  auto r = [](std::vector<int64_t> shape) { return torch::randn(shape) * 0.3; };
  m.embedding = r({c.vocab_size, d});
  m.rms_att = 1 + r({L, d}) * 0.1;
  m.wq = r({L, d, d}), m.wk = r({L, kv, d}), m.wv = r({L, kv, d}), m.wo = r({L, d, d});
  m.rms_ffn = 1 + r({L, d}) * 0.1;
  m.w1 = r({L, h, d}), m.w2 = r({L, d, h}), m.w3 = r({L, h, d});
  m.rms_final = 1 + r({d}) * 0.1;
  m.wcls = tied ? m.embedding : r({c.vocab_size, d});
  return m;
}

void write_llama2c(const RawLlama2c& m, const std::filesystem::path& path) {
  std::ofstream out(path, std::ios::binary);
  const auto& c = m.config;
  int32_t header[7] = {int32_t(c.dim), int32_t(c.hidden_dim), int32_t(c.n_layers), int32_t(c.n_heads), int32_t(c.n_kv_heads),
                       int32_t(c.tied_embeddings ? c.vocab_size : -c.vocab_size), int32_t(c.max_seq_len)};
  out.write(reinterpret_cast<const char*>(header), sizeof header);
  auto put = [&](const torch::Tensor& t) {
    auto f = t.contiguous().to(torch::kFloat32);
    out.write(reinterpret_cast<const char*>(f.data_ptr<float>()), f.numel() * 4);
  };
  for (auto* t : {&m.embedding, &m.rms_att, &m.wq, &m.wk, &m.wv, &m.wo, &m.rms_ffn, &m.w1, &m.w2, &m.w3, &m.rms_final}) put(*t);
  put(torch::zeros({2, c.max_seq_len, c.head_dim() / 2}));  // freq_cis, ignored
  if (!c.tied_embeddings) put(m.wcls);
}

torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& w) { return x / torch::sqrt(x.pow(2).mean() + 1e-5) * w; }

// Logits (T, vocab) of every position, computed like run.c.
torch::Tensor reference_logits(const RawLlama2c& m, const std::vector<int64_t>& tokens) {
  const auto& c = m.config;
  const int64_t hd = c.head_dim(), group = c.n_heads / c.n_kv_heads, T = tokens.size();
  std::vector<std::vector<torch::Tensor>> keys(c.n_layers), values(c.n_layers);
  std::vector<torch::Tensor> out;
  for (int64_t pos = 0; pos < T; ++pos) {
    auto x = m.embedding[tokens[pos]].clone();
    for (int64_t l = 0; l < c.n_layers; ++l) {
      auto xb = rmsnorm(x, m.rms_att[l]);
      auto q = torch::mv(m.wq[l], xb), k = torch::mv(m.wk[l], xb), v = torch::mv(m.wv[l], xb);
      for (int64_t i = 0; i < c.dim; i += 2) {  // interleaved RoPE: adjacent pairs rotate
        const float freq = 1.0f / std::pow(10000.0f, float(i % hd) / float(hd));
        const float angle = pos * freq, fcr = std::cos(angle), fci = std::sin(angle);
        auto rotate = [&](torch::Tensor& t) {
          float a = t[i].item<float>(), b = t[i + 1].item<float>();
          t[i] = a * fcr - b * fci;
          t[i + 1] = a * fci + b * fcr;
        };
        rotate(q);
        if (i < c.kv_dim()) rotate(k);
      }
      keys[l].push_back(k);
      values[l].push_back(v);
      auto att_out = torch::zeros({c.dim});
      for (int64_t h = 0; h < c.n_heads; ++h) {
        auto qh = q.narrow(0, h * hd, hd);
        const int64_t kvh = h / group;
        std::vector<torch::Tensor> scores;
        for (int64_t t = 0; t <= pos; ++t) scores.push_back(torch::dot(qh, keys[l][t].narrow(0, kvh * hd, hd)) / std::sqrt(float(hd)));
        auto p = torch::softmax(torch::stack(scores), 0);
        for (int64_t t = 0; t <= pos; ++t) att_out.narrow(0, h * hd, hd).add_(p[t] * values[l][t].narrow(0, kvh * hd, hd));
      }
      x = x + torch::mv(m.wo[l], att_out);
      xb = rmsnorm(x, m.rms_ffn[l]);
      x = x + torch::mv(m.w2[l], torch::silu(torch::mv(m.w1[l], xb)) * torch::mv(m.w3[l], xb));
    }
    out.push_back(torch::mv(m.wcls, rmsnorm(x, m.rms_final)));
  }
  return torch::stack(out);
}

const std::vector<int64_t> kTokens = {1, 7, 22, 3, 39, 14, 14, 5, 0, 31};

mdi::ModelChunk load_whole(const mdi::CheckpointReader& reader) {
  const auto& c = reader.config();
  return mdi::load_chunk(reader, {{0, c.n_layers}, true, true}, torch::kCPU, torch::kFloat32);
}

class ModelVsReference : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, bool>> {};

// Covers the interleaved → half-split conversion, GQA (kv heads < heads) and tied/untied heads.
TEST_P(ModelVsReference, PrefillLogitsMatchRunCStyleForward) {
  auto [heads, kv_heads, tied] = GetParam();
  mdi::test::ScratchDir dir;
  auto raw = random_raw_model(heads, kv_heads, tied, 7);
  write_llama2c(raw, dir / "m.bin");
  auto reader = mdi::open_llama2c(dir / "m.bin", std::nullopt);
  EXPECT_EQ(reader->config().tied_embeddings, tied);
  auto model = load_whole(*reader);
  auto cache = model.new_cache();
  auto logits = model.forward(torch::tensor(kTokens), cache, 0, /*last_only=*/false);
  auto expected = reference_logits(raw, kTokens);
  EXPECT_LT((logits - expected).abs().max().item<float>(), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Shapes, ModelVsReference,
                         ::testing::Values(std::make_tuple(4, 4, true), std::make_tuple(4, 2, true), std::make_tuple(8, 2, false),
                                           std::make_tuple(4, 1, false)));

TEST(Model, GroupedQueryAttentionEqualsAttentionWithRepeatedKvHeads) {
  mdi::test::ScratchDir dir;
  auto gqa = random_raw_model(4, 2, false, 11);
  auto mha = gqa;
  // each kv head serves 2 query heads: repeat its rows per query head
  const int64_t hd = gqa.config.head_dim();
  auto repeat = [&](const torch::Tensor& w) {
    return w.view({w.size(0), 2, 1, hd, w.size(2)}).expand({w.size(0), 2, 2, hd, w.size(2)}).reshape({w.size(0), 4 * hd, w.size(2)});
  };
  mha.config.n_kv_heads = 4;
  mha.wk = repeat(gqa.wk);
  mha.wv = repeat(gqa.wv);
  write_llama2c(gqa, dir / "gqa.bin");
  write_llama2c(mha, dir / "mha.bin");
  auto a = load_whole(*mdi::open_llama2c(dir / "gqa.bin", std::nullopt));
  auto b = load_whole(*mdi::open_llama2c(dir / "mha.bin", std::nullopt));
  auto ca = a.new_cache(), cb = b.new_cache();
  auto la = a.forward(torch::tensor(kTokens), ca, 0, false), lb = b.forward(torch::tensor(kTokens), cb, 0, false);
  EXPECT_LT((la - lb).abs().max().item<float>(), 1e-5);
}

TEST(Model, DecodeWithKvCacheEqualsFullRecompute) {
  mdi::test::ScratchDir dir;
  write_llama2c(random_raw_model(8, 2, true, 3), dir / "m.bin");
  auto model = load_whole(*mdi::open_llama2c(dir / "m.bin", std::nullopt));
  auto full_cache = model.new_cache();
  auto full = model.forward(torch::tensor(kTokens), full_cache, 0, false);
  // prefill 4 tokens, then decode one at a time
  auto cache = model.new_cache();
  std::vector<torch::Tensor> rows = {model.forward(torch::tensor(std::vector<int64_t>(kTokens.begin(), kTokens.begin() + 4)), cache, 0, false)};
  for (size_t pos = 4; pos < kTokens.size(); ++pos) rows.push_back(model.forward(torch::tensor({kTokens[pos]}), cache, pos));
  auto stepwise = torch::cat(rows, 0);
  EXPECT_LE((stepwise - full).abs().max().item<float>(), 1e-4);
}

TEST(Model, ChunksChainedThroughHiddenStatesEqualTheWholeModel) {
  mdi::test::ScratchDir dir;
  write_llama2c(random_raw_model(4, 2, false, 5), dir / "m.bin");
  auto reader = mdi::open_llama2c(dir / "m.bin", std::nullopt);
  auto whole = load_whole(*reader);
  auto first = mdi::load_chunk(*reader, {{0, 1}, true, false}, torch::kCPU, torch::kFloat32);
  auto last = mdi::load_chunk(*reader, {{1, 2}, false, true}, torch::kCPU, torch::kFloat32);
  auto cw = whole.new_cache(), c1 = first.new_cache(), c2 = last.new_cache();
  auto expected = whole.forward(torch::tensor(kTokens), cw, 0, false);
  auto hidden = first.forward(torch::tensor(kTokens), c1, 0);
  EXPECT_EQ(hidden.sizes(), (std::vector<int64_t>{int64_t(kTokens.size()), 32}));
  auto logits = last.forward(hidden, c2, 0, false);
  EXPECT_TRUE(torch::equal(logits, expected));
}

// A micro-batch of a prompt and two decode steps, each sample at its own position with
// its own cache, gives every sample bit for bit what it gets alone; a hook that replaces
// one sample's rows changes that sample only.
TEST(Model, MicroBatchGivesEachSampleWhatItGetsAlone) {
  mdi::test::ScratchDir dir;
  write_llama2c(random_raw_model(8, 2, false, 9), dir / "m.bin");
  auto model = load_whole(*mdi::open_llama2c(dir / "m.bin", std::nullopt));
  const std::vector<int64_t> history_b = {1, 5, 9}, history_c = {1, 7, 3, 8, 2};
  const std::vector<int64_t> prompt_a = {1, 4, 4, 2}, next_b = {6}, next_c = {11};
  auto prefilled = [&](const std::vector<int64_t>& history) {
    auto cache = model.new_cache();
    model.forward(torch::tensor(history), cache, 0);
    return cache;
  };
  // replaces its rows (as an intervention does) after layer 0
  mdi::LayerHook steer = [](int64_t layer, torch::Tensor& hidden) {
    if (layer == 0) hidden = hidden + 0.5f;
  };

  auto alone_a = model.new_cache(), alone_b = prefilled(history_b), alone_c = prefilled(history_c);
  auto expect_a = model.forward(torch::tensor(prompt_a), alone_a, 0, true);
  auto expect_b = model.forward(torch::tensor(next_b), alone_b, 3, true, steer);
  auto expect_c = model.forward(torch::tensor(next_c), alone_c, 5, true);

  auto cache_a = model.new_cache(), cache_b = prefilled(history_b), cache_c = prefilled(history_c);
  std::vector<int64_t> input = prompt_a;
  input.insert(input.end(), {next_b[0], next_c[0]});
  auto logits = model.forward(torch::tensor(input), {{&cache_a, 0, 4, nullptr}, {&cache_b, 3, 1, steer}, {&cache_c, 5, 1, nullptr}});
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{3, model.config().vocab_size}));
  EXPECT_TRUE(torch::equal(logits[0], expect_a[0]));
  EXPECT_TRUE(torch::equal(logits[1], expect_b[0]));
  EXPECT_TRUE(torch::equal(logits[2], expect_c[0]));
  auto unsteered_cache = prefilled(history_b);
  EXPECT_FALSE(torch::equal(logits[1], model.forward(torch::tensor(next_b), unsteered_cache, 3)[0]));
}

TEST(Model, MicroBatchesPackInOrderWithinTheRowCap) {
  using Batches = std::vector<std::vector<size_t>>;
  EXPECT_EQ(mdi::pack_micro_batches({1, 1, 1, 1, 1}, 2), (Batches{{0, 1}, {2, 3}, {4}}));
  EXPECT_EQ(mdi::pack_micro_batches({20, 10, 5, 40, 1}, 8), (Batches{{0, 1}, {2}, {3}, {4}}));
  EXPECT_EQ(mdi::pack_micro_batches({1, 1}, 0), (Batches{{0}, {1}}));
  EXPECT_EQ(mdi::pack_micro_batches({}, 4), Batches{});
}

TEST(ModelConfig, FieldsOfTheWrongTypeAreNamed) {
  const nlohmann::json base = {{"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
                               {"num_attention_heads", 4}, {"vocab_size", 32}, {"max_position_embeddings", 64}};
  auto error_of = [&](const nlohmann::json& patch) {
    auto j = base;
    j.merge_patch(patch);
    try {
      mdi::ModelConfig::from_hf_json(j, "m/config.json");
      return std::string();
    } catch (const mdi::ConfigError& e) {
      return std::string(e.what());
    }
  };
  EXPECT_EQ(error_of(nlohmann::json::object()), "");
  EXPECT_EQ(error_of({{"rms_norm_eps", "1e-5"}}), "m/config.json: field \"rms_norm_eps\" must be a number");
  EXPECT_EQ(error_of({{"tie_word_embeddings", 1}}), "m/config.json: field \"tie_word_embeddings\" must be true or false");
  EXPECT_EQ(error_of({{"rope_scaling", {{"rope_type", "llama3"}, {"factor", "8"}}}}),
            "m/config.json: rope_scaling: field \"factor\" must be a number");
  EXPECT_THAT(error_of({{"rope_scaling", {{"rope_type", "llama3"}, {"high_freq_factor", 1.0}}}}),
              ::testing::HasSubstr("low_freq_factor < high_freq_factor"));
}

TEST(Model, PassingTheContextLengthIsAClearError) {
  mdi::test::ScratchDir dir;
  write_llama2c(random_raw_model(4, 4, true, 1), dir / "m.bin");
  auto model = load_whole(*mdi::open_llama2c(dir / "m.bin", std::nullopt));
  auto cache = model.new_cache();
  model.forward(torch::zeros({60}, torch::kLong), cache, 0);
  try {
    model.forward(torch::zeros({5}, torch::kLong), cache, 60);
    FAIL() << "expected ContextLengthError";
  } catch (const mdi::ContextLengthError& e) {
    EXPECT_NE(std::string(e.what()).find("context length 64"), std::string::npos) << e.what();
  }
}

TEST(Model, KvCacheGrowsWithTheSampleNotTheContext) {
  mdi::test::ScratchDir dir;
  auto raw = random_raw_model(4, 4, true, 1);
  raw.config.max_seq_len = 4096;
  write_llama2c(raw, dir / "m.bin");
  auto model = load_whole(*mdi::open_llama2c(dir / "m.bin", std::nullopt));
  auto cache = model.new_cache();
  EXPECT_EQ(cache.bytes(), 0);
  model.forward(torch::tensor(kTokens), cache, 0);
  EXPECT_LT(cache.capacity(), 4096);
  EXPECT_GE(cache.capacity(), int64_t(kTokens.size()));
}

TEST(Model, TruncatedLlama2cFileNamesThePathAndSizes) {
  mdi::test::ScratchDir dir;
  write_llama2c(random_raw_model(4, 4, true, 1), dir / "m.bin");
  std::filesystem::resize_file(dir / "m.bin", 1000);
  try {
    mdi::open_llama2c(dir / "m.bin", std::nullopt);
    FAIL() << "expected CheckpointError";
  } catch (const mdi::CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find((dir / "m.bin").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  }
}

}  // namespace
