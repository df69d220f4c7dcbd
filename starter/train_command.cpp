#include "starter/train_command.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/net/http/control_plane.hpp"
#include "common/net/ring_setup.hpp"
#include "common/runtime/sample_progress.hpp"
#include "common/runtime/starter_cluster.hpp"
#include "common/runtime/torch_runtime.hpp"
#include "common/store/atomic_file.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/store/sha256.hpp"
#include "common/train/checkpoint.hpp"
#include "common/train/data.hpp"
#include "common/train/loss_plot.hpp"
#include "common/train/pipeline.hpp"
#include "common/wire/nodes_config.hpp"

namespace {
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

std::string duration_text(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  if (s < 60) return std::to_string(s) + "s";
  if (s < 3600) return std::to_string(s / 60) + "m" + std::to_string(s % 60) + "s";
  return std::to_string(s / 3600) + "h" + std::to_string(s % 3600 / 60) + "m";
}

std::optional<mdi::NodesConfig> read_nodes_config(const std::string& path, nlohmann::json& json) {
  if (path.empty()) return std::nullopt;
  auto nodes = mdi::load_nodes_config(path, &json);
  if (nodes.secondaries.empty()) return std::nullopt;
  return nodes;
}

// The per-step CSV: the step's figures and every node's forward, backward and idle time.
class TrainingLog {
 public:
  TrainingLog(const std::string& path, size_t n_nodes) : plot_(fs::path(path).replace_extension(".png")) {
    if (path.empty()) return;
    out_.open(path);
    if (!out_) throw std::invalid_argument("--log " + path + ": cannot write");
    out_ << "step,loss,val_loss,lr,grad_norm,tokens_per_s";
    for (size_t i = 0; i < n_nodes; ++i) {
      const std::string node = i == 0 ? "starter" : "secondary" + std::to_string(i - 1);
      out_ << "," << node << "_forward_s," << node << "_backward_s," << node << "_idle_s," << node << "_peak_held," << node << "_peak_rss_mib";
    }
    out_ << std::endl;
  }
  bool enabled() const { return out_.is_open(); }
  // One line per step, flushed: the file is readable while the run goes on.
  void add(int64_t step, const mdi::StepFigures& f, std::optional<double> val_loss, double lr, double tokens_per_s,
           const std::vector<mdi::StageStepFigures>& nodes) {
    if (!enabled()) return;
    train_[step] = f.loss;
    if (val_loss) validation_[step] = *val_loss;
    out_ << fmt::format("{},{:.8f},{},{:.6g},{:.6f},{:.1f}", step, f.loss, val_loss ? fmt::format("{:.8f}", *val_loss) : "", lr,
                        f.grad_norm, tokens_per_s);
    for (const auto& n : nodes)
      out_ << fmt::format(",{:.4f},{:.4f},{:.4f},{},{:.1f}", n.forward_s, n.backward_s, n.idle_s, n.peak_held, double(n.peak_rss_bytes) / (1 << 20));
    out_ << std::endl;
  }
  // FILE.png beside FILE.csv: the loss curve so far.
  void plot() const {
    if (!enabled()) return;
    mdi::write_file_atomic(plot_.string(), mdi::loss_curve_png(train_, validation_));
    spdlog::info("wrote {}", plot_.string());
  }

 private:
  fs::path plot_;
  std::ofstream out_;
  std::map<int64_t, double> train_, validation_;
};

// One run's training, standalone or over the ring.
class TrainingRun {
 public:
  explicit TrainingRun(const TrainOptions& opt) : opt_(opt) {}

  int run() {
    mdi::parse_schedule(opt_.schedule);
    if (opt_.batch_size % opt_.micro_batches != 0)
      throw std::invalid_argument("--batch-size " + std::to_string(opt_.batch_size) + " does not split into --micro-batches " +
                                  std::to_string(opt_.micro_batches) + " equal parts");
    mdi::init_torch_runtime(opt_.threads);
    nodes_ = read_nodes_config(opt_.nodes_config, nodes_json_);
    const size_t n_nodes = nodes_ ? nodes_->n_nodes() : 1;
    if (nodes_) {
      if (!fs::is_directory(opt_.ckpt))
        throw std::invalid_argument("--ckpt " + opt_.ckpt + ": distributed training needs a prepare_model directory; run: prepare_model " +
                                    opt_.ckpt + " --n-nodes " + std::to_string(n_nodes) + " --out DIR, then pass --ckpt DIR");
      split_ = mdi::ChunkManifest::load(mdi::manifest_path(opt_.ckpt, n_nodes));
      reader_ = mdi::open_node_chunk(opt_.ckpt, n_nodes, 0).reader;
    } else {
      reader_ = mdi::open_checkpoint(opt_.ckpt, opt_.tokenizer.empty() ? std::nullopt : std::optional<fs::path>(opt_.tokenizer));
      split_.model = reader_->config();
      split_.dtype = "float32";
      split_.nodes.push_back({"starter", 0, "", 0, reader_->config().n_layers, true, true, 0, ""});
    }
    const mdi::ModelConfig& config = split_.model;
    auto tokenizer_path = opt_.tokenizer.empty() ? reader_->tokenizer() : std::optional<fs::path>(opt_.tokenizer);
    if (!tokenizer_path) throw std::invalid_argument("--ckpt " + opt_.ckpt + " holds no tokenizer; pass --tokenizer PATH");
    auto tokenizer = mdi::load_tokenizer(*tokenizer_path);
    if (opt_.seq_len > config.max_seq_len)
      throw std::invalid_argument("--seq-len " + std::to_string(opt_.seq_len) + " exceeds the model's context length " +
                                  std::to_string(config.max_seq_len));
    const auto data = mdi::TrainingData::load(opt_.data, *tokenizer, opt_.seq_len, opt_.val_fraction, opt_.seed);
    spdlog::info("{}: {} tokens, {} training and {} validation sequences of {}", opt_.data, data.n_tokens(), data.n_train(),
                 data.n_validation(), opt_.seq_len);

    plan_.schedule = mdi::parse_schedule(opt_.schedule);
    plan_.micro_batches = opt_.micro_batches;
    plan_.seq_len = opt_.seq_len;
    plan_.micro_batch_sequences = opt_.batch_size / opt_.micro_batches;
    plan_.trainable = mdi::parse_trainable_set(opt_.train_layers, config.n_layers);
    plan_.optimizer.lr = opt_.lr;  // betas and eps: OptimizerSettings' defaults
    plan_.optimizer.warmup = opt_.warmup;
    plan_.optimizer.weight_decay = opt_.weight_decay;
    plan_.optimizer.clip = opt_.clip;
    plan_.steps = opt_.steps;
    plan_.save_every = opt_.save_every;
    plan_.checkpoint_dir = opt_.out.empty() ? "" : fs::absolute(opt_.out).string();
    std::optional<mdi::TrainingCheckpoint> resume;
    if (!opt_.resume.empty()) resume = checked_resume(n_nodes);

    // the starter holds its first layers, the embedding and the head (alone: every layer)
    auto chunk = mdi::load_chunk(*reader_, {{split_.starter().layer_begin, split_.starter().layer_end}, true, true}, torch::kCPU,
                                 torch::kFloat32);
    if (!opt_.out.empty()) {
      fs::create_directories(opt_.out);
      const fs::path tok_target = fs::path(opt_.out) / tokenizer_path->filename();
      if (!fs::exists(tok_target)) fs::copy_file(*tokenizer_path, tok_target);
    }
    spdlog::info("training {} on {} node(s): {}, batch {} in {} micro-batches of {} tokens, steps {}..{}, lr {} (warm-up {}), layers {}",
                 reader_->description(), n_nodes, opt_.schedule, opt_.batch_size, opt_.micro_batches, opt_.seq_len, plan_.first_step,
                 plan_.steps, opt_.lr, opt_.warmup, plan_.trainable.to_string());
    if (!nodes_) return train_standalone(chunk, data, resume);
    return train_distributed(chunk, data, resume);
  }

 private:
  // The checkpoint to resume from, checked against this run's model and split.
  mdi::TrainingCheckpoint checked_resume(size_t n_nodes) {
    auto c = mdi::find_training_checkpoint(opt_.resume);
    const std::string where = "--resume " + opt_.resume + ": " + c.dir.string();
    if (!(c.stages.model == split_.model))
      throw std::invalid_argument(where + " is a checkpoint of another model (dim " + std::to_string(c.stages.model.dim) + ", " +
                                  std::to_string(c.stages.model.n_layers) + " layers, vocab " + std::to_string(c.stages.model.vocab_size) +
                                  "); --ckpt " + opt_.ckpt + " has dim " + std::to_string(split_.model.dim) + ", " +
                                  std::to_string(split_.model.n_layers) + " layers, vocab " + std::to_string(split_.model.vocab_size));
    if (c.stages.nodes.size() != n_nodes)
      throw std::invalid_argument(where + " was trained on " + std::to_string(c.stages.nodes.size()) + " nodes; this run has " +
                                  std::to_string(n_nodes) + " (gather it and split the result instead)");
    for (size_t i = 0; i < n_nodes; ++i)
      if (c.stages.nodes[i].layer_begin != split_.nodes[i].layer_begin || c.stages.nodes[i].layer_end != split_.nodes[i].layer_end)
        throw std::invalid_argument(where + ": node " + std::to_string(i) + " held other layers than in this run's split");
    if (c.step >= opt_.steps)
      throw std::invalid_argument(where + " is at step " + std::to_string(c.step) + "; --steps " + std::to_string(opt_.steps) + " is no further");
    plan_.first_step = c.step + 1;
    spdlog::info("resuming from {} (step {})", c.dir.string(), c.step);
    return c;
  }

  void load_own_stage(mdi::StageOptimizer& optimizer, const std::optional<mdi::TrainingCheckpoint>& resume) {
    if (!resume) return;
    const mdi::ChunkEntry& entry = resume->stages.starter();
    const fs::path file = resume->dir / entry.file;
    const std::string digest = mdi::sha256_file(file);
    if (digest != entry.sha256)
      throw mdi::CheckpointError(file.string() + " has sha256 " + digest + ", the manifest says " + entry.sha256 + ": the checkpoint is damaged");
    optimizer.load(file);
  }

  // The starter's stage and (over the ring) the secondaries' reports into <out>/step-k, manifest last.
  void save_checkpoint(int64_t step, const mdi::StageOptimizer& optimizer, const mdi::Cluster* cluster) {
    mdi::TrainingCheckpoint c;
    c.dir = mdi::checkpoint_step_dir(plan_.checkpoint_dir, step);
    c.step = step;
    c.stages = split_;
    c.run = {{"schedule", opt_.schedule}, {"batch_size", opt_.batch_size}, {"micro_batches", opt_.micro_batches}, {"seq_len", opt_.seq_len},
             {"seed", opt_.seed}, {"lr", opt_.lr}, {"warmup", opt_.warmup}, {"steps", opt_.steps}, {"train_layers", opt_.train_layers},
             {"base_model", reader_->description()}, {"data", opt_.data}};
    auto& starter = c.stages.nodes[0];
    starter.file = "starter.safetensors";
    starter.sha256 = optimizer.save(c.dir / starter.file, step);
    starter.bytes = fs::file_size(c.dir / starter.file);
    if (cluster) {
      const auto status = cluster->status_all();
      for (size_t i = 1; i < c.stages.nodes.size(); ++i) {
        const auto& node = status["secondary" + std::to_string(i - 1)];
        const auto saved = node.value("training", nlohmann::json::object()).value("checkpoint", nlohmann::json::object());
        if (saved.value("step", int64_t{-1}) != step)
          throw mdi::CheckpointError(cluster->describe(i - 1) + " reports no checkpoint of step " + std::to_string(step) + ": " + node.dump());
        auto& entry = c.stages.nodes[i];
        entry.file = fs::path(saved["file"].get<std::string>()).filename().string();
        entry.sha256 = saved["sha256"];
        entry.bytes = saved["bytes"];
        if (opt_.stages_to_starter && received_stage(step, i - 1) != entry.sha256)
          throw mdi::CheckpointError(cluster->describe(i - 1) + " reports its stage of step " + std::to_string(step) +
                                     " sent, but the starter holds no such file");
      }
    }
    mdi::write_training_manifest(c);
    spdlog::info("step {}: checkpoint {}", step, c.dir.string());
  }

  void report(int64_t step, const mdi::StepFigures& f, double lr, double step_s, std::optional<double> val_loss,
              const std::vector<mdi::StageStepFigures>& nodes) {
    const double tokens = static_cast<double>(opt_.batch_size * opt_.seq_len);
    elapsed_s_ += step_s;
    const double done = static_cast<double>(step - plan_.first_step + 1);
    const double eta = elapsed_s_ / done * static_cast<double>(plan_.steps - step);
    spdlog::info("step {}/{}: loss {:.4f}{}, lr {:.3g}, grad norm {:.3f}, {:.0f} tokens/s, ETA {}", step, plan_.steps, f.loss,
                 val_loss ? fmt::format(" (validation {:.4f})", *val_loss) : "", lr, f.grad_norm, tokens / step_s, duration_text(eta));
    log_->add(step, f, val_loss, lr, tokens / step_s, nodes);
  }

  int train_standalone(mdi::ModelChunk& model, const mdi::TrainingData& data, const std::optional<mdi::TrainingCheckpoint>& resume) {
    mdi::LocalTrainer trainer(model, plan_);
    run_steps(trainer, data, resume, nullptr);
    return 0;
  }

  // Steps first_step..steps of `trainer` (LocalTrainer or StarterPipeline), with their
  // validation losses, progress lines, CSV rows and checkpoints.
  template <class Trainer>
  void run_steps(Trainer& trainer, const mdi::TrainingData& data, const std::optional<mdi::TrainingCheckpoint>& resume,
                 const mdi::Cluster* cluster) {
    load_own_stage(trainer.optimizer(), resume);
    const size_t n_nodes = split_.nodes.size();
    log_.emplace(opt_.log, n_nodes);
    for (int64_t step = plan_.first_step; step <= plan_.steps; ++step) {
      const auto start = clock_type::now();
      const double lr = mdi::learning_rate(plan_.optimizer, step);
      auto figures = trainer.step(step, mdi::split_batch(data.batch(step, opt_.batch_size), opt_.micro_batches), lr);
      const double step_s = std::chrono::duration<double>(clock_type::now() - start).count();
      std::optional<double> val_loss;
      if (evaluates_after(step, data)) val_loss = trainer.evaluate(step, validation_batches(data));
      std::vector<mdi::StageStepFigures> per_node{figures.starter};
      if (cluster && log_->enabled()) {
        const auto status = cluster->status_all();
        for (size_t i = 0; i + 1 < n_nodes; ++i) {
          const auto f = status["secondary" + std::to_string(i)].value("training", nlohmann::json::object()).value("figures", nlohmann::json::object());
          per_node.push_back({f.value("forward_s", 0.0), f.value("backward_s", 0.0), f.value("idle_s", 0.0), f.value("peak_held", int64_t{0}),
                              f.value("peak_rss_bytes", int64_t{0})});
        }
      }
      report(step, figures, lr, step_s, val_loss, per_node);
      if (plan_.saves_after(step)) save_checkpoint(step, trainer.optimizer(), cluster);
    }
    log_->plot();
  }

  // The validation loss comes with every checkpoint and the last step (--eval-every: more often).
  bool evaluates_after(int64_t step, const mdi::TrainingData& data) const {
    return data.n_validation() > 0 && (plan_.saves_after(step) || step == plan_.steps || (opt_.eval_every > 0 && step % opt_.eval_every == 0));
  }

  // The validation sequences in micro-batches of a training micro-batch's size (the last may be smaller).
  std::vector<mdi::MicroBatch> validation_batches(const mdi::TrainingData& data) const {
    const auto sequences = data.validation();
    const size_t per = static_cast<size_t>(opt_.batch_size / opt_.micro_batches);
    std::vector<mdi::MicroBatch> batches;
    for (size_t i = 0; i < sequences.size(); i += per) {
      const std::vector<std::vector<int32_t>> part(sequences.begin() + static_cast<std::ptrdiff_t>(i),
                                                   sequences.begin() + static_cast<std::ptrdiff_t>(std::min(sequences.size(), i + per)));
      batches.push_back(mdi::split_batch(part, 1)[0]);
    }
    return batches;
  }

  int train_distributed(mdi::ModelChunk& chunk, const mdi::TrainingData& data, const std::optional<mdi::TrainingCheckpoint>& resume) {
    const mdi::NodesConfig& nodes = *nodes_;
    const size_t n_nodes = nodes.n_nodes();
    mdi::Cluster cluster(nodes, nodes_json_);
    mdi::RunSettings settings;
    settings.dtype = "float32";
    settings.device = "cpu";
    settings.max_seq_len = split_.model.max_seq_len;
    settings.upload_chunks = opt_.upload_chunks;
    if (opt_.stages_to_starter && opt_.out.empty()) throw std::invalid_argument("--stages-to-starter needs --out DIR: where the stages go");
    const auto receiver = opt_.stages_to_starter ? stage_receiver(nodes) : nullptr;
    for (size_t i = 1; i < n_nodes; ++i) {
      mdi::TrainingPlan plan = plan_;
      plan.upload_stages = opt_.stages_to_starter;
      if (resume) {
        const auto& entry = resume->stages.secondary(static_cast<int64_t>(i - 1));
        plan.resume_file = fs::absolute(resume->dir / entry.file).string();
        plan.resume_sha256 = entry.sha256;
      }
      settings.training.push_back(plan);
    }
    try {
      cluster.init_all(split_, mdi::manifest_path(opt_.ckpt, n_nodes).parent_path(), settings);
      mdi::LinkOptions link_options;
      link_options.max_payload_bytes =
          mdi::training_payload_cap(static_cast<uint64_t>(chunk.config().dim), static_cast<uint64_t>(plan_.micro_batch_sequences * plan_.seq_len));
      mdi::RingLinks links = mdi::connect_ring(nodes, 0, settings.run_id, link_options);
      cluster.ring_up();
      mdi::StarterPipeline pipeline(chunk, links, plan_, n_nodes, nodes.timeouts.receive);
      run_steps(pipeline, data, resume, &cluster);
      pipeline.finish(nodes.timeouts.receive);
      cluster.stop_all(opt_.keep_nodes);
      return 0;
    } catch (const std::exception& e) {
      const std::string lost = cluster.silent_nodes();
      // the survivors go back to idle; a step that was being saved is no checkpoint
      cluster.stop_all(true);
      if (!opt_.out.empty()) mdi::remove_unfinished_steps(opt_.out);
      if (lost.empty()) throw;
      throw std::runtime_error(lost + " stopped answering; training stopped: " + e.what());
    }
  }

  // --stages-to-starter: the starter's control plane takes each secondary's stage file
  // (POST /stage?step=K&node=secondaryI&sha256=HEX) into <out>/step-K/secondaryI.safetensors.
  std::unique_ptr<mdi::ControlServer> stage_receiver(const mdi::NodesConfig& nodes) {
    mdi::ControlServerOptions options;
    options.bind_addr = nodes.starter.bind_addr.empty() ? nodes.starter.addr : nodes.starter.bind_addr;
    options.port = nodes.starter.control_port;
    options.auth_token = nodes.auth_token;
    options.upload_dir = fs::path(plan_.checkpoint_dir) / ".incoming";
    fs::create_directories(options.upload_dir);
    auto server = std::make_unique<mdi::ControlServer>(options);
    server->upload_route("POST", "/stage", [this, n_secondaries = nodes.secondaries.size()](const mdi::HttpRequest& head, const fs::path& file,
                                                                                           const std::string& sha256) -> mdi::HttpResponse {
      const auto step = mdi::query_param(head, "step"), node = mdi::query_param(head, "node"), expected = mdi::query_param(head, "sha256");
      if (!step || !node || !expected || step->empty() || step->size() > 15 || step->find_first_not_of("0123456789") != std::string::npos)
        return {400, {{"error", "POST /stage needs ?step=K&node=secondaryI&sha256=HEX"}}};
      size_t index = n_secondaries;
      for (size_t i = 0; i < n_secondaries; ++i)
        if (*node == "secondary" + std::to_string(i)) index = i;
      if (index == n_secondaries) return {400, {{"error", "node \"" + *node + "\" is no secondary of this run"}}};
      if (*expected != sha256) return {400, {{"error", "the stage has sha256 " + sha256 + ", the request announced " + *expected}}};
      const fs::path target = mdi::checkpoint_step_dir(plan_.checkpoint_dir, std::stoll(*step)) / (*node + ".safetensors");
      fs::create_directories(target.parent_path());
      fs::rename(file, target);
      std::lock_guard lock(received_mutex_);
      received_[{std::stoll(*step), index}] = sha256;
      spdlog::debug("received {}", target.string());
      return {200, {{"stored", target.string()}}};
    });
    server->start();
    return server;
  }

  std::string received_stage(int64_t step, size_t secondary) {
    std::lock_guard lock(received_mutex_);
    auto it = received_.find({step, secondary});
    return it == received_.end() ? "" : it->second;
  }

  const TrainOptions& opt_;
  std::optional<mdi::NodesConfig> nodes_;
  nlohmann::json nodes_json_;
  std::unique_ptr<mdi::CheckpointReader> reader_;
  mdi::ChunkManifest split_;
  mdi::TrainingPlan plan_;
  std::optional<TrainingLog> log_;
  double elapsed_s_ = 0;
  std::mutex received_mutex_;
  std::map<std::pair<int64_t, size_t>, std::string> received_;  // (step, secondary) → sha256 of the stage it sent
};

int run_gather(const GatherOptions& opt) {
  auto checkpoint = mdi::find_training_checkpoint(opt.checkpoint);
  auto manifest = mdi::gather_training_checkpoint(checkpoint, opt.out);
  spdlog::info("wrote {} from {} (step {}), split for {} node(s)", opt.out, checkpoint.dir.string(), checkpoint.step, manifest.nodes.size());
  return 0;
}
}  // namespace

TrainCommands::TrainCommands(CLI::App& app) {
  TrainOptions& o = train_;
  train_cmd_ = app.add_subcommand("train",
                                  "Fine-tune the model: over the ring of --nodes-config (pipeline parallel, GPipe or 1F1B), or in this\n"
                                  "process without it. AdamW per node, gradients accumulated over micro-batches, global-norm clipping.");
  train_cmd_->add_option("--ckpt", o.ckpt, "Model: a prepare_model directory (needed for a ring), or for one process any checkpoint")->required();
  train_cmd_->add_option("--tokenizer", o.tokenizer, "Tokenizer file (default: the model's own)");
  train_cmd_->add_option("--nodes-config", o.nodes_config, "MDI-LLM nodes-config JSON; absent or \"secondary\": [] trains in this process");
  train_cmd_->add_option("--data", o.data, "Training text: plain text, or JSON lines (.jsonl) with a \"text\" field")->required()->check(CLI::ExistingFile);
  train_cmd_->add_option("--steps", o.steps, "Optimizer steps (the last step number when resuming)")->check(CLI::PositiveNumber);
  train_cmd_->add_option("--batch-size", o.batch_size, "Sequences per step")->check(CLI::PositiveNumber);
  train_cmd_->add_option("--micro-batches", o.micro_batches, "Micro-batches per step (divides --batch-size)")->check(CLI::PositiveNumber);
  train_cmd_->add_option("--seq-len", o.seq_len, "Tokens per sequence")->check(CLI::PositiveNumber);
  train_cmd_->add_option("--lr", o.lr, "Peak learning rate")->check(CLI::NonNegativeNumber);
  train_cmd_->add_option("--warmup", o.warmup, "Steps of linear learning-rate warm-up")->check(CLI::NonNegativeNumber);
  train_cmd_->add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay (matrices only)")->check(CLI::Range(0.0, 1.0));
  train_cmd_->add_option("--clip", o.clip, "Clip the global gradient norm to this (0: no clipping)")->check(CLI::NonNegativeNumber);
  train_cmd_->add_option("--schedule", o.schedule, "Pipeline schedule")->check(CLI::IsMember({"gpipe", "1f1b"}));
  train_cmd_->add_option("--train-layers", o.train_layers, "What trains: all, or a list like embed,0,3-4,head; the rest is frozen");
  train_cmd_->add_option("--val-fraction", o.val_fraction, "Fraction of the sequences held out for the validation loss")->check(CLI::Range(0.0, 0.9));
  train_cmd_->add_option("--save-every", o.save_every, "Checkpoint every N steps (and after the last); 0: only after the last")
      ->check(CLI::NonNegativeNumber);
  train_cmd_->add_option("--eval-every", o.eval_every, "Validation loss every N steps (it also comes with each checkpoint and the last step)")
      ->check(CLI::NonNegativeNumber);
  train_cmd_->add_option("--out", o.out, "Checkpoint directory: step-K/ per checkpoint, each node's stage and a manifest");
  train_cmd_->add_option("--resume", o.resume, "Continue from a checkpoint: a step-K directory, or an --out directory (its latest)");
  train_cmd_->add_option("--seed", o.seed, "Seed of the data split and order");
  train_cmd_->add_option("--log", o.log,
                         "Write step, loss, validation loss, lr and per-node forward/backward/idle time as CSV, and the loss curve\n"
                         "as a PNG beside it");
  train_cmd_->add_option("--threads", o.threads, "CPU threads for LibTorch (0: all cores)")->check(CLI::NonNegativeNumber);
  train_cmd_->add_flag("--keep-nodes", o.keep_nodes, "Leave the secondaries running and idle after the run");
  train_cmd_->add_flag("--upload-chunks", o.upload_chunks, "Upload every secondary's chunk over HTTP");
  train_cmd_->add_flag("--stages-to-starter", o.stages_to_starter,
                       "The secondaries send their checkpoint stages to the starter (its communication.port) instead of writing\n"
                       "them on their own disks under --out");

  gather_cmd_ = app.add_subcommand("gather", "Write a training checkpoint as a model directory (what prepare_model writes), split as it was trained");
  gather_cmd_->add_option("--checkpoint", gather_.checkpoint, "A step-K directory, or a training --out directory (its latest step)")->required();
  gather_cmd_->add_option("--out", gather_.out, "The model directory to write")->required();
}

std::optional<int> TrainCommands::run() const {
  if (train_cmd_->parsed()) return TrainingRun(train_).run();
  if (gather_cmd_->parsed()) return run_gather(gather_);
  return std::nullopt;
}
