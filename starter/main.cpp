// starter: loads its chunk (embedding, first layers, final norm, head), and
// either generates alone (no --nodes-config, or one with "secondary": []) or
// drives the ring of secondaries.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common/checkpoint.hpp"
#include "common/generation.hpp"
#include "common/logging.hpp"
#include "common/sample_progress.hpp"
#include "common/tokenizer.hpp"
#include "common/torch_runtime.hpp"

namespace {

struct StarterOptions {
  std::string ckpt;
  std::string tokenizer;
  std::string nodes_config;
  std::string prompt = "";
  int64_t n_samples = 1;
  int64_t n_tokens = 300;
  int64_t block_size = 0;
  std::string device = "cpu";
  std::string dtype;
  uint64_t seed = 10137;
  float temperature = 0.8f;
  int top_k = 200;
  float top_p = 1.0f;
  std::string out;
  std::string time_run;
  bool plots = false;
  int threads = 0;
  int verbosity = 0;
};

// Streams sample 0's text as it is generated when it is the only sample;
// with several, each sample prints whole when it stops, so texts do not interleave.
class TextPrinter {
 public:
  TextPrinter(const mdi::Tokenizer& tokenizer, size_t n_samples) : tokenizer_(tokenizer), streams_(n_samples) {}

  void on_token(const mdi::SampleProgress& s, int64_t token) {
    if (streams_.size() == 1) {
      if (!started_) {
        print(streams_[0].push(mdi::sample_text(tokenizer_, s.prompt_tokens())));
        started_ = true;
      }
      const auto& t = s.tokens();
      print(streams_[0].push(tokenizer_.token_bytes(static_cast<int>(t[t.size() - 2]), static_cast<int>(token))));
      if (!s.running()) print(streams_[0].finish() + "\n");
    } else if (!s.running()) {
      print("[sample " + std::to_string(s.index()) + "] " + mdi::sample_text(tokenizer_, s.tokens()) + "\n");
    }
  }

 private:
  static void print(const std::string& text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  const mdi::Tokenizer& tokenizer_;
  std::vector<mdi::Utf8Stream> streams_;
  bool started_ = false;
};

std::vector<mdi::SampleProgress> make_samples(const StarterOptions& opt, const mdi::Tokenizer& tokenizer,
                                              const mdi::ModelConfig& config) {
  const auto prompts = mdi::read_prompts(opt.prompt);
  mdi::SamplingParams params{opt.temperature, opt.top_k, opt.top_p};
  std::vector<mdi::SampleProgress> samples;
  for (int64_t i = 0; i < opt.n_samples; ++i) {
    const std::string& prompt = prompts[static_cast<size_t>(i) % prompts.size()];
    auto ids = tokenizer.encode(prompt, true);
    samples.emplace_back(i, prompt, std::vector<int64_t>(ids.begin(), ids.end()), opt.n_tokens,
                         mdi::Sampler(params, mdi::Sampler::sample_seed(opt.seed, static_cast<uint64_t>(i))), config);
  }
  return samples;
}

int run(const StarterOptions& opt) {
  mdi::init_torch_runtime(opt.threads);
  const auto device = mdi::parse_device(opt.device);
  const auto dtype = opt.dtype.empty() ? mdi::default_dtype(device) : mdi::parse_dtype(opt.dtype);

  auto reader = mdi::open_checkpoint(opt.ckpt, opt.tokenizer.empty() ? std::nullopt : std::optional<std::filesystem::path>(opt.tokenizer));
  auto tokenizer_path = reader->tokenizer();
  if (!tokenizer_path)
    throw std::invalid_argument("no tokenizer: " + reader->description() + " ships none; pass --tokenizer PATH");
  auto tokenizer = mdi::load_tokenizer(*tokenizer_path);

  mdi::ModelConfig config = reader->config();
  mdi::ChunkSpec spec{{0, config.n_layers}, true, true};
  spdlog::info("model: {} ({} layers, dim {}, vocab {}), {} on {}", reader->description(), config.n_layers, config.dim,
               config.vocab_size, mdi::dtype_name(dtype), device.str());
  auto model = mdi::load_chunk(*reader, spec, device, dtype);
  if (opt.block_size > 0) config.max_seq_len = std::min(config.max_seq_len, opt.block_size);
  // The context bound lives in the config the samples see.
  auto samples = make_samples(opt, *tokenizer, config);

  TextPrinter printer(*tokenizer, samples.size());
  auto stats = mdi::generate_standalone(model, samples, [&](const mdi::SampleProgress& s, int64_t token) { printer.on_token(s, token); });
  spdlog::info("{} tokens in {:.2f} s: {:.1f} tokens/s (prefill {:.3f} s)", stats.generated_tokens, stats.prefill_s + stats.decode_s,
               stats.tokens_per_s(), stats.prefill_s);
  if (!opt.out.empty()) {
    mdi::write_file_atomic(opt.out, mdi::results_json(samples, *tokenizer, stats).dump(1) + "\n");
    spdlog::info("wrote {}", opt.out);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  StarterOptions opt;
  CLI::App app{
      "starter: runs a Llama model split across nodes (MDI-LLM style). Holds the embedding, the first layers, the final\n"
      "norm and the LM head; pushes config and chunks to the secondaries, then drives the activation ring with\n"
      "--n-samples samples in flight. Without --nodes-config it generates alone, in one process."};
  app.option_defaults()->always_capture_default();
  app.add_option("--ckpt", opt.ckpt, "Model: llama2.c .bin, Hugging Face directory, or prepare_model output directory")->required();
  app.add_option("--tokenizer", opt.tokenizer, "Tokenizer file (tokenizer.bin / tokenizer.model / tokenizer.json); default: the model's own");
  app.add_option("--nodes-config", opt.nodes_config, "MDI-LLM nodes-config JSON; absent or \"secondary\": [] runs standalone");
  app.add_option("--prompt", opt.prompt, "Prompt text, or FILE:path with one prompt per paragraph (samples cycle over them)");
  app.add_option("--n-samples", opt.n_samples, "Samples generated concurrently")->check(CLI::PositiveNumber);
  app.add_option("--n-tokens", opt.n_tokens, "New tokens per sample (a stop token ends a sample earlier)")->check(CLI::NonNegativeNumber);
  app.add_option("--block-size,--sequence-length,--context-length", opt.block_size,
                 "Context length cap (default: the model's)")->check(CLI::NonNegativeNumber);
  app.add_option("--device", opt.device, "cpu, cuda or cuda:N");
  app.add_option("--dtype", opt.dtype, "float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)");
  app.add_option("--seed", opt.seed, "Random seed; each sample draws from its own stream");
  app.add_option("--temperature", opt.temperature, "Sampling temperature; 0 is greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", opt.top_k, "Keep the k most likely tokens (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", opt.top_p, "Nucleus sampling mass (1: off)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--out", opt.out, "Write samples and stats as JSON to this file");
  app.add_option("--time-run", opt.time_run, "Write time vs generated tokens as CSV to this file");
  app.add_flag("-p,--plots", opt.plots, "With --time-run: also write an SVG plot beside the CSV");
  app.add_option("--threads", opt.threads, "CPU threads for LibTorch (0: all cores)")->check(CLI::NonNegativeNumber);
  app.add_flag("-v,--verbose", opt.verbosity, "More log detail (-v debug, -vv trace)");
  CLI11_PARSE(app, argc, argv);

  mdi::setup_logging(opt.verbosity, "starter");
  try {
    return run(opt);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
