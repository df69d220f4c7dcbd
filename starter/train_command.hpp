#pragma once
// starter train: fine-tunes a model over the ring (or in one process without
// --nodes-config), and starter gather: turns a training checkpoint into a model
// directory. See common/train/pipeline.hpp for the protocol.
#include <CLI/CLI.hpp>

#include <optional>
#include <string>

struct TrainOptions {
  std::string ckpt, tokenizer, nodes_config, data, out, resume, log;
  std::string schedule = "gpipe";
  std::string train_layers = "all";
  int64_t steps = 100, batch_size = 8, micro_batches = 4, seq_len = 128, warmup = 0, save_every = 0, eval_every = 0;
  double lr = 3e-4, weight_decay = 0.0, clip = 1.0, val_fraction = 0.1;
  uint64_t seed = 1337;
  int threads = 0;
  bool keep_nodes = false, upload_chunks = false, stages_to_starter = false;
};

struct GatherOptions {
  std::string checkpoint, out;
};

// Registers both subcommands on `app`; run() runs whichever was given.
class TrainCommands {
 public:
  explicit TrainCommands(CLI::App& app);
  // The exit code when `train` or `gather` was on the command line, else nullopt.
  std::optional<int> run() const;

 private:
  TrainOptions train_;
  GatherOptions gather_;
  CLI::App* train_cmd_;
  CLI::App* gather_cmd_;
};
