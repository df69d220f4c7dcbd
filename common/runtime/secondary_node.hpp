#pragma once
// A secondary daemon's state and control-plane routes. It waits idle; POST
// /init gives it a layer range and a chunk (on its disk, or uploaded first
// with POST /chunk); it then joins the ring and runs its layers until the run's
// stop passes through, and goes back to idle.
//
//   idle ──/init──▶ loading ──▶ ready ──ring up──▶ running ──RunStop / failure / PUT /stop?reset──▶ idle
//                     └── PUT /stop?reset, POST /reset, an expired lease: the run is cancelled ──▶ idle
//
// An /init with lease_ms holds the node only while its starter renews it (PUT
// /lease?run_id=…): until the ring is up, a run not renewed for lease_ms is dropped.
//   PUT /stop (no reset), in any state: the run ends, then the process exits
//
// One mutex guards every field below that a route reads or writes; the load
// itself runs without it (on the /init handler's thread), so /status, /stop and
// /reset answer while a chunk loads.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

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
  // The only places an /init may name a file in (chunk.path, a training resume
  // file): anything else on the node's disk is neither read nor hashed.
  std::vector<std::filesystem::path> chunk_dirs;
  // Uploaded chunks kept at most (0: as much as the disk holds); the oldest unused
  // ones are deleted to make room.
  uint64_t chunk_cache_budget_bytes = 0;
};

class SecondaryNode {
 public:
  explicit SecondaryNode(SecondaryOptions options);
  ~SecondaryNode();  // ends a run in progress
  SecondaryNode(const SecondaryNode&) = delete;
  SecondaryNode& operator=(const SecondaryNode&) = delete;

  // GET /status, POST /init, POST /chunk?sha256=…, PUT /stop[?reset=1][&run_id=…], POST /reset[?run_id=…],
  // PUT /lease?run_id=…
  void register_routes(ControlServer& server);
  // Returns once PUT /stop (without reset) asked the process to exit.
  void wait_for_shutdown();

  HttpResponse init(const HttpRequest& request);
  HttpResponse status(const HttpRequest& request) const;
  HttpResponse stop(const HttpRequest& request);
  HttpResponse reset(const HttpRequest& request);
  HttpResponse renew_lease(const HttpRequest& request);
  UploadAdmission admit_upload(const HttpRequest& head);
  HttpResponse upload_chunk(const HttpRequest& head, const std::filesystem::path& file, const std::string& sha256);

 private:
  enum class State { idle, loading, ready, running };
  static const char* state_name(State state);

  // One /init's run, from loading to its end. Its cancel flag is its own, so a
  // stop meant for one run never reaches the next.
  struct Run {
    InitRequest request;
    std::atomic<bool> cancel{false};
    std::shared_ptr<ModelChunk> chunk;
    std::shared_ptr<StageStats> stats = std::make_shared<StageStats>();
    std::shared_ptr<SecondaryTrainingStatus> training;  // of a training run
    std::chrono::steady_clock::time_point lease_expires;  // with request.lease_ms; under the node's mutex
  };
  // The chunk an /init answered need_upload for: the only upload this node takes.
  struct ExpectedUpload {
    std::string sha256;
    uint64_t max_bytes = 0;
    bool exact = false;  // max_bytes is the manifest's size, not a bound
  };

  struct ChunkLookup {
    std::optional<std::filesystem::path> file;
    std::string problem;  // without a file: why
    bool need_upload = false;
  };
  ChunkLookup find_chunk(const Run& run);
  bool in_chunk_dirs(const std::filesystem::path& path) const;
  std::string chunk_dirs_text() const;
  std::optional<HttpResponse> make_room_for_upload(uint64_t bytes);
  std::shared_ptr<ModelChunk> load(Run& run, const std::filesystem::path& chunk_file);
  HttpResponse ready_answer(const Run& run) const;
  void run_ring(std::shared_ptr<Run> run);
  // Cancels the current run if `run_id` is absent or names it, waits (bounded) until
  // the node is idle, and joins the ring thread. Refuses (409) another run's stop.
  std::optional<HttpResponse> end_run(std::optional<uint64_t> run_id);
  void join_finished_ring_thread(std::unique_lock<std::mutex>& lock);
  void drop_runs_whose_lease_expired();

  SecondaryOptions options_;
  std::vector<std::filesystem::path> canonical_chunk_dirs_;
  mutable std::mutex mutex_;
  std::condition_variable state_changed_;
  State state_ = State::idle;
  std::shared_ptr<Run> run_;  // null when idle
  uint64_t last_run_id_ = 0;
  std::string last_error_;
  // Kept across runs, so the next run with the same chunk, layers, device and dtype reuses it.
  std::shared_ptr<ModelChunk> chunk_;
  std::string chunk_key_;
  std::shared_ptr<StageStats> last_stats_;
  std::shared_ptr<SecondaryTrainingStatus> last_training_;
  RingLinks* links_ = nullptr;  // while running, for /status
  std::optional<std::pair<LinkStats, LinkStats>> last_link_stats_;  // in, out of the last run
  std::optional<ExpectedUpload> expected_upload_;
  bool upload_in_progress_ = false;
  std::thread ring_thread_;
  bool shutdown_ = false;
  bool destroying_ = false;
  std::thread lease_watch_;  // last: it starts once everything above is built
};

}  // namespace mdi
