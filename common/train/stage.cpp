#include "common/train/stage.hpp"

#include <cmath>

#include "common/store/checkpoint.hpp"
#include "common/store/safetensors.hpp"

namespace mdi {

namespace fs = std::filesystem;

torch::Tensor training_forward(const ModelChunk& chunk, const torch::Tensor& input, int64_t seq_len) {
  const int64_t rows = input.size(0);
  if (seq_len < 1 || rows % seq_len != 0)
    throw std::invalid_argument("a micro-batch of " + std::to_string(rows) + " rows is no whole number of sequences of " +
                                std::to_string(seq_len) + " tokens");
  std::vector<KvCache> caches;
  caches.reserve(static_cast<size_t>(rows / seq_len));
  std::vector<SequenceSpan> spans;
  for (int64_t i = 0; i < rows / seq_len; ++i) {
    caches.push_back(chunk.new_cache());
    spans.push_back({&caches.back(), 0, seq_len, nullptr});
  }
  // autograd keeps what it needs of the caches after they go
  return chunk.run_layers(input, spans);
}

torch::Tensor micro_batch_loss(const ModelChunk& chunk, const torch::Tensor& hidden, const torch::Tensor& targets, int64_t batch_tokens) {
  auto logits = chunk.run_head(hidden, false);
  return torch::cross_entropy_loss(logits, targets.to(logits.device(), torch::kLong), {}, at::Reduction::Sum) /
         static_cast<double>(batch_tokens);
}

std::string stage_tensor::fused_qkv(int64_t layer) { return tensor_name::layer(layer, "self_attn.qkv_proj"); }
std::string stage_tensor::fused_gate_up(int64_t layer) { return tensor_name::layer(layer, "mlp.gate_up_proj"); }

std::vector<std::pair<std::string, torch::Tensor>> StageOptimizer::named_weights() const {
  const ChunkWeights& w = chunk_.weights();
  const ChunkSpec& spec = chunk_.spec();
  std::vector<std::pair<std::string, torch::Tensor>> named;
  if (spec.embedding) named.emplace_back(tensor_name::kEmbedding, w.embedding);
  for (int64_t i = 0; i < spec.layers.size(); ++i) {
    const int64_t l = spec.layers.begin + i;
    const LayerWeights& lw = w.layers[static_cast<size_t>(i)];
    named.emplace_back(tensor_name::layer(l, "input_layernorm"), lw.attn_norm);
    named.emplace_back(stage_tensor::fused_qkv(l), lw.wqkv);
    named.emplace_back(tensor_name::layer(l, "self_attn.o_proj"), lw.wo);
    named.emplace_back(tensor_name::layer(l, "post_attention_layernorm"), lw.ffn_norm);
    named.emplace_back(stage_tensor::fused_gate_up(l), lw.w_gate_up);
    named.emplace_back(tensor_name::layer(l, "mlp.down_proj"), lw.w_down);
  }
  if (spec.head) {
    named.emplace_back(tensor_name::kFinalNorm, w.final_norm);
    // a tied head is the embedding: one tensor, under the embedding's name
    if (!chunk_.config().tied_embeddings) named.emplace_back(tensor_name::kLmHead, w.lm_head);
    else if (!spec.embedding) named.emplace_back(tensor_name::kEmbedding, w.lm_head);
  }
  return named;
}

StageOptimizer::StageOptimizer(ModelChunk& chunk, const TrainableSet& trainable, OptimizerSettings settings)
    : chunk_(chunk), settings_(settings) {
  chunk_.enable_training();
  for (auto& [name, value] : named_weights()) {
    bool trains = false;
    if (name == tensor_name::kEmbedding) trains = trainable.embedding;
    else if (name == tensor_name::kFinalNorm || name == tensor_name::kLmHead) trains = trainable.head;
    else trains = trainable.trains_layer(std::stoll(name.substr(std::string("model.layers.").size())));
    if (!trains) continue;
    value.requires_grad_(true);
    parameters_.push_back({name, value, torch::zeros_like(value), torch::zeros_like(value), value.dim() > 1});
  }
}

double StageOptimizer::grad_norm_sq() const {
  double sum = 0;
  for (const Parameter& p : parameters_)
    if (p.value.grad().defined()) sum += p.value.grad().to(torch::kFloat64).pow(2).sum().item<double>();
  return sum;
}

void StageOptimizer::step(double lr, double grad_scale) {
  torch::NoGradGuard no_grad;
  const int64_t t = ++steps_taken_;
  const double bias1 = 1 - std::pow(settings_.beta1, static_cast<double>(t));
  const double bias2 = 1 - std::pow(settings_.beta2, static_cast<double>(t));
  for (Parameter& p : parameters_) {
    auto grad = p.value.grad().defined() ? p.value.grad() * grad_scale : torch::zeros_like(p.value);
    if (p.decays && settings_.weight_decay > 0) p.value.mul_(1 - lr * settings_.weight_decay);
    p.exp_avg.mul_(settings_.beta1).add_(grad, 1 - settings_.beta1);
    p.exp_avg_sq.mul_(settings_.beta2).addcmul_(grad, grad, 1 - settings_.beta2);
    auto denom = (p.exp_avg_sq / bias2).sqrt_().add_(settings_.eps);
    p.value.addcdiv_(p.exp_avg, denom, -lr / bias1);
    p.value.mutable_grad() = torch::Tensor();
  }
}

std::string StageOptimizer::save(const fs::path& file, int64_t step) const {
  std::vector<std::pair<std::string, torch::Tensor>> tensors = named_weights();
  for (const Parameter& p : parameters_) {
    tensors.emplace_back(stage_tensor::kExpAvg + p.name, p.exp_avg);
    tensors.emplace_back(stage_tensor::kExpAvgSq + p.name, p.exp_avg_sq);
  }
  std::vector<SafetensorsWriter::Entry> entries;
  for (auto& [name, t] : tensors) entries.push_back({name, safetensors_dtype(t.scalar_type()), t.sizes().vec()});
  fs::create_directories(file.parent_path());
  SafetensorsWriter writer(file, entries, {{"format", "pt"}, {"step", std::to_string(step)}, {"adamw_steps", std::to_string(steps_taken_)}});
  for (auto& [name, t] : tensors) {
    auto cpu = t.detach().to(torch::kCPU).contiguous();
    writer.write(name, cpu.data_ptr(), static_cast<uint64_t>(cpu.numel()) * cpu.element_size());
  }
  return writer.commit();
}

void StageOptimizer::load(const fs::path& file) {
  SafetensorsFile in(file);
  torch::NoGradGuard no_grad;
  auto restore = [&](const std::string& name, torch::Tensor& into) {
    const TensorInfo* info = in.find(name);
    if (!info) throw CheckpointError(file.string() + ": no tensor \"" + name + "\"; it is the checkpoint of another model or split");
    if (info->shape != into.sizes().vec() || torch_dtype(info->dtype) != into.scalar_type())
      throw CheckpointError(file.string() + ": tensor \"" + name + "\" has another shape or dtype than this model's; it is the checkpoint of another model");
    auto source = torch::from_blob(const_cast<uint8_t*>(in.data(*info)), info->shape, torch_dtype(info->dtype));
    into.copy_(source);
  };
  for (auto& [name, value] : named_weights()) restore(name, value);
  for (Parameter& p : parameters_) {
    restore(stage_tensor::kExpAvg + p.name, p.exp_avg);
    restore(stage_tensor::kExpAvgSq + p.name, p.exp_avg_sq);
  }
  auto steps = in.metadata().find("adamw_steps");
  if (steps == in.metadata().end()) throw CheckpointError(file.string() + ": no \"adamw_steps\" in its metadata; not a training checkpoint");
  steps_taken_ = std::stoll(steps->second);
}

}  // namespace mdi
