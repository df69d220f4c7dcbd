#pragma once
// The body of POST /init: everything a secondary needs to join a run. The
// starter builds it; the secondary validates every field before acting on it.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "common/interp/interventions.hpp"
#include "common/model/model_config.hpp"
#include "common/train/plan.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

struct InitRequestError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct InitRequest {
  uint64_t run_id = 0;         // the same for every node of one run; Hello frames carry it
  size_t ring_index = 0;       // 1 .. n_nodes-1: secondary ring_index-1
  nlohmann::json nodes_json;   // the nodes-config as the starter read it
  NodesConfig nodes;           // the same, parsed: the ring's addresses, ports and timeouts
  ModelConfig model;
  int64_t layer_begin = 0, layer_end = 0;  // half-open, global numbering
  std::string dtype;           // "float32" | "bfloat16" | "float16"
  std::string device;          // empty: the secondary's own choice
  int64_t max_seq_len = 0;     // context cap for this run (<= model.max_seq_len)
  std::string chunk_sha256;    // the chunk the node must hold, by content
  std::string chunk_path;      // where it lies on the secondary's disk, if pre-distributed
  uint64_t chunk_bytes = 0;    // its size, as the manifest states it (0: not stated)
  // What the node's links accept in one frame (0: the nodes-config's); parse() applies it to `nodes`.
  uint64_t max_frame_bytes = 0;
  // Non-zero: the node drops the run if the starter has not renewed it (PUT /lease) for
  // this long before the ring is up: a starter that died or gave up leaves no node waiting.
  uint64_t lease_ms = 0;
  // Optional: the captures and interventions of this node's layers (absent: none).
  InterpretabilityPlan interpretability;
  // Optional: fine-tune this node's layers instead of running inference (absent: inference).
  std::optional<TrainingPlan> training;

  nlohmann::json to_json() const;
  // Throws InitRequestError naming the field and the problem.
  static InitRequest parse(const nlohmann::json& j);
};

}  // namespace mdi
