// starter: loads its chunk (embedding, first layers, final norm, head), and
// either generates alone (no --nodes-config, or one with "secondary": []) or
// drives the ring of secondaries.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <system_error>
#include <iostream>
#include <nlohmann/json.hpp>

#include <fstream>

#include "common/interp/hidden_states.hpp"
#include "common/interp/interventions.hpp"
#include "common/model/tokenizer/tokenizer.hpp"
#include "common/model/tokenizer/utf8.hpp"
#include "common/net/ring_setup.hpp"
#include "common/runtime/generation.hpp"
#include "common/runtime/logging.hpp"
#include "common/runtime/ring.hpp"
#include "common/runtime/sample_progress.hpp"
#include "common/runtime/starter_cluster.hpp"
#include "common/runtime/torch_runtime.hpp"
#include "common/store/atomic_file.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/wire/nodes_config.hpp"
#include "starter/train_command.hpp"

namespace {

struct StarterOptions {
  std::string ckpt;
  std::string tokenizer;
  std::string nodes_config;
  std::string prompt = "";
  int64_t n_samples = 1;
  int64_t micro_batch = 0;  // samples per ring frame; 0: n_samples / n_nodes, rounded up
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
  bool device_given = false;
  std::string chunk;
  bool keep_nodes = false;
  bool upload_chunks = false;
  // hidden states (common/interp/interventions.hpp)
  std::string capture;                     // LAYERS: "all", "embed,0,3-4"
  std::string capture_positions = "all";   // "all" | "last"
  std::string capture_out;                 // FILE.safetensors
  std::string interventions;               // FILE.json
  int64_t logit_lens = 0;                  // top-k of the logit lens; 0: off
};

// Set by the first SIGINT or SIGTERM: the run stops where it is and what it has is written
// out. The handler is reset as it runs, so a second one ends the process at once.
std::atomic<bool> g_stop_requested{false};
volatile std::sig_atomic_t g_stop_signal = 0;
static_assert(std::atomic<bool>::is_always_lock_free, "set from a signal handler");

extern "C" void on_stop_signal(int signal) {
  g_stop_signal = signal;
  g_stop_requested = true;
}

void install_stop_signals() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  action.sa_flags = SA_RESETHAND;
  sigemptyset(&action.sa_mask);
  for (int signal : {SIGINT, SIGTERM}) sigaction(signal, &action, nullptr);
}

// A run that ended before every sample reached its own stop.
struct EarlyEnd {
  mdi::StopReason reason;  // for the samples still running
  std::string error;       // for the log and --out
  int exit_code;
};

// Runs `generate`; when it throws or is interrupted, the samples still running
// stop with the reason, so what was generated is printed and written all the same.
template <class Generate>
std::optional<EarlyEnd> generate_until_stopped(std::vector<mdi::SampleProgress>& samples, Generate&& generate) {
  std::optional<EarlyEnd> early;
  try {
    generate();
  } catch (const mdi::RunInterrupted&) {
    const int signal = g_stop_signal;
    early = EarlyEnd{mdi::StopReason::interrupted, std::string("interrupted by ") + (signal == SIGTERM ? "SIGTERM" : "SIGINT"),
                     128 + signal};
  } catch (const std::exception& e) {
    early = EarlyEnd{mdi::StopReason::failed, e.what(), 1};
  }
  if (!early) return early;
  size_t cut_short = 0;
  for (auto& s : samples) {
    cut_short += s.running();
    s.end_early(early->reason);
  }
  spdlog::error("{}", early->error);
  spdlog::error("the run ended early: {} of {} samples cut short; their tokens so far are kept", cut_short, samples.size());
  return early;
}

// starter steering-vector: the mean difference of two capture files at one layer.
struct SteeringOptions {
  std::string from, to, layer, out, name = "steer";
};

// Streams sample 0's text as it is generated when it is the only sample;
// with several, each sample prints whole when it stops, so texts do not interleave.
class TextPrinter {
 public:
  TextPrinter(const mdi::Tokenizer& tokenizer, size_t n_samples) : tokenizer_(tokenizer), streams_(n_samples) {}

  mdi::TokenCallback callback() {
    return [this](const mdi::SampleProgress& s, int64_t token) { on_token(s, token); };
  }

  // After a run that ended early: the rest of what it has, the samples cut short included.
  void finish_early(const std::vector<mdi::SampleProgress>& samples, const EarlyEnd& early) {
    const std::string note = std::string(" [") + mdi::stop_reason_name(early.reason) + "]\n";
    if (streams_.size() == 1) {
      if (!started_) print(streams_[0].push(mdi::sample_text(tokenizer_, samples[0].tokens())));
      if (!started_ || samples[0].stop_reason() == early.reason) print(streams_[0].finish() + note);
      return;
    }
    for (const auto& s : samples)
      if (s.stop_reason() == early.reason)
        print("[sample " + std::to_string(s.index()) + "] " + mdi::sample_text(tokenizer_, s.tokens()) + note);
  }

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
    // The last position's logits still give a token, so a context of C holds C + 1 tokens.
    if (static_cast<size_t>(i) < prompts.size() && static_cast<int64_t>(ids.size()) + opt.n_tokens > config.max_seq_len + 1)
      spdlog::warn("sample {}: {} prompt tokens and --n-tokens {} pass the context of {} tokens; it stops at the end of "
                   "the context (a larger --block-size, up to the model's, gives more)",
                   i, ids.size(), opt.n_tokens, config.max_seq_len);
    samples.emplace_back(i, prompt, std::vector<int64_t>(ids.begin(), ids.end()), opt.n_tokens,
                         mdi::Sampler(params, mdi::Sampler::sample_seed(opt.seed, static_cast<uint64_t>(i))), config);
  }
  return samples;
}

std::optional<std::filesystem::path> optional_path(const std::string& text) {
  if (text.empty()) return std::nullopt;
  return std::filesystem::path(text);
}

// --tokenizer, or else the one the model comes with; logged, and refused where it has more tokens than the model.
std::unique_ptr<mdi::Tokenizer> open_tokenizer(const StarterOptions& opt, const mdi::CheckpointReader& reader) {
  const auto path = opt.tokenizer.empty() ? reader.tokenizer() : optional_path(opt.tokenizer);
  if (!path) throw std::invalid_argument("no tokenizer: " + reader.description() + " ships none; pass --tokenizer PATH");
  auto tokenizer = mdi::load_tokenizer_for(*path, reader.config());
  spdlog::info("tokenizer {} ({}, {} tokens)", path->string(), opt.tokenizer.empty() ? "the model's own" : "--tokenizer",
               tokenizer->vocab_size());
  return tokenizer;
}

// What a run captures and changes, and where the starter's own captures go.
class Probing {
 public:
  Probing(const StarterOptions& opt, const mdi::ModelConfig& config, const std::vector<mdi::SampleProgress>& samples,
          torch::ScalarType dtype) {
    if (!opt.capture.empty()) plan_.capture = mdi::parse_capture_spec(opt.capture, opt.capture_positions, config.n_layers);
    if (!opt.interventions.empty()) {
      mdi::ModelBounds bounds{config.n_layers, config.dim, static_cast<int64_t>(samples.size())};
      plan_.interventions = mdi::load_interventions_file(opt.interventions, bounds, mdi::read_vector);
      spdlog::info("{}: {} interventions", opt.interventions, plan_.interventions.size());
    }
    for (const auto& s : samples) plan_.prompt_lengths.push_back(static_cast<int64_t>(s.prompt_tokens().size()));
    if (!plan_.capture.empty()) collector_.emplace(plan_.capture, samples.size(), config.dim, dtype);
  }

  const mdi::InterpretabilityPlan& plan() const { return plan_; }

  // The hooks of `chunk`, which holds the embedding and layers [0, layer_end).
  mdi::HookFactory hooks(const mdi::ModelChunk& chunk) {
    if (plan_.empty()) return nullptr;
    probes_.emplace(plan_.for_layers(mdi::kEmbedLayer, chunk.spec().layers.end), chunk);
    return [this](uint32_t sample, int64_t start_pos) {
      return probes_->hook(sample, start_pos, [this](uint32_t s, int64_t layer, int64_t pos, torch::Tensor rows) {
        collector_->add(s, layer, pos, rows);
      });
    };
  }

  // Capture frames from the secondaries.
  std::function<void(const mdi::Frame&)> on_capture(const mdi::ModelChunk& chunk) {
    if (!collector_) return nullptr;
    return [this, dim = chunk.config().dim, dtype = chunk.dtype()](const mdi::Frame& frame) {
      auto c = mdi::captured_rows(frame, dim, dtype);
      collector_->add(c.sample_id, c.layer, c.start_pos, c.rows);
    };
  }

  // Writes --capture-out; returns the logit lens for --out (null without --logit-lens).
  nlohmann::json finish(const StarterOptions& opt, const mdi::ModelChunk& head, const std::vector<mdi::SampleProgress>& samples,
                        const mdi::Tokenizer& tokenizer) {
    if (!collector_) return nullptr;
    if (!opt.capture_out.empty()) {
      collector_->write(opt.capture_out, samples);
      spdlog::info("wrote {}: {} layers of {} samples, positions {}", opt.capture_out, plan_.capture.layers.size(), samples.size(),
                   plan_.capture.positions_name());
    }
    if (opt.logit_lens <= 0) return nullptr;
    return mdi::logit_lens(head, *collector_, samples, tokenizer, opt.logit_lens);
  }

 private:
  mdi::InterpretabilityPlan plan_;
  std::optional<mdi::LayerProbes> probes_;
  std::optional<mdi::CaptureCollector> collector_;
};

// Writes --out, --time-run and its plot; returns the exit code. After a run that ended
// early they hold what it did, --out its error too.
int write_outputs(const StarterOptions& opt, const std::vector<mdi::SampleProgress>& samples, const mdi::Tokenizer& tokenizer,
                  const mdi::RunStats& stats, const nlohmann::json* node_stats, const nlohmann::json& logit_lens,
                  const std::optional<EarlyEnd>& early) {
  spdlog::info("{} tokens in {:.2f} s: {:.1f} tokens/s (first token after {:.3f} s)", stats.generated_tokens,
               stats.prefill_s + stats.decode_s, stats.tokens_per_s(), stats.prefill_s);
  if (!opt.out.empty()) {
    auto result = mdi::results_json(samples, tokenizer, stats, node_stats);
    if (!logit_lens.is_null()) result["logit_lens"] = logit_lens;
    if (early) result["error"] = mdi::valid_utf8(early->error);
    mdi::write_file_atomic(opt.out, result.dump(1) + "\n");
    spdlog::info("wrote {}", opt.out);
  }
  if (!opt.time_run.empty()) {
    mdi::write_file_atomic(opt.time_run, mdi::timeline_csv(stats));
    spdlog::info("wrote {}", opt.time_run);
    if (opt.plots) {
      const std::string svg = std::filesystem::path(opt.time_run).replace_extension(".svg").string();
      mdi::write_file_atomic(svg, mdi::timeline_svg(stats, std::to_string(samples.size()) + " samples"));
      spdlog::info("wrote {}", svg);
    }
  }
  return early ? early->exit_code : 0;
}

// --dtype, or else the weights' own dtype where they are stored in 16 bits
// (converting a bfloat16 model to float32 doubles its memory for nothing),
// or else the device's default.
torch::ScalarType run_dtype(const StarterOptions& opt, const mdi::CheckpointReader& reader, const torch::Device& device) {
  if (!opt.dtype.empty()) return mdi::parse_dtype(opt.dtype);
  const auto stored = reader.read(mdi::tensor_name::kEmbedding).scalar_type();
  const auto dtype = stored == torch::kFloat32 ? mdi::default_dtype(device) : stored;
  spdlog::info("dtype {}: {} (--dtype overrides)", mdi::dtype_name(dtype),
               dtype == stored ? "the weights' own" : "the default on " + device.str());
  return dtype;
}

int run_standalone(const StarterOptions& opt, const torch::Device device) {
  auto reader = mdi::open_checkpoint(opt.ckpt, optional_path(opt.tokenizer));
  auto tokenizer = open_tokenizer(opt, *reader);
  const auto dtype = run_dtype(opt, *reader, device);

  mdi::ModelConfig config = reader->config();
  spdlog::info("standalone: {} ({} layers, dim {}, vocab {}), {} on {}", reader->description(), config.n_layers, config.dim,
               config.vocab_size, mdi::dtype_name(dtype), device.str());
  auto model = mdi::load_chunk(*reader, {{0, config.n_layers}, true, true}, device, dtype);
  if (opt.block_size > 0) config.max_seq_len = std::min(config.max_seq_len, opt.block_size);
  auto samples = make_samples(opt, *tokenizer, config);
  Probing probing(opt, config, samples, dtype);

  TextPrinter printer(*tokenizer, samples.size());
  mdi::RunStats stats;
  const auto early = generate_until_stopped(samples, [&] {
    mdi::generate_standalone(model, samples, printer.callback(), stats, probing.hooks(model), &g_stop_requested);
  });
  if (early) printer.finish_early(samples, *early);
  const auto lens = probing.finish(opt, model, samples, *tokenizer);
  return write_outputs(opt, samples, *tokenizer, stats, nullptr, lens, early);
}

int run_distributed(const StarterOptions& opt, const mdi::NodesConfig& nodes, const nlohmann::json& nodes_json, torch::Device device) {
  const size_t n_nodes = nodes.n_nodes();
  const std::filesystem::path model_dir = opt.ckpt;
  if (!std::filesystem::is_directory(model_dir))
    throw std::invalid_argument("--ckpt " + opt.ckpt + ": a ring run needs a prepare_model directory; run: prepare_model " + opt.ckpt +
                                " --n-nodes " + std::to_string(n_nodes) + " --out DIR, then pass --ckpt DIR");
  mdi::NodeChunk own = mdi::open_node_chunk(model_dir, n_nodes, 0);
  const auto manifest = mdi::ChunkManifest::load(mdi::manifest_path(model_dir, n_nodes));
  if (!opt.chunk.empty()) own = mdi::open_chunk_file(manifest, manifest.starter(), opt.chunk);
  auto tokenizer = open_tokenizer(opt, *own.reader);
  const auto dtype = run_dtype(opt, *own.reader, device);

  mdi::ModelConfig config = manifest.model;
  if (opt.block_size > 0) config.max_seq_len = std::min(config.max_seq_len, opt.block_size);
  auto samples = make_samples(opt, *tokenizer, config);
  spdlog::info("ring of {} nodes; the starter holds layers [{}, {}) + embedding + head, {} on {}", n_nodes, own.entry.layer_begin,
               own.entry.layer_end, mdi::dtype_name(dtype), device.str());
  auto chunk = mdi::load_chunk(*own.reader, own.spec(), device, dtype);
  Probing probing(opt, config, samples, dtype);

  mdi::Cluster cluster(nodes, nodes_json);
  mdi::RunSettings settings;
  settings.dtype = mdi::dtype_name(dtype);
  settings.device = opt.device_given ? opt.device : "";
  settings.max_seq_len = config.max_seq_len;
  settings.upload_chunks = opt.upload_chunks;
  settings.interpretability = probing.plan();
  TextPrinter printer(*tokenizer, samples.size());
  mdi::RunStats stats;
  nlohmann::json extra = {{"n_nodes", n_nodes}};
  const auto early = generate_until_stopped(samples, [&] {
    cluster.init_all(manifest, mdi::manifest_path(model_dir, n_nodes).parent_path(), settings);
    if (g_stop_requested) throw mdi::RunInterrupted();
    try {
      mdi::LinkOptions link_options;
      link_options.max_payload_bytes = mdi::inference_payload_cap(config.dim, config.max_seq_len, mdi::kBatchInvariantRows);
      mdi::RingLinks links = mdi::connect_ring(nodes, 0, settings.run_id, link_options);
      cluster.ring_up();
      spdlog::info("ring up: {} samples in flight", samples.size());

      mdi::StageStats starter_stats;
      mdi::RingGenerationOptions ring_options;
      ring_options.micro_batch = static_cast<size_t>(opt.micro_batch > 0 ? opt.micro_batch : (opt.n_samples + n_nodes - 1) / n_nodes);
      spdlog::info("micro-batches of up to {} samples per frame",
                   std::min({ring_options.micro_batch, samples.size(), static_cast<size_t>(mdi::kBatchInvariantRows)}));
      ring_options.send_timeout = nodes.timeouts.receive;
      ring_options.drain_timeout = nodes.timeouts.receive;
      ring_options.hooks = probing.hooks(chunk);
      ring_options.on_capture = probing.on_capture(chunk);
      ring_options.cancel = &g_stop_requested;
      ring_options.progress_timeout = nodes.timeouts.progress;
      mdi::run_starter_ring(chunk, links, samples, printer.callback(), stats, starter_stats, ring_options);
      nlohmann::json node_stats = cluster.status_all();
      node_stats["starter"] = starter_stats.to_json();
      node_stats["starter"]["bytes_in"] = links.from_prev->stats().bytes_in;
      node_stats["starter"]["bytes_out"] = links.to_next->stats().bytes_out;
      extra["nodes"] = node_stats;
    } catch (const mdi::RunInterrupted&) {
      throw;
    } catch (const std::exception& e) {
      const std::string silent = cluster.silent_nodes();
      if (silent.empty()) throw;
      throw std::runtime_error(silent + " stopped answering, so the run stopped (the starter saw: " + e.what() + ")");
    }
  });
  // After a failure the survivors go back to idle, ready for another run.
  cluster.stop_all(early || opt.keep_nodes);
  if (early) printer.finish_early(samples, *early);
  const auto lens = probing.finish(opt, chunk, samples, *tokenizer);
  return write_outputs(opt, samples, *tokenizer, stats, &extra, lens, early);
}

// Flag combinations that make no sense, refused before anything loads.
void check_hidden_state_flags(const StarterOptions& opt) {
  if (opt.capture.empty()) {
    if (!opt.capture_out.empty()) throw std::invalid_argument("--capture-out needs --capture LAYERS");
    if (opt.logit_lens > 0) throw std::invalid_argument("--logit-lens decodes captured layers: add --capture LAYERS");
  } else if (opt.capture_out.empty() && opt.logit_lens <= 0) {
    throw std::invalid_argument("--capture needs --capture-out FILE.safetensors (or --logit-lens K)");
  }
  if (opt.logit_lens > 0 && opt.out.empty()) throw std::invalid_argument("--logit-lens writes into the --out JSON: add --out FILE");
}

int run_steering_vector(const SteeringOptions& opt) {
  if (opt.layer != "embed" && (opt.layer.empty() || opt.layer.find_first_not_of("0123456789") != std::string::npos || opt.layer.size() > 9))
    throw std::invalid_argument("--layer \"" + opt.layer + "\" is not a layer number or embed");
  const int64_t layer = opt.layer == "embed" ? mdi::kEmbedLayer : std::stoll(opt.layer);
  auto v = mdi::steering_vector(opt.from, opt.to, layer);
  mdi::write_vector(opt.out, opt.name, v, {{"from", opt.from}, {"to", opt.to}, {"layer", mdi::layer_json(layer).dump()},
                                           {"what", "mean(to) - mean(from) over every captured row"}});
  spdlog::info("wrote {}: tensor \"{}\" ({}), mean of {} minus mean of {} at {}, norm {:.4f}", opt.out, opt.name, v.size(0), opt.to,
               opt.from, mdi::layer_label(layer), v.norm().item<double>());
  return 0;
}

// Outputs are written over whatever is there: never over one of the run's inputs
// (`--out config.json` would destroy the nodes-config after the run).
void check_outputs_spare_inputs(const StarterOptions& opt) {
  const std::string prompt_file = opt.prompt.rfind("FILE:", 0) == 0 ? opt.prompt.substr(5) : "";
  const std::pair<const char*, const std::string*> inputs[] = {{"--nodes-config", &opt.nodes_config}, {"--tokenizer", &opt.tokenizer},
                                                               {"--prompt FILE:", &prompt_file}, {"--interventions", &opt.interventions},
                                                               {"--ckpt", &opt.ckpt}};
  for (const auto& [flag, path] : {std::pair<const char*, const std::string*>{"--out", &opt.out}, {"--capture-out", &opt.capture_out}}) {
    std::error_code error;
    if (path->empty() || !std::filesystem::exists(*path, error)) continue;
    for (const auto& [input_flag, input] : inputs)
      if (!input->empty() && std::filesystem::equivalent(*path, *input, error))
        throw std::invalid_argument(std::string(flag) + " " + *path + " is the " + input_flag + " file: the run would overwrite it; write to another path");
  }
}

int run(const StarterOptions& opt) {
  check_hidden_state_flags(opt);
  check_outputs_spare_inputs(opt);
  mdi::init_torch_runtime(opt.threads);
  if (opt.nodes_config.empty()) return run_standalone(opt, mdi::parse_device(opt.device));
  nlohmann::json nodes_json;
  const mdi::NodesConfig nodes = mdi::load_nodes_config(opt.nodes_config, &nodes_json);
  // --device on the command line wins over the node's configured device.
  const std::string device = opt.device_given || nodes.starter.device.empty() ? opt.device : nodes.starter.device;
  if (nodes.secondaries.empty()) return run_standalone(opt, mdi::parse_device(device));
  return run_distributed(opt, nodes, nodes_json, mdi::parse_device(device));
}

}  // namespace

int main(int argc, char** argv) {
  StarterOptions opt;
  CLI::App app{
      "starter: runs a Llama model split across nodes (MDI-LLM style). Holds the embedding, the first layers, the final\n"
      "norm and the LM head; pushes config and chunks to the secondaries, then drives the activation ring with\n"
      "--n-samples samples in flight. Without --nodes-config it generates alone, in one process."};
  // The last of a repeated option wins, so scripts can append overrides to a default command line.
  app.option_defaults()->always_capture_default()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--ckpt", opt.ckpt,
                 "Model: prepare_model output directory (needed for a ring), or for standalone runs also a llama2.c .bin or a\n"
                 "Hugging Face directory (required unless a subcommand runs)");
  app.add_option("--tokenizer", opt.tokenizer, "Tokenizer file (tokenizer.bin / tokenizer.model / tokenizer.json); default: the model's own");
  app.add_option("--nodes-config", opt.nodes_config, "MDI-LLM nodes-config JSON; absent or \"secondary\": [] runs standalone");
  app.add_option("--prompt", opt.prompt, "Prompt text, or FILE:path with one prompt per paragraph (samples cycle over them)");
  app.add_option("--n-samples", opt.n_samples, "Samples generated concurrently")->check(CLI::PositiveNumber);
  app.add_option("--micro-batch", opt.micro_batch,
                 "Ring: samples that travel together in one frame, every node computing them in one pass (weights read\n"
                 "once). 0: n-samples / nodes, rounded up, so each node has a batch to work on. Standalone runs batch every\n"
                 "running sample. Batches stop at 32 rows, so a sample's numbers never depend on its batch")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--n-tokens", opt.n_tokens, "New tokens per sample (a stop token ends a sample earlier)")->check(CLI::NonNegativeNumber);
  app.add_option("--block-size,--sequence-length,--context-length", opt.block_size,
                 "Context length cap (default: the model's)")->check(CLI::NonNegativeNumber);
  auto* device = app.add_option("--device", opt.device, "cpu, cuda or cuda:N; overrides the devices of the nodes-config");
  app.add_option("--dtype", opt.dtype, "float32, bfloat16 or float16 (default: the weights' own where they are 16-bit, else float32 on CPU,\n"
                 "bfloat16 on CUDA)");
  app.add_option("--seed", opt.seed, "Random seed; each sample draws from its own stream");
  app.add_option("--temperature", opt.temperature, "Sampling temperature; 0 is greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", opt.top_k, "Keep the k most likely tokens (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", opt.top_p, "Nucleus sampling mass in (0, 1] (1: off)")
      ->check(CLI::Validator([](std::string& text) {
                char* end = nullptr;
                const double mass = std::strtod(text.c_str(), &end);
                const bool number = end != text.c_str() && *end == '\0';
                return number && mass > 0 && mass <= 1 ? "" : "must be a number in (0, 1] (0 would keep no token)";
              }, "(0, 1]"));
  app.add_option("--out", opt.out, "Write samples and stats as JSON to this file");
  auto* time_run = app.add_option("--time-run", opt.time_run, "Write time vs generated tokens as CSV to this file");
  app.add_flag("-p,--plots", opt.plots, "With --time-run: also write an SVG plot beside the CSV")->needs(time_run);
  app.add_option("--threads", opt.threads, "CPU threads for LibTorch (0: all cores)")->check(CLI::NonNegativeNumber);
  app.add_option("--chunk", opt.chunk, "The starter's chunk file (default: from the --ckpt directory's manifest)");
  app.add_flag("--keep-nodes", opt.keep_nodes, "Leave the secondaries running and idle after the run, for another starter");
  app.add_flag("--upload-chunks", opt.upload_chunks, "Upload every secondary's chunk over HTTP, even where it may be on the node's disk");
  app.add_option("--capture", opt.capture,
                 "Capture the hidden states after these layers: all, or a list like embed,0,3-4 (global numbering; embed is the\n"
                 "embedding output)");
  app.add_option("--capture-positions", opt.capture_positions,
                 "all: every position; last: the last position of each forward pass (the rows the next tokens are sampled from)")
      ->check(CLI::IsMember({"all", "last"}));
  app.add_option("--capture-out", opt.capture_out, "Write the captured hidden states to this safetensors file");
  app.add_option("--interventions", opt.interventions,
                 "JSON file of interventions (add/replace/zero/scale at a layer, for chosen samples and positions); see README");
  app.add_option("--logit-lens", opt.logit_lens,
                 "Decode every captured layer's last position through the final norm and head; write the top K tokens into\n"
                 "--out under \"logit_lens\"")->check(CLI::NonNegativeNumber);
  app.add_flag("-v,--verbose", opt.verbosity, "More log detail (-v debug, -vv trace)");

  SteeringOptions steer;
  auto* steer_cmd = app.add_subcommand("steering-vector",
                                       "Write mean(TO) - mean(FROM) of two --capture-out files at one layer: a steering vector for\n"
                                       "--interventions (op add)");
  steer_cmd->add_option("--from", steer.from, "Capture file of the activations to steer away from")->required()->check(CLI::ExistingFile);
  steer_cmd->add_option("--to", steer.to, "Capture file of the activations to steer toward")->required()->check(CLI::ExistingFile);
  steer_cmd->add_option("--layer", steer.layer, "Layer number, or embed")->required();
  steer_cmd->add_option("--out", steer.out, "Output safetensors file")->required();
  steer_cmd->add_option("--name", steer.name, "Tensor name in the output");
  TrainCommands train_commands(app);
  CLI11_PARSE(app, argc, argv);
  opt.device_given = device->count() > 0;

  mdi::setup_logging(opt.verbosity, "starter");
  install_stop_signals();
  try {
    if (steer_cmd->parsed()) return run_steering_vector(steer);
    if (auto code = train_commands.run()) return *code;
    if (opt.ckpt.empty()) return app.exit(CLI::RequiredError("--ckpt"));
    return run(opt);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
