#include "common/generation.hpp"

#include <chrono>
#include <stdexcept>

#include <spdlog/spdlog.h>

namespace mdi {

RunStats generate_standalone(const ModelChunk& model, std::vector<SampleProgress>& samples, const TokenCallback& on_token,
                             const HookFactory& hooks) {
  if (!model.spec().embedding || !model.spec().head)
    throw std::logic_error("standalone generation needs a chunk with the embedding and the head");
  using clock = std::chrono::steady_clock;
  RunStats stats;
  std::vector<KvCache> caches;
  for (size_t i = 0; i < samples.size(); ++i) caches.push_back(model.new_cache());

  // Every running sample takes one step per pass, as few micro-batches as the rows allow.
  const auto run_start = clock::now();
  for (;;) {
    std::vector<size_t> running;
    std::vector<int64_t> rows;
    for (size_t i = 0; i < samples.size(); ++i)
      if (samples[i].running()) running.push_back(i), rows.push_back(static_cast<int64_t>(samples[i].pending_input().size()));
    if (running.empty()) break;
    for (const auto& batch : pack_micro_batches(rows, running.size())) {
      std::vector<int64_t> input;
      std::vector<SequenceSpan> spans;
      for (size_t b : batch) {
        SampleProgress& s = samples[running[b]];
        const auto tokens = s.pending_input();
        input.insert(input.end(), tokens.begin(), tokens.end());
        const LayerHook hook = hooks ? hooks(static_cast<uint32_t>(s.index()), s.pending_pos()) : nullptr;
        spans.push_back({&caches[running[b]], s.pending_pos(), static_cast<int64_t>(tokens.size()), hook});
      }
      auto logits = model.forward(torch::tensor(input, torch::kLong), spans).to(torch::kCPU).contiguous();
      for (size_t k = 0; k < batch.size(); ++k) {
        const size_t i = running[batch[k]];
        SampleProgress& s = samples[i];
        s.mark_fed();
        const int64_t token = s.advance(logits[k].data_ptr<float>(), logits.size(1));
        stats.record_token(std::chrono::duration<double>(clock::now() - run_start).count());
        if (on_token) on_token(s, token);
        if (!s.running()) caches[i] = model.new_cache();  // a stopped sample frees its cache at once
      }
    }
  }
  return stats;
}

}  // namespace mdi
