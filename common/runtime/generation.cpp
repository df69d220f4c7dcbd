#include "common/runtime/generation.hpp"

#include <chrono>
#include <stdexcept>

#include <spdlog/spdlog.h>

namespace mdi {

void StepBatch::add(const SampleProgress& sample, KvCache& cache, LayerHook hook) {
  const auto tokens = sample.pending_input();
  input.insert(input.end(), tokens.begin(), tokens.end());
  spans.push_back({&cache, sample.pending_pos(), static_cast<int64_t>(tokens.size()), std::move(hook)});
}

std::vector<std::vector<size_t>> StepBatch::plan(const std::vector<const SampleProgress*>& samples, size_t max_samples) {
  std::vector<int64_t> rows;
  for (const SampleProgress* s : samples) rows.push_back(s->pending_count());
  return pack_micro_batches(rows, max_samples);
}

void generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token,
                         RunStats& stats, const HookFactory& hooks, const std::atomic<bool>* cancel) {
  if (!model.spec().embedding || !model.spec().head)
    throw std::logic_error("standalone generation needs a chunk with the embedding and the head");
  using clock = std::chrono::steady_clock;
  std::vector<KvCache> caches;
  for (size_t i = 0; i < samples.size(); ++i) caches.push_back(model.new_cache());

  // Every running sample takes one step per pass, as few micro-batches as the rows allow.
  const auto run_start = clock::now();
  for (;;) {
    std::vector<size_t> running;
    std::vector<const SampleProgress*> pending;
    for (size_t i = 0; i < samples.size(); ++i)
      if (samples[i].running()) running.push_back(i), pending.push_back(&samples[i]);
    if (running.empty()) break;
    for (const auto& batch : StepBatch::plan(pending, running.size())) {
      if (cancel && *cancel) throw RunInterrupted();
      StepBatch step;
      for (size_t b : batch) {
        const SampleProgress& s = samples[running[b]];
        step.add(s, caches[running[b]], hooks ? hooks(static_cast<uint32_t>(s.index()), s.pending_pos()) : nullptr);
      }
      auto logits = model.forward(torch::tensor(step.input, torch::kLong), step.spans).to(torch::kCPU).contiguous();
      for (size_t k = 0; k < batch.size(); ++k) {
        const size_t i = running[batch[k]];
        SampleProgress& s = samples[i];
        s.mark_fed();
        if (const auto token = s.advance(logits[k].data_ptr<float>(), logits.size(1))) {
          stats.record_token(std::chrono::duration<double>(clock::now() - run_start).count());
          if (on_token) on_token(s, *token);
        }
        if (!s.running()) caches[i] = model.new_cache();  // a stopped sample frees its cache at once
      }
    }
  }
}

}  // namespace mdi
