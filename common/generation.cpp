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

  const auto run_start = clock::now();
  for (bool any_running = true; any_running;) {
    any_running = false;
    for (size_t i = 0; i < samples.size(); ++i) {
      SampleProgress& s = samples[i];
      if (!s.running()) continue;
      auto input = s.pending_input();
      const LayerHook hook = hooks ? hooks(static_cast<uint32_t>(s.index()), s.pending_pos()) : nullptr;
      auto logits = model.forward(torch::tensor(input, torch::kLong), caches[i], s.pending_pos(), true, hook);
      s.mark_fed();
      auto row = logits[0].contiguous().to(torch::kCPU);
      const int64_t token = s.advance(row.data_ptr<float>(), row.size(0));
      stats.record_token(std::chrono::duration<double>(clock::now() - run_start).count());
      if (on_token) on_token(s, token);
      if (s.running())
        any_running = true;
      else
        caches[i] = model.new_cache();  // a stopped sample frees its cache at once
    }
  }
  return stats;
}

}  // namespace mdi
