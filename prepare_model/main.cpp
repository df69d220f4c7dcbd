// prepare_model: converts a Llama checkpoint (llama2.c .bin, Hugging Face
// directory, or random weights of a real shape) into the canonical model
// directory, and splits it into per-node chunks for any node count.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/runtime/logging.hpp"
#include "common/runtime/torch_runtime.hpp"
#include "common/store/model_store.hpp"

namespace fs = std::filesystem;

namespace {

struct PrepareOptions {
  std::string model;
  size_t n_nodes = 1;
  std::string out;
  std::string dtype;  // empty: float32 for a conversion, the stored dtype when splitting in place
  std::vector<int64_t> layers;
  std::vector<double> node_weights;
  std::string tokenizer;
  uint64_t seed = 0;
  int verbosity = 0;
};

// A progress bar on stderr: redrawn in place on a terminal, a log line every 10%
// otherwise (for work big enough to take a while).
class ProgressBar {
 public:
  static constexpr uint64_t kLoggedBytes = 256ull << 20;
  explicit ProgressBar(std::string label) : label_(std::move(label)), tty_(::isatty(2)), start_(std::chrono::steady_clock::now()) {}
  void operator()(uint64_t done, uint64_t total) {
    const double fraction = total ? double(done) / double(total) : 1.0;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double mib_s = seconds > 0 ? double(done) / (1 << 20) / seconds : 0;
    if (tty_) {
      const int width = 30, filled = int(fraction * width);
      std::fprintf(stderr, "\r%s [%s%s] %5.1f%% %8.1f / %.1f MiB  %.0f MiB/s", label_.c_str(), std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), 100 * fraction, double(done) / (1 << 20), double(total) / (1 << 20), mib_s);
      if (done >= total) std::fputc('\n', stderr);
    } else if (total >= kLoggedBytes && (int(fraction * 10) > last_decile_ || done >= total)) {
      last_decile_ = int(fraction * 10);
      spdlog::info("{}: {:.0f}% ({:.1f} of {:.1f} MiB, {:.0f} MiB/s)", label_, 100 * fraction, double(done) / (1 << 20),
                   double(total) / (1 << 20), mib_s);
    }
  }

 private:
  std::string label_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
  int last_decile_ = 0;
};

// What identifies the input, so that a later run over the same input reuses the conversion.
std::string source_id(const PrepareOptions& opt) {
  if (opt.model.rfind("random:", 0) == 0) return opt.model + " seed " + std::to_string(opt.seed);
  std::ostringstream id;
  id << fs::absolute(opt.model).string();
  if (fs::is_regular_file(opt.model))
    id << " bytes " << fs::file_size(opt.model) << " mtime " << fs::last_write_time(opt.model).time_since_epoch().count();
  return id.str();
}

// A model directory is split in place; anything else is converted into models/<name>.
std::string default_out(const std::string& model) {
  if (fs::is_directory(model)) return model;
  if (model.rfind("random:", 0) == 0) {
    // A preset's name is kept whole (tinyllama-1.1b); a config file gives its stem.
    const fs::path spec = model.substr(7);
    return "models/random-" + (spec.extension() == ".json" ? spec.stem() : spec.filename()).string();
  }
  return "models/" + fs::path(model).filename().replace_extension().string();
}

int run(const PrepareOptions& opt) {
  mdi::init_torch_runtime(0);
  const fs::path model_dir = opt.out.empty() ? default_out(opt.model) : opt.out;
  const bool in_place = fs::is_directory(opt.model) && fs::exists(model_dir) && fs::equivalent(opt.model, model_dir);
  auto reader = mdi::open_checkpoint(opt.model, opt.tokenizer.empty() ? std::nullopt : std::optional<fs::path>(opt.tokenizer), opt.seed);
  const auto& config = reader->config();
  spdlog::info("{}: {} layers, dim {}, {} heads ({} kv), vocab {}, {:.1f} M parameters, into {}", reader->description(),
               config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.vocab_size,
               double(config.parameter_count()) / 1e6, model_dir.string());

  // Check the split and the tokenizer before the (possibly long) conversion.
  std::vector<int64_t> counts = opt.layers;
  if (counts.empty())
    counts = mdi::balanced_layer_counts(config, opt.n_nodes, opt.node_weights);
  else
    mdi::check_layer_counts(config, opt.n_nodes, counts);
  if (const auto tokenizer = reader->tokenizer()) {
    const int vocab = mdi::load_tokenizer_for(*tokenizer, config)->vocab_size();
    spdlog::info("tokenizer {} ({}, {} tokens)", tokenizer->string(), opt.tokenizer.empty() ? "the model's own" : "--tokenizer", vocab);
  }

  const auto stored = reader->read(mdi::tensor_name::kEmbedding).scalar_type();
  const auto dtype = !opt.dtype.empty() ? mdi::parse_dtype(opt.dtype) : in_place ? stored : torch::kFloat32;
  if (in_place) {
    if (stored != dtype)
      throw std::invalid_argument(opt.model + " holds " + mdi::dtype_name(stored) + " weights; to split it as " + mdi::dtype_name(dtype) +
                                  ", convert it into another directory with --out");
    if (!opt.tokenizer.empty()) mdi::install_tokenizer(model_dir, opt.tokenizer);
  } else {
    ProgressBar bar("converting");
    mdi::write_model_directory(*reader, model_dir, dtype, source_id(opt), std::ref(bar));
  }
  reader.reset();
  ProgressBar bar("splitting");
  auto manifest = mdi::write_chunks(model_dir, counts, std::ref(bar));
  std::cout << "model directory: " << model_dir.string() << "\n"
            << "chunks for " << opt.n_nodes << " node(s): " << mdi::manifest_path(model_dir, opt.n_nodes).parent_path().string() << "\n"
            << mdi::partition_table(manifest);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  PrepareOptions opt;
  CLI::App app{
      "prepare_model: converts a Llama model into the canonical model directory (config.json, model.safetensors,\n"
      "tokenizer) and splits it into per-node chunks under chunks/<N>nodes/, with a manifest the nodes read.\n"
      "MODEL is a llama2.c .bin, a Hugging Face directory (single or sharded safetensors), random:PRESET or\n"
      "random:path/config.json. Presets: stories260K, stories15M, nanollama-304m, tinyllama-1.1b, llama-2-7b,\n"
      "llama-3-8b, llama-3.1-70b."};
  app.option_defaults()->always_capture_default();
  app.add_option("MODEL", opt.model, "Input model")->required();
  app.add_option("--n-nodes", opt.n_nodes, "Nodes to split over (starter + secondaries)")->required()->check(CLI::PositiveNumber);
  app.add_option("--out", opt.out, "Output model directory (default: models/<name>)");
  app.add_option("--dtype", opt.dtype, "float32, bfloat16 or float16 (default: float32; in place: as stored)")->check(CLI::IsMember({"float32", "bfloat16", "float16", "fp32", "bf16", "fp16"}));
  app.add_option("--layers", opt.layers, "Explicit layer counts per node, starter first (e.g. 2,3,3)")->delimiter(',');
  app.add_option("--node-weights", opt.node_weights, "Relative node speeds, starter first (e.g. 1,2,2)")->delimiter(',');
  app.add_option("--tokenizer", opt.tokenizer, "Tokenizer to ship with the model, replacing the one it comes with (default: the model's own; random\n"
                 "weights: a synthetic byte-level one)");
  app.add_option("--seed", opt.seed, "Seed for random:* weights");
  app.add_flag("-v,--verbose", opt.verbosity, "More log detail");
  CLI11_PARSE(app, argc, argv);
  mdi::setup_logging(opt.verbosity, "prepare_model");
  try {
    return run(opt);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
