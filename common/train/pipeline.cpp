#include "common/train/pipeline.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <map>
#include <optional>

#include <spdlog/spdlog.h>

#include "common/store/checkpoint.hpp"
#include "common/store/sha256.hpp"
#include "common/wire/tensor_frames.hpp"

namespace mdi {

namespace fs = std::filesystem;

namespace {
using clock = std::chrono::steady_clock;
// How often a wait looks at its cancel flag and its other link.
constexpr std::chrono::milliseconds kPoll{1};

double seconds_since(clock::time_point start) { return std::chrono::duration<double>(clock::now() - start).count(); }

int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // KiB on Linux
}

Frame wait_frame(FrameLink& link, const std::atomic<bool>& cancel, double& idle_s) {
  if (auto frame = link.receive(cancel, idle_s)) return std::move(*frame);
  throw LinkError("cancelled");
}

// Activations and Gradients of a step: rows (b * seq_len, dim) of micro-batch `m`.
Frame rows_frame(FrameType type, int64_t micro_batch, int64_t step, const torch::Tensor& rows) {
  Frame frame = activations_frame(static_cast<uint32_t>(micro_batch), 0, rows.detach());
  frame.header.type = type;
  frame.header.step = static_cast<uint64_t>(step);
  return frame;
}

// The rows of an Activations or Gradients frame, checked to be the one this node waits for.
torch::Tensor frame_rows(const Frame& frame, FrameType type, int64_t micro_batch, int64_t step, const ModelChunk& chunk,
                         const FrameLink& from) {
  const auto& h = frame.header;
  if (h.type != type || h.sample_id != micro_batch || h.step != static_cast<uint64_t>(step))
    throw ProtocolError(std::string("expected ") + frame_type_name(type) + " of micro-batch " + std::to_string(micro_batch) + " of step " +
                        std::to_string(step) + " from " + from.peer() + ", got " + frame_type_name(h.type) + " of micro-batch " +
                        std::to_string(h.sample_id) + " of step " + std::to_string(h.step));
  return activations_tensor(frame, chunk.config().dim, chunk.dtype()).clone();
}

Frame scalars_frame(int64_t step, std::vector<float> values) {
  Frame frame = make_tensor_frame(FrameType::ControlScalar, 0, 0, WireDType::F32, {static_cast<uint32_t>(values.size())}, values.data(),
                                  values.size() * sizeof(float));
  frame.header.step = static_cast<uint64_t>(step);
  return frame;
}

std::vector<float> frame_scalars(const Frame& frame, size_t n, int64_t step, const FrameLink& from) {
  const auto& h = frame.header;
  if (h.type != FrameType::ControlScalar || h.dtype != WireDType::F32 || h.ndim != 1 || h.shape[0] != n ||
      h.step != static_cast<uint64_t>(step))
    throw ProtocolError("expected a ControlScalar of " + std::to_string(n) + " F32 values for step " + std::to_string(step) + " from " +
                        from.peer() + ", got " + frame_type_name(h.type) + " of step " + std::to_string(h.step));
  std::vector<float> values(n);
  std::memcpy(values.data(), frame.payload.data(), n * sizeof(float));
  return values;
}

// The gradient norm and learning rate a stage applies come from its peer: a
// NaN would silently destroy the weights, and a rate above the plan's (which
// warm-up never exceeds) is not the run this node was given.
void check_update(float grad_norm_sq, float lr, const OptimizerSettings& settings, int64_t step, const FrameLink& from) {
  if (!std::isfinite(grad_norm_sq) || grad_norm_sq < 0)
    throw ProtocolError("step " + std::to_string(step) + ": the squared gradient norm from " + from.peer() + " is " +
                        std::to_string(grad_norm_sq) + ": the training diverged (try a lower lr or a clip)");
  if (!std::isfinite(lr) || lr < 0 || lr > settings.lr * (1 + 1e-6))
    throw ProtocolError("step " + std::to_string(step) + ": learning rate " + std::to_string(lr) + " from " + from.peer() +
                        " is outside the plan's [0, " + std::to_string(settings.lr) + "]");
}

int64_t total_rows(const std::vector<MicroBatch>& micro_batches) {
  int64_t rows = 0;
  for (auto& mb : micro_batches) rows += mb.inputs.size(0);
  return rows;
}
}  // namespace

std::vector<MicroBatch> split_batch(const std::vector<std::vector<int32_t>>& sequences, int64_t micro_batches) {
  const auto n = static_cast<int64_t>(sequences.size());
  if (micro_batches < 1 || n % micro_batches != 0)
    throw std::invalid_argument("--batch-size " + std::to_string(n) + " does not split into --micro-batches " + std::to_string(micro_batches) +
                                " equal parts");
  const int64_t per = n / micro_batches;
  std::vector<MicroBatch> out;
  for (int64_t m = 0; m < micro_batches; ++m) {
    std::vector<int64_t> inputs, targets;
    for (int64_t i = m * per; i < (m + 1) * per; ++i) {
      const auto& s = sequences[static_cast<size_t>(i)];
      inputs.insert(inputs.end(), s.begin(), s.end() - 1);
      targets.insert(targets.end(), s.begin() + 1, s.end());
    }
    out.push_back({torch::tensor(inputs, torch::kLong), torch::tensor(targets, torch::kLong)});
  }
  return out;
}

nlohmann::json StageStepFigures::to_json() const {
  return {{"forward_s", forward_s}, {"backward_s", backward_s}, {"idle_s", idle_s}, {"peak_held", peak_held}, {"peak_rss_bytes", peak_rss_bytes}};
}

LocalTrainer::LocalTrainer(ModelChunk& model, const TrainingPlan& plan)
    : model_(model), plan_(plan), optimizer_(model, plan.trainable, plan.optimizer) {}

StepFigures LocalTrainer::step(int64_t, const std::vector<MicroBatch>& micro_batches, double lr) {
  StepFigures figures;
  const int64_t batch_tokens = total_rows(micro_batches);
  for (const MicroBatch& mb : micro_batches) {
    auto start = clock::now();
    auto loss = micro_batch_loss(model_, training_forward(model_, mb.inputs, plan_.seq_len), mb.targets, batch_tokens);
    figures.loss += loss.item<double>();
    figures.starter.forward_s += seconds_since(start);
    start = clock::now();
    loss.backward();
    figures.starter.backward_s += seconds_since(start);
  }
  figures.starter.peak_held = 1;
  figures.starter.peak_rss_bytes = peak_rss_bytes();
  const double norm_sq = optimizer_.grad_norm_sq();
  figures.grad_norm = std::sqrt(norm_sq);
  optimizer_.step(lr, clip_factor(norm_sq, plan_.optimizer.clip));
  return figures;
}

double LocalTrainer::evaluate(int64_t, const std::vector<MicroBatch>& micro_batches) {
  torch::NoGradGuard no_grad;
  double loss = 0;
  const int64_t tokens = total_rows(micro_batches);
  for (const MicroBatch& mb : micro_batches)
    loss += micro_batch_loss(model_, training_forward(model_, mb.inputs, plan_.seq_len), mb.targets, tokens).item<double>();
  return loss;
}

StarterPipeline::StarterPipeline(ModelChunk& chunk, RingLinks& links, const TrainingPlan& plan, size_t n_nodes,
                                 std::chrono::milliseconds send_timeout)
    : chunk_(chunk), links_(links), plan_(plan), n_nodes_(n_nodes), send_timeout_(send_timeout),
      optimizer_(chunk, plan.trainable, plan.optimizer) {}

StepFigures StarterPipeline::step(int64_t step, const std::vector<MicroBatch>& micro_batches, double lr) {
  StepFigures figures;
  StageStepFigures& me = figures.starter;
  const auto M = static_cast<int64_t>(micro_batches.size());
  const int64_t limit = starter_in_flight_limit(plan_.schedule, static_cast<int64_t>(n_nodes_), M);
  const int64_t batch_tokens = total_rows(micro_batches);
  FrameLink& to_next = *links_.to_next;
  FrameLink& from_prev = *links_.from_prev;

  std::map<int64_t, torch::Tensor> first_stage_out;  // awaiting their gradients
  struct HeadPending {
    torch::Tensor hidden, loss;
  };
  std::vector<HeadPending> head_pending;  // GPipe: every micro-batch's head, until all have come back
  std::optional<Frame> activations, gradients;
  int64_t next_forward = 0, returned = 0, backward_done = 0;

  auto head_backward = [&](int64_t m, HeadPending& head) {
    const auto start = clock::now();
    head.loss.backward();
    Frame frame = rows_frame(FrameType::Gradients, m, step, head.hidden.grad());
    head = {};
    me.backward_s += seconds_since(start);
    from_prev.send(std::move(frame), send_timeout_);
  };

  while (backward_done < M) {
    if (!activations) activations = from_prev.receive(std::chrono::milliseconds(0));
    if (!gradients) gradients = to_next.receive(std::chrono::milliseconds(0));
    if (activations) {
      // the last secondary's output: head and loss; under 1F1B its backward at once
      auto start = clock::now();
      auto hidden = frame_rows(*activations, FrameType::Activations, returned, step, chunk_, from_prev).requires_grad_(true);
      activations.reset();
      auto loss = micro_batch_loss(chunk_, hidden, micro_batches[static_cast<size_t>(returned)].targets, batch_tokens);
      figures.loss += loss.item<double>();
      me.forward_s += seconds_since(start);
      head_pending.push_back({hidden, loss});
      ++returned;
      if (plan_.schedule == PipelineSchedule::one_f_one_b) {
        head_backward(returned - 1, head_pending.back());
        head_pending.clear();
      } else if (returned == M) {
        for (int64_t m = 0; m < M; ++m) head_backward(m, head_pending[static_cast<size_t>(m)]);
        head_pending.clear();
      }
    } else if (next_forward < M && next_forward - backward_done < limit) {
      const auto start = clock::now();
      auto out = training_forward(chunk_, micro_batches[static_cast<size_t>(next_forward)].inputs, plan_.seq_len);
      Frame frame = rows_frame(FrameType::Activations, next_forward, step, out);
      me.forward_s += seconds_since(start);
      first_stage_out.emplace(next_forward++, out);
      me.peak_held = std::max<int64_t>(me.peak_held, static_cast<int64_t>(first_stage_out.size()));
      to_next.send(std::move(frame), send_timeout_);
    } else if (gradients) {
      const auto start = clock::now();
      auto grad = frame_rows(*gradients, FrameType::Gradients, backward_done, step, chunk_, to_next);
      gradients.reset();
      auto out = first_stage_out.at(backward_done);
      first_stage_out.erase(backward_done++);
      if (out.requires_grad()) torch::autograd::backward({out}, {grad});
      me.backward_s += seconds_since(start);
    } else {
      const auto start = clock::now();
      activations = from_prev.receive(kPoll);
      if (!activations) gradients = to_next.receive(kPoll);
      me.idle_s += seconds_since(start);
    }
  }

  // every gradient is in: the secondaries' squared norms go round and add up, then the
  // total and the learning rate go round and every node steps
  to_next.send(scalars_frame(step, {0.0f}), send_timeout_);
  const std::atomic<bool> never{false};
  const double total = optimizer_.grad_norm_sq() + frame_scalars(wait_frame(from_prev, never, me.idle_s), 1, step, from_prev)[0];
  figures.grad_norm = std::sqrt(total);
  optimizer_.step(lr, clip_factor(total, plan_.optimizer.clip));
  to_next.send(scalars_frame(step, {static_cast<float>(total), static_cast<float>(lr)}), send_timeout_);
  frame_scalars(wait_frame(from_prev, never, me.idle_s), 2, step, from_prev);
  me.peak_rss_bytes = peak_rss_bytes();
  return figures;
}

double StarterPipeline::evaluate(int64_t step, const std::vector<MicroBatch>& micro_batches) {
  torch::NoGradGuard no_grad;
  const auto M = static_cast<int64_t>(micro_batches.size());
  const int64_t tokens = total_rows(micro_batches);
  const std::atomic<bool> never{false};
  double loss = 0, idle_s = 0;
  // as many in the ring as it has nodes: enough to keep each busy, never enough to fill the links
  for (int64_t sent = 0, returned = 0; returned < M;) {
    if (sent < M && sent - returned < static_cast<int64_t>(n_nodes_)) {
      auto out = training_forward(chunk_, micro_batches[static_cast<size_t>(sent)].inputs, plan_.seq_len);
      links_.to_next->send(rows_frame(FrameType::Activations, sent++, step, out), send_timeout_);
      continue;
    }
    auto hidden = frame_rows(wait_frame(*links_.from_prev, never, idle_s), FrameType::Activations, returned, step, chunk_, *links_.from_prev);
    loss += micro_batch_loss(chunk_, hidden, micro_batches[static_cast<size_t>(returned++)].targets, tokens).item<double>();
  }
  return loss;
}

void StarterPipeline::finish(std::chrono::milliseconds timeout) { stop_ring_run(links_, send_timeout_, timeout); }

void SecondaryTrainingStatus::set_step(int64_t step, const StageStepFigures& figures) {
  std::lock_guard lock(mutex_);
  state_["step"] = step;
  state_["figures"] = figures.to_json();
}

void SecondaryTrainingStatus::set_checkpoint(int64_t step, const std::string& file, const std::string& sha256, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  state_["checkpoint"] = {{"step", step}, {"file", file}, {"sha256", sha256}, {"bytes", bytes}};
}

nlohmann::json SecondaryTrainingStatus::to_json() const {
  std::lock_guard lock(mutex_);
  return state_;
}

fs::path checkpoint_step_dir(const fs::path& dir, int64_t step) { return dir / ("step-" + std::to_string(step)); }

void run_secondary_training(ModelChunk& chunk, RingLinks& links, const TrainingPlan& plan, size_t ring_index, size_t n_nodes,
                            SecondaryTrainingStatus& status, const std::atomic<bool>& cancel, std::chrono::milliseconds send_timeout,
                            const StageUpload& upload) {
  StageOptimizer optimizer(chunk, plan.trainable, plan.optimizer);
  if (!plan.resume_file.empty()) {
    const std::string digest = sha256_file(plan.resume_file);
    if (digest != plan.resume_sha256)
      throw CheckpointError("resume file " + plan.resume_file + " has sha256 " + digest + ", the checkpoint's manifest says " + plan.resume_sha256);
    optimizer.load(plan.resume_file);
    spdlog::info("resumed from {} after {} steps", plan.resume_file, optimizer.steps_taken());
  }
  const auto ops = secondary_schedule(plan.schedule, static_cast<int64_t>(n_nodes), static_cast<int64_t>(ring_index), plan.micro_batches);
  FrameLink& from_prev = *links.from_prev;
  FrameLink& to_next = *links.to_next;
  int64_t finished = plan.first_step - 1;
  for (;;) {
    StageStepFigures figures;
    Frame first = wait_frame(from_prev, cancel, figures.idle_s);
    if (first.header.type == FrameType::RunStop) {
      to_next.send(std::move(first), send_timeout);
      to_next.flush(send_timeout);
      return;
    }
    if (first.header.type == FrameType::Activations && first.header.step == static_cast<uint64_t>(finished)) {
      torch::NoGradGuard no_grad;
      auto output = training_forward(chunk, frame_rows(first, FrameType::Activations, first.header.sample_id, finished, chunk, from_prev), plan.seq_len);
      to_next.send(rows_frame(FrameType::Activations, first.header.sample_id, finished, output), send_timeout);
      continue;
    }
    const auto step = static_cast<int64_t>(first.header.step);
    if (step != finished + 1)
      throw ProtocolError("step " + std::to_string(step) + " from " + from_prev.peer() + " after step " + std::to_string(finished));
    figures.idle_s = 0;  // the wait between steps is the starter's business
    std::optional<Frame> pending(std::move(first));
    std::map<int64_t, std::pair<torch::Tensor, torch::Tensor>> held;  // input, output of each micro-batch in flight
    for (const StageOp& op : ops) {
      if (op.kind == StageOp::forward) {
        Frame frame = pending ? std::move(*pending) : wait_frame(from_prev, cancel, figures.idle_s);
        pending.reset();
        const auto start = clock::now();
        auto input = frame_rows(frame, FrameType::Activations, op.micro_batch, step, chunk, from_prev).requires_grad_(true);
        auto output = training_forward(chunk, input, plan.seq_len);
        Frame out = rows_frame(FrameType::Activations, op.micro_batch, step, output);
        held.emplace(op.micro_batch, std::make_pair(input, output));
        figures.peak_held = std::max<int64_t>(figures.peak_held, static_cast<int64_t>(held.size()));
        figures.forward_s += seconds_since(start);
        to_next.send(std::move(out), send_timeout);
      } else {
        Frame frame = wait_frame(to_next, cancel, figures.idle_s);
        const auto start = clock::now();
        auto grad = frame_rows(frame, FrameType::Gradients, op.micro_batch, step, chunk, to_next);
        auto [input, output] = held.at(op.micro_batch);
        held.erase(op.micro_batch);
        torch::autograd::backward({output}, {grad});
        Frame out = rows_frame(FrameType::Gradients, op.micro_batch, step, input.grad());
        figures.backward_s += seconds_since(start);
        from_prev.send(std::move(out), send_timeout);
      }
    }
    const float partial = frame_scalars(wait_frame(from_prev, cancel, figures.idle_s), 1, step, from_prev)[0];
    to_next.send(scalars_frame(step, {partial + static_cast<float>(optimizer.grad_norm_sq())}), send_timeout);
    const auto update = frame_scalars(wait_frame(from_prev, cancel, figures.idle_s), 2, step, from_prev);
    check_update(update[0], update[1], plan.optimizer, step, from_prev);
    optimizer.step(update[1], clip_factor(update[0], plan.optimizer.clip));
    if (plan.saves_after(step)) {
      const std::string name = "secondary" + std::to_string(ring_index - 1) + ".safetensors";
      const fs::path file = plan.upload_stages ? fs::temp_directory_path() / ("mdi-stage-" + std::to_string(::getpid()) + "-" + name)
                                               : checkpoint_step_dir(plan.checkpoint_dir, step) / name;
      const std::string digest = optimizer.save(file, step);
      const uint64_t bytes = fs::file_size(file);
      if (plan.upload_stages) {
        upload(step, file, digest);
        fs::remove(file);
      }
      status.set_checkpoint(step, plan.upload_stages ? name : file.string(), digest, bytes);
      spdlog::info("step {}: {} {}", step, plan.upload_stages ? "sent the starter" : "saved", file.string());
    }
    figures.peak_rss_bytes = peak_rss_bytes();
    status.set_step(step, figures);
    finished = step;
    to_next.send(scalars_frame(step, {update[0], update[1]}), send_timeout);
  }
}

}  // namespace mdi
