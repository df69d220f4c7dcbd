#include "common/ring.hpp"

#include <deque>

#include <spdlog/spdlog.h>

namespace mdi {

namespace {
using clock = std::chrono::steady_clock;
// How often a blocked wait looks at its cancel flag.
constexpr std::chrono::milliseconds kPollInterval{100};

WireDType wire_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return WireDType::F32;
    case torch::kBFloat16: return WireDType::BF16;
    case torch::kFloat16: return WireDType::F16;
    default: throw std::invalid_argument(std::string("no wire dtype for ") + c10::toString(dtype));
  }
}

double seconds_since(clock::time_point start) { return std::chrono::duration<double>(clock::now() - start).count(); }

// The next frame from the previous node; nullopt when `cancel` was set. Throws when the link ended.
std::optional<Frame> next_frame(Link& from_prev, StageStats& stats, const std::atomic<bool>& cancel) {
  const auto start = clock::now();
  while (!cancel) {
    if (auto frame = from_prev.inbound().pop(kPollInterval)) {
      stats.add_wait(seconds_since(start));
      return frame;
    }
    if (from_prev.inbound().closed()) {
      const std::string error = from_prev.error();
      throw LinkError(error.empty() ? "the link from " + from_prev.peer() + " closed before the run ended" : error);
    }
  }
  return std::nullopt;
}
}  // namespace

Frame activations_frame(uint32_t sample_id, uint32_t start_pos, const torch::Tensor& hidden) {
  auto cpu = hidden.contiguous().to(torch::kCPU);
  Frame frame = make_tensor_frame(FrameType::Activations, sample_id, start_pos, wire_dtype(cpu.scalar_type()),
                                  {static_cast<uint32_t>(cpu.size(0)), static_cast<uint32_t>(cpu.size(1))}, cpu.data_ptr(),
                                  static_cast<size_t>(cpu.numel()) * cpu.element_size());
  frame.header.n_tokens = static_cast<uint32_t>(cpu.size(0));
  return frame;
}

torch::Tensor activations_tensor(const Frame& frame, int64_t dim, torch::ScalarType dtype) {
  const auto& h = frame.header;
  if (h.ndim != 2 || h.shape[1] != dim || h.shape[0] != h.n_tokens || h.n_tokens == 0)
    throw ProtocolError("Activations frame of sample " + std::to_string(h.sample_id) + " has shape [" + std::to_string(h.shape[0]) +
                        ", " + std::to_string(h.shape[1]) + "] for " + std::to_string(h.n_tokens) + " tokens; expected [n_tokens, " +
                        std::to_string(dim) + "]");
  if (h.dtype != wire_dtype(dtype))
    throw ProtocolError(std::string("Activations frame carries ") + wire_dtype_name(h.dtype) + ", this node runs " + wire_dtype_name(wire_dtype(dtype)));
  // The frame outlives this view: the caller keeps it until the forward pass has read it.
  return torch::from_blob(const_cast<uint8_t*>(frame.payload.data()), {static_cast<int64_t>(h.n_tokens), dim}, dtype);
}

Frame capture_frame(uint32_t sample_id, int64_t layer, int64_t start_pos, const torch::Tensor& rows) {
  Frame frame = activations_frame(sample_id, static_cast<uint32_t>(start_pos), rows);
  frame.header.type = FrameType::Capture;
  frame.header.layer = layer == kEmbedLayer ? kEmbedWireLayer : static_cast<uint32_t>(layer);
  return frame;
}

CapturedRows captured_rows(const Frame& frame, int64_t dim, torch::ScalarType dtype) {
  const auto& h = frame.header;
  const int64_t layer = h.layer == kEmbedWireLayer ? kEmbedLayer : static_cast<int64_t>(h.layer);
  const std::string what = "Capture frame of sample " + std::to_string(h.sample_id) + " " + layer_label(layer);
  if (h.type != FrameType::Capture) throw ProtocolError(std::string("expected a Capture frame, got ") + frame_type_name(h.type));
  if (h.ndim != 2 || h.shape[1] != dim || h.shape[0] != h.n_tokens || h.n_tokens == 0)
    throw ProtocolError(what + " has shape [" + std::to_string(h.shape[0]) + ", " + std::to_string(h.shape[1]) + "] for " +
                        std::to_string(h.n_tokens) + " rows; expected [n_tokens, " + std::to_string(dim) + "]");
  if (h.dtype != wire_dtype(dtype))
    throw ProtocolError(what + " carries " + wire_dtype_name(h.dtype) + ", the run's dtype is " + wire_dtype_name(wire_dtype(dtype)));
  return {h.sample_id, layer, h.start_pos,
          torch::from_blob(const_cast<uint8_t*>(frame.payload.data()), {static_cast<int64_t>(h.n_tokens), dim}, dtype)};
}

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

void run_secondary_stage(const ModelChunk& chunk, RingLinks& links, StageStats& stats, const std::atomic<bool>& cancel,
                         std::chrono::milliseconds send_timeout, const LayerProbes* probes) {
  std::map<uint32_t, KvCache> caches;  // by sample id
  std::vector<Frame> captures;         // of the step being computed
  while (auto frame = next_frame(*links.from_prev, stats, cancel)) {
    const auto& h = frame->header;
    switch (h.type) {
      case FrameType::Activations: {
        const auto start = clock::now();
        if (h.start_pos == 0) caches.insert_or_assign(h.sample_id, chunk.new_cache());
        auto cache = caches.find(h.sample_id);
        if (cache == caches.end())
          throw ProtocolError("Activations frame for sample " + std::to_string(h.sample_id) + " at position " +
                              std::to_string(h.start_pos) + ", but this node holds no cache for it");
        LayerHook hook;
        if (probes)
          hook = probes->hook(h.sample_id, h.start_pos, [&](uint32_t sample, int64_t layer, int64_t pos, torch::Tensor rows) {
            captures.push_back(capture_frame(sample, layer, pos, rows));
          });
        auto hidden = chunk.forward(activations_tensor(*frame, chunk.config().dim, chunk.dtype()), cache->second, h.start_pos, true, hook);
        Frame out = activations_frame(h.sample_id, h.start_pos, hidden);
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

RunStats run_starter_ring(const ModelChunk& chunk, RingLinks& links, std::vector<SampleProgress>& samples,
                          const TokenCallback& on_token, StageStats& stats, const RingGenerationOptions& options) {
  const std::atomic<bool> never{false};
  RunStats run;
  std::map<uint32_t, KvCache> caches;
  std::deque<size_t> waiting;  // samples with input ready, beyond the in-flight cap
  size_t in_flight = 0;

  auto send_step = [&](SampleProgress& s) {
    const auto start = clock::now();
    const auto id = static_cast<uint32_t>(s.index());
    const auto pos = static_cast<uint32_t>(s.pending_pos());
    if (pos == 0) caches.insert_or_assign(id, chunk.new_cache());
    const LayerHook hook = options.hooks ? options.hooks(id, pos) : nullptr;
    auto hidden = chunk.run_layers(torch::tensor(s.pending_input(), torch::kLong), caches.at(id), pos, hook);
    s.mark_fed();
    Frame frame = activations_frame(id, pos, hidden);
    stats.add_compute(seconds_since(start));
    links.to_next->send(std::move(frame), options.send_timeout);
    ++in_flight;
  };
  auto send_or_wait = [&](size_t i) {
    if (in_flight < options.max_in_flight)
      send_step(samples[i]);
    else
      waiting.push_back(i);
  };

  const auto run_start = clock::now();
  for (size_t i = 0; i < samples.size(); ++i)
    if (samples[i].running()) send_or_wait(i);

  while (in_flight > 0) {
    auto frame = next_frame(*links.from_prev, stats, never);
    const auto& h = frame->header;
    if (h.type == FrameType::SampleStop) continue;  // it went round: every node has freed that sample
    if (h.type == FrameType::Capture && options.on_capture) {
      options.on_capture(*frame);  // not an activation: in_flight stays
      continue;
    }
    if (h.type != FrameType::Activations || h.sample_id >= samples.size())
      throw ProtocolError(std::string("unexpected ") + frame_type_name(h.type) + " frame for sample " + std::to_string(h.sample_id) +
                          " from " + links.from_prev->peer());
    --in_flight;
    SampleProgress& s = samples[h.sample_id];
    const auto start = clock::now();
    auto logits = chunk.run_head(activations_tensor(*frame, chunk.config().dim, chunk.dtype())).to(torch::kCPU).contiguous();
    const int64_t token = s.advance(logits.data_ptr<float>(), logits.size(1));
    stats.add_compute(seconds_since(start));
    stats.frame_done();
    run.record_token(seconds_since(run_start));
    if (on_token) on_token(s, token);
    if (s.running()) {
      send_or_wait(h.sample_id);
    } else {
      caches.erase(h.sample_id);
      links.to_next->send(make_control_frame(FrameType::SampleStop, h.sample_id), options.send_timeout);
    }
    while (!waiting.empty() && in_flight < options.max_in_flight) {
      const size_t next = waiting.front();
      waiting.pop_front();
      send_step(samples[next]);
    }
    stats.set_live_samples(caches.size());
  }

  // The RunStop comes back once every node has passed it on: the ring is drained.
  links.to_next->send(make_control_frame(FrameType::RunStop), options.send_timeout);
  const auto deadline = clock::now() + options.drain_timeout;
  while (clock::now() < deadline) {
    auto frame = links.from_prev->inbound().pop(kPollInterval);
    if (frame && frame->header.type == FrameType::RunStop) return run;
    if (!frame && links.from_prev->inbound().closed()) break;
  }
  throw LinkError("the run's stop did not come back around the ring within " +
                  std::to_string(options.drain_timeout.count()) + " ms (from " + links.from_prev->peer() + ")");
}

}  // namespace mdi
