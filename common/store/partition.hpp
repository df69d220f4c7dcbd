#pragma once
// How a model's layers are split over the nodes of a ring, and the manifest
// that records the split beside the chunk files.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model/model_config.hpp"

namespace mdi {

struct PartitionError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The work of the starter's final norm and LM head, in units of one decoder
// layer (their weights are read once per token, like a layer's).
double head_cost_in_layers(const ModelConfig& config);

// Layer counts per node (node 0 is the starter) that minimise the slowest
// node's time, where node i runs at relative speed weights[i] and the starter
// also runs the head. Every node gets at least one layer.
std::vector<int64_t> balanced_layer_counts(const ModelConfig& config, size_t n_nodes, const std::vector<double>& weights = {});

// Checks explicit counts: one per node, each >= 1, summing to n_layers.
void check_layer_counts(const ModelConfig& config, size_t n_nodes, const std::vector<int64_t>& counts);

struct ChunkEntry {
  std::string role;  // "starter" | "secondary"
  int64_t index = 0;  // 0 for the starter; the secondary's index among secondaries
  std::string file;   // relative to the manifest's directory
  int64_t layer_begin = 0, layer_end = 0;  // half-open, global numbering
  bool embedding = false;
  bool head = false;
  uint64_t bytes = 0;
  std::string sha256;
};

struct ChunkManifest {
  ModelConfig model;
  std::string dtype;  // "float32" | "bfloat16" | "float16"
  std::vector<ChunkEntry> nodes;  // starter first, then secondaries in order

  const ChunkEntry& starter() const;
  const ChunkEntry& secondary(int64_t index) const;  // throws naming the index and the node count

  std::string to_json() const;
  static ChunkManifest load(const std::filesystem::path& path);
};

// <model dir>/chunks/<N>nodes/manifest.json
std::filesystem::path manifest_path(const std::filesystem::path& model_dir, size_t n_nodes);

// A readable table of the split, one line per node.
std::string partition_table(const ChunkManifest& manifest);

}  // namespace mdi
