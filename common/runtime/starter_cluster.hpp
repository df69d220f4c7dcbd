#pragma once
// The starter's side of the control plane: brings every secondary into a run
// (POST /init, uploading chunks a node lacks), reads their figures, and ends
// the run (PUT /stop, or back to idle with --keep-nodes).
#include <chrono>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/interp/interventions.hpp"
#include "common/store/partition.hpp"
#include "common/train/plan.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

struct ClusterError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// 64 bits from the operating system's random source: one run's id, which a stale
// node or a second starter cannot hit by chance.
uint64_t new_run_id();

struct RunSettings {
  uint64_t run_id = new_run_id();
  std::string dtype;           // of the whole run
  std::string device;          // non-empty: every secondary uses it (--device on the starter)
  int64_t max_seq_len = 0;
  bool upload_chunks = false;  // push every chunk over HTTP even if the node may have it on disk
  InterpretabilityPlan interpretability;  // the whole run's; each secondary gets the part for its layers
  std::vector<TrainingPlan> training;     // a training run: secondary i's plan; empty for inference
};

class Cluster {
 public:
  Cluster(NodesConfig config, nlohmann::json config_json);
  ~Cluster();  // stops the lease renewals
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // POST /init to every secondary at once; a node that lacks its chunk gets it
  // uploaded. Throws ClusterError naming each node that failed and why. From the
  // first /init until ring_up(), every secondary's lease on the run is renewed
  // (PUT /lease), so nodes whose starter is gone drop the run within
  // timeouts.lease_s instead of waiting for a ring nobody joins.
  void init_all(const ChunkManifest& manifest, const std::filesystem::path& chunk_dir, const RunSettings& settings);
  // The ring is up: its links now tell each node whether the starter lives.
  void ring_up();
  // GET /status of every secondary at once: {"secondary0": {...}, ...}; a node that
  // does not answer within `timeout` gets {"error": ...}.
  nlohmann::json status_all(std::chrono::milliseconds timeout = std::chrono::seconds(5)) const;
  // "secondary 0 (127.0.0.1:8090), ..." for each node whose control plane does not
  // answer: after a broken ring, whichever link broke first, these are the nodes to name.
  // stop_all leaves them alone rather than wait for them again.
  std::string silent_nodes();
  // PUT /stop?run_id=<this run> to every secondary that init_all sent an /init (with
  // reset: they stay up, idle); a node in another starter's run refuses, and one
  // this starter never reached is left alone. Best effort: failures are logged.
  void stop_all(bool keep_nodes);

  // "secondary 1 (127.0.0.1:8090)"
  std::string describe(size_t secondary_index) const;

 private:
  void init_one(size_t index, const ChunkManifest& manifest, const std::filesystem::path& chunk_dir, const RunSettings& settings);
  NodesConfig config_;
  nlohmann::json config_json_;
  uint64_t run_id_ = 0;
  std::vector<char> sent_init_;  // by secondary index; each init_one thread writes its own
  std::vector<char> silent_;     // by secondary index: no answer to its /init, or found by silent_nodes()
  class LeaseRenewal;
  std::unique_ptr<LeaseRenewal> lease_renewal_;
};

}  // namespace mdi
