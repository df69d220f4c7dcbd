#pragma once
// A secondary daemon's state and control-plane routes. It waits idle; POST
// /init gives it a layer range and a chunk (on its disk, or uploaded first
// with POST /chunk); it then joins the ring and runs its layers until the run's
// stop passes through, and goes back to idle.
//
//   idle ──/init──▶ loading ──▶ ready ──ring up──▶ running ──RunStop / failure / PUT /stop?reset──▶ idle
//                                                        └──PUT /stop──▶ process exits
#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "common/model/model.hpp"
#include "common/net/http/control_plane.hpp"
#include "common/runtime/ring.hpp"
#include "common/train/pipeline.hpp"
#include "common/wire/init_request.hpp"

namespace mdi {

struct SecondaryOptions {
  size_t secondary_index = 0;                // position among the secondaries; ring index is this + 1
  NodeEndpoint self;                         // this node's entry of its own nodes-config
  std::filesystem::path chunk_override;      // --chunk: use this file whatever /init says
  std::string device_override;               // --device
  std::string dtype_override;                // --dtype
  std::filesystem::path chunk_cache_dir;     // uploaded chunks, named <sha256>.safetensors
};

class SecondaryNode {
 public:
  explicit SecondaryNode(SecondaryOptions options);
  ~SecondaryNode();  // ends a run in progress
  SecondaryNode(const SecondaryNode&) = delete;
  SecondaryNode& operator=(const SecondaryNode&) = delete;

  // GET /status, POST /init, POST /chunk?sha256=…, PUT /stop[?reset=1], POST /reset
  void register_routes(ControlServer& server);
  // Returns once PUT /stop (without reset) asked the process to exit.
  void wait_for_shutdown();

  HttpResponse init(const HttpRequest& request);
  HttpResponse status(const HttpRequest& request) const;
  HttpResponse stop(const HttpRequest& request);
  HttpResponse reset(const HttpRequest& request);
  HttpResponse upload_chunk(const HttpRequest& head, const std::filesystem::path& file, const std::string& sha256);

 private:
  enum class State { idle, loading, ready, running };
  static const char* state_name(State state);
  std::optional<std::filesystem::path> find_chunk(const InitRequest& request, std::string& problem) const;
  void run_ring(InitRequest request);
  void end_run();  // cancels and joins the ring thread; back to idle

  SecondaryOptions options_;
  mutable std::mutex mutex_;
  State state_ = State::idle;
  uint64_t run_id_ = 0;
  std::string last_error_;
  std::unique_ptr<ModelChunk> chunk_;
  std::string chunk_sha256_;  // of the loaded chunk, to reuse it across runs
  std::string chunk_key_;     // sha256 + layers + device + dtype of the loaded chunk
  std::shared_ptr<StageStats> stats_;
  std::shared_ptr<SecondaryTrainingStatus> training_status_;  // of a training run
  RingLinks* links_ = nullptr;  // while running, for /status
  std::optional<std::pair<LinkStats, LinkStats>> last_link_stats_;  // in, out of the last run
  std::thread ring_thread_;
  std::atomic<bool> cancel_{false};
  std::condition_variable shutdown_cv_;
  bool shutdown_ = false;
};

}  // namespace mdi
