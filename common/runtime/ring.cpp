#include "common/runtime/ring.hpp"

#include <deque>
#include <optional>
#include <stdexcept>
#include <utility>

#include <spdlog/spdlog.h>

namespace mdi {

namespace {
using clock = std::chrono::steady_clock;

double seconds_since(clock::time_point start) { return std::chrono::duration<double>(clock::now() - start).count(); }

// The next frame from the previous node; nullopt when `cancel` was set or `give_up_after`
// passed. Throws when the link ended.
std::optional<Frame> next_frame(FrameLink& from_prev, StageStats& stats, const std::atomic<bool>& cancel,
                                std::chrono::milliseconds give_up_after = std::chrono::milliseconds::max()) {
  double waited_s = 0;
  auto frame = from_prev.receive(cancel, waited_s, give_up_after);
  stats.add_wait(waited_s);
  return frame;
}
}  // namespace

void StageStats::add_compute(double s) {
  std::lock_guard lock(mutex_);
  compute_s_ += s;
}
void StageStats::add_wait(double s) {
  std::lock_guard lock(mutex_);
  idle_s_ += s;
}
void StageStats::frame_done() {
  std::lock_guard lock(mutex_);
  ++frames_;
}
void StageStats::set_live_samples(size_t n) {
  std::lock_guard lock(mutex_);
  live_samples_ = n;
}
nlohmann::json StageStats::to_json() const {
  std::lock_guard lock(mutex_);
  return {{"compute_s", compute_s_}, {"idle_s", idle_s_}, {"frames", frames_}, {"live_samples", live_samples_}};
}

namespace {
bool carries_activations(const Frame& frame) {
  return frame.header.type == FrameType::Activations || frame.header.type == FrameType::ActivationBatch;
}

// A stage's output for one received frame has that frame's segments, shape and
// dtype, so it is written over the received rows and the same buffer goes on to
// the next node: one copy (from `rows`, on any device) and no allocation per hop.
Frame overwrite_rows(Frame frame, const torch::Tensor& rows) {
  const FrameHeader& h = frame.header;
  const size_t offset = h.type == FrameType::ActivationBatch ? batch_rows_offset(h) : 0;
  const size_t bytes = static_cast<size_t>(rows.numel()) * rows.element_size();
  if (wire_dtype(rows.scalar_type()) != h.dtype || offset + bytes != frame.payload.size())
    throw std::logic_error("overwrite_rows: the output rows do not match the frame they answer");
  torch::from_blob(frame.payload.data() + offset, rows.sizes(), rows.scalar_type()).copy_(rows);
  return frame;
}
}  // namespace

void run_secondary_stage(const ModelChunk& chunk, RingLinks& links, StageStats& stats, const std::atomic<bool>& cancel,
                         std::chrono::milliseconds send_timeout, int64_t max_seq_len, const LayerProbes* probes) {
  const int64_t dim = chunk.config().dim;
  std::map<uint32_t, KvCache> caches;  // by sample id
  std::vector<Frame> captures;         // of the step being computed
  std::optional<Frame> next;           // popped while gathering a batch, not part of it
  while (auto frame = next ? std::exchange(next, std::nullopt) : next_frame(*links.from_prev, stats, cancel)) {
    const auto& h = frame->header;
    switch (h.type) {
      case FrameType::Activations:
      case FrameType::ActivationBatch: {
        std::vector<Frame> batch;
        batch.push_back(std::move(*frame));
        int64_t rows = batch.back().header.n_tokens;
        while (auto more = links.from_prev->inbound().try_pop()) {
          if (!carries_activations(*more) || rows + more->header.n_tokens > kBatchInvariantRows) {
            next = std::move(more);
            break;
          }
          rows += more->header.n_tokens;
          batch.push_back(std::move(*more));
        }
        const auto start = clock::now();
        std::vector<BatchSegment> segments;
        std::vector<torch::Tensor> inputs;
        std::vector<SequenceSpan> spans;
        for (const Frame& f : batch) {
          auto in = activation_rows(f, dim, chunk.dtype(), max_seq_len);
          inputs.push_back(in.rows);
          for (const BatchSegment& seg : in.segments) {
            if (seg.start_pos == 0) caches.insert_or_assign(seg.sample_id, chunk.new_cache(max_seq_len));
            auto cache = caches.find(seg.sample_id);
            if (cache == caches.end())
              throw ProtocolError("activations for sample " + std::to_string(seg.sample_id) + " at position " +
                                  std::to_string(seg.start_pos) + ", but this node holds no cache for it");
            LayerHook hook;
            if (probes)
              hook = probes->hook(seg.sample_id, seg.start_pos, [&](uint32_t sample, int64_t layer, int64_t pos, torch::Tensor rows) {
                captures.push_back(capture_frame(sample, layer, pos, rows));
              });
            spans.push_back({&cache->second, seg.start_pos, seg.n_tokens, std::move(hook)});
            segments.push_back(seg);
          }
        }
        auto hidden = chunk.run_layers(inputs.size() == 1 ? inputs[0] : torch::cat(inputs), spans);
        inputs.clear();  // views of the received payloads; the forward pass is done with them
        Frame out = batch.size() == 1 ? overwrite_rows(std::move(batch[0]), hidden) : activations_frame(segments, hidden);
        stats.add_compute(seconds_since(start));
        stats.frame_done();
        stats.set_live_samples(caches.size());
        // the captures first: the starter has them all when the step's activations come back
        for (Frame& capture : captures) links.to_next->send(std::move(capture), send_timeout);
        captures.clear();
        links.to_next->send(std::move(out), send_timeout);
        break;
      }
      case FrameType::Capture:  // an earlier node's, on its way to the starter
        links.to_next->send(std::move(*frame), send_timeout);
        break;
      case FrameType::SampleStop:
        caches.erase(h.sample_id);
        stats.set_live_samples(caches.size());
        links.to_next->send(std::move(*frame), send_timeout);
        break;
      case FrameType::RunStop:
        spdlog::info("run stop: passing it on, {} frames computed", stats.to_json()["frames"].get<uint64_t>());
        stats.set_live_samples(0);
        links.to_next->send(std::move(*frame), send_timeout);
        links.to_next->flush(send_timeout);
        return;
      default:
        throw ProtocolError(std::string("unexpected ") + frame_type_name(h.type) + " frame from " + links.from_prev->peer());
    }
  }
}

void run_starter_ring(const ModelChunk& chunk, RingLinks& links, std::vector<SampleProgress>& samples,
                      const TokenCallback& on_token, RunStats& run, StageStats& stats, const RingGenerationOptions& options) {
  const std::atomic<bool> never{false};
  const std::atomic<bool>& cancel = options.cancel ? *options.cancel : never;
  const int64_t dim = chunk.config().dim, max_seq_len = chunk.config().max_seq_len;
  std::map<uint32_t, KvCache> caches;
  std::deque<size_t> ready;  // samples whose next step waits to be sent, in the order they became ready
  // A secondary may merge frames, so frames do not come back one for one. A sent frame
  // counts against max_in_flight until every sample it carried is back.
  std::map<uint32_t, uint64_t> frame_of_sample;  // samples in flight → the sent frame that carried them
  std::map<uint64_t, size_t> samples_out;        // sent frames in flight → their samples not back yet
  uint64_t frames_sent = 0;

  // The ready samples' next steps through the starter's layers, in micro-batches (in the
  // order the samples became ready), while the ring has room.
  auto send_ready = [&] {
    std::vector<const SampleProgress*> pending;
    for (size_t i : ready) pending.push_back(&samples[i]);
    size_t sent = 0;  // samples from the front of `ready`
    for (const auto& batch : StepBatch::plan(pending, options.micro_batch)) {
      if (samples_out.size() >= options.max_in_flight) break;
      const auto start = clock::now();
      StepBatch step;
      std::vector<BatchSegment> segments;
      for (size_t k : batch) {
        SampleProgress& s = samples[ready[k]];
        const auto id = static_cast<uint32_t>(s.index());
        const auto pos = static_cast<uint32_t>(s.pending_pos());
        if (pos == 0) caches.insert_or_assign(id, chunk.new_cache());
        step.add(s, caches.at(id), options.hooks ? options.hooks(id, pos) : nullptr);
        segments.push_back({id, pos, static_cast<uint32_t>(s.pending_count())});
        frame_of_sample[id] = frames_sent;
        s.mark_fed();
      }
      sent += batch.size();
      auto hidden = chunk.run_layers(torch::tensor(step.input, torch::kLong), step.spans);
      Frame frame = activations_frame(segments, hidden);
      stats.add_compute(seconds_since(start));
      links.to_next->send(std::move(frame), options.send_timeout);
      samples_out[frames_sent++] = segments.size();
    }
    ready.erase(ready.begin(), ready.begin() + static_cast<std::ptrdiff_t>(sent));
  };

  const auto run_start = clock::now();
  for (size_t i = 0; i < samples.size(); ++i)
    if (samples[i].running()) ready.push_back(i);
  send_ready();

  while (!frame_of_sample.empty()) {
    auto frame = next_frame(*links.from_prev, stats, cancel, options.progress_timeout);
    if (!frame && cancel) throw RunInterrupted();
    if (!frame)
      throw RingStalled("no frame came back around the ring for " + std::to_string(options.progress_timeout.count()) + " ms (" +
                        std::to_string(frame_of_sample.size()) + " samples in flight), though every link is alive: a node's " +
                        "compute is stuck, or slower than timeouts.progress_s allows (raise it for a model this slow)");
    const auto& h = frame->header;
    if (h.type == FrameType::SampleStop) continue;  // it went round: every node has freed that sample
    if (h.type == FrameType::Capture && options.on_capture) {
      options.on_capture(*frame);  // not an activation: nothing came back
      continue;
    }
    if (!carries_activations(*frame))
      throw ProtocolError(std::string("unexpected ") + frame_type_name(h.type) + " frame from " + links.from_prev->peer());
    auto back = activation_rows(*frame, dim, chunk.dtype(), max_seq_len);
    for (const BatchSegment& seg : back.segments) {
      auto sent = frame_of_sample.find(seg.sample_id);
      if (sent == frame_of_sample.end())
        throw ProtocolError("activations for sample " + std::to_string(seg.sample_id) + ", which is not in flight, from " +
                            links.from_prev->peer());
      if (--samples_out[sent->second] == 0) samples_out.erase(sent->second);
      frame_of_sample.erase(sent);
    }
    const auto start = clock::now();
    auto logits = chunk.run_head(last_rows(back.rows, back.segments), false).to(torch::kCPU).contiguous();
    for (size_t k = 0; k < back.segments.size(); ++k) {
      const uint32_t id = back.segments[k].sample_id;
      SampleProgress& s = samples[id];
      if (const auto token = s.advance(logits[k].data_ptr<float>(), logits.size(1))) {
        run.record_token(seconds_since(run_start));
        if (on_token) on_token(s, *token);
      }
      if (s.running()) {
        ready.push_back(id);
      } else {
        caches.erase(id);
        links.to_next->send(make_control_frame(FrameType::SampleStop, id), options.send_timeout);
      }
    }
    stats.add_compute(seconds_since(start));
    stats.frame_done();
    send_ready();
    stats.set_live_samples(caches.size());
  }

  stop_ring_run(links, options.send_timeout, options.drain_timeout);
}

}  // namespace mdi
