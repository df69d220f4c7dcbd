#pragma once
// The starter's side of the control plane: brings every secondary into a run
// (POST /init, uploading chunks a node lacks), reads their figures, and ends
// the run (PUT /stop, or back to idle with --keep-nodes).
#include <filesystem>
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

  // POST /init to every secondary at once; a node that lacks its chunk gets it
  // uploaded. Throws ClusterError naming each node that failed and why.
  void init_all(const ChunkManifest& manifest, const std::filesystem::path& chunk_dir, const RunSettings& settings);
  // GET /status of every secondary: {"secondary0": {...}, ...}; an unreachable node gets {"error": ...}.
  nlohmann::json status_all() const;
  // PUT /stop?run_id=<this run> to every secondary that init_all sent an /init (with
  // reset: they stay up, idle); a node in another starter's run refuses, and one
  // this starter never reached is left alone. Best effort: failures are logged.
  void stop_all(bool keep_nodes) const;

  // "secondary 1 (127.0.0.1:8090)"
  std::string describe(size_t secondary_index) const;

 private:
  void init_one(size_t index, const ChunkManifest& manifest, const std::filesystem::path& chunk_dir, const RunSettings& settings);
  NodesConfig config_;
  nlohmann::json config_json_;
  uint64_t run_id_ = 0;
  std::vector<char> sent_init_;  // by secondary index; each init_one thread writes its own
};

}  // namespace mdi
