#pragma once
// Recurrent pipeline parallelism over the ring, on top of common/net/frame_link.
//
//   starter:    samples ─▶ run_layers ─▶ to_next ══▶ secondary 0 ══▶ … ══▶ from_prev ─▶ run_head ─▶ next token
//   secondary:  from_prev ─▶ forward(own layers, own KV cache of that sample) ─▶ to_next
//
// Each node keeps the KV caches of the layers it holds, one per sample; a
// SampleStop frame passing through frees them. With n_samples >= n_nodes every
// node has a frame to work on while the others work on theirs.
//
// Captured hidden states ride the same links as Capture frames: a secondary sends
// the captures of a step before that step's Activations frame; the nodes after it
// pass them on untouched; the starter hands them to its collector and never counts
// them as activations in flight.
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/interp/hidden_states.hpp"
#include "common/model/model.hpp"
#include "common/net/frame_link.hpp"
#include "common/runtime/generation.hpp"
#include "common/wire/tensor_frames.hpp"

namespace mdi {

// Figures a node reports about its part of a run.
class StageStats {
 public:
  void add_compute(double seconds);
  void add_wait(double seconds);
  void frame_done();
  void set_live_samples(size_t n);
  nlohmann::json to_json() const;  // compute_s, idle_s, frames, live_samples

 private:
  mutable std::mutex mutex_;
  double compute_s_ = 0, idle_s_ = 0;
  uint64_t frames_ = 0;
  size_t live_samples_ = 0;
};

// A secondary's loop: runs its layers on every Activations or ActivationBatch frame
// and passes the result on. Activations queued behind a frame join its batch (up to
// kBatchInvariantRows rows), so a node that falls behind reads its weights once for
// all of them. It goes on until a RunStop has passed through (returns) or `cancel` is set
// (returns). With `probes`, its interventions apply and its captures go out as
// Capture frames; Capture frames from earlier nodes pass through. Throws
// LinkError naming the peer when a link fails, and ProtocolError on a frame
// that makes no sense here (a position past the run's `max_seq_len` included).
void run_secondary_stage(const ModelChunk& chunk, RingLinks& links, StageStats& stats, const std::atomic<bool>& cancel,
                         std::chrono::milliseconds send_timeout, int64_t max_seq_len, const LayerProbes* probes = nullptr);

struct RingGenerationOptions {
  size_t max_in_flight = 16;  // frames in the ring at once: stays below what its queues hold, so sends never deadlock
  // Samples per frame (micro-batch): samples ready together travel as one frame of at
  // most this many, and at most kBatchInvariantRows rows.
  size_t micro_batch = 1;
  std::chrono::milliseconds send_timeout{10'000};
  std::chrono::milliseconds drain_timeout{10'000};  // for the RunStop to come back around
  HookFactory hooks;  // the starter's own layers (embedding included): interventions, capture
  // Capture frames from the secondaries; without it they are a protocol error.
  std::function<void(const Frame&)> on_capture;
  const std::atomic<bool>* cancel = nullptr;  // once set, the run ends with RunInterrupted
  // Samples in flight and no frame back for this long: RingStalled.
  std::chrono::milliseconds progress_timeout = std::chrono::milliseconds::max();
};

// No frame came back around the ring within RingGenerationOptions::progress_timeout.
struct RingStalled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The starter's side of a run: every sample to its stop, then a RunStop around
// the ring. Each frame that comes back goes through the head and the samplers, and
// its samples' next steps go out as soon as they are sampled, in micro-batches. `chunk` holds the embedding, the starter's layers and the head.
// `run` is filled as tokens come, so it holds what was done when the run ends early:
// it throws LinkError naming the node when the ring breaks, RingStalled when the ring
// makes no progress, RunInterrupted once options.cancel is set.
void run_starter_ring(const ModelChunk& chunk, RingLinks& links, std::vector<SampleProgress>& samples,
                      const TokenCallback& on_token, RunStats& run, StageStats& stats, const RingGenerationOptions& options);

}  // namespace mdi
