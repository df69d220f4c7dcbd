#include "common/store/partition.hpp"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace mdi {

double head_cost_in_layers(const ModelConfig& c) {
  const double layer = static_cast<double>(2 * c.dim * c.dim + 2 * c.dim * c.kv_dim() + 3 * c.dim * c.hidden_dim);
  return static_cast<double>(c.vocab_size * c.dim) / layer;
}

static void check_node_count(const ModelConfig& c, size_t n_nodes) {
  if (n_nodes == 0) throw PartitionError("the node count must be at least 1");
  if (static_cast<int64_t>(n_nodes) > c.n_layers)
    throw PartitionError("cannot split " + std::to_string(c.n_layers) + " layers over " + std::to_string(n_nodes) +
                         " nodes: every node needs at least one layer");
}

std::vector<int64_t> balanced_layer_counts(const ModelConfig& c, size_t n_nodes, const std::vector<double>& weights_in) {
  check_node_count(c, n_nodes);
  std::vector<double> weights = weights_in.empty() ? std::vector<double>(n_nodes, 1.0) : weights_in;
  if (weights.size() != n_nodes)
    throw PartitionError("--node-weights gives " + std::to_string(weights.size()) + " weights for " + std::to_string(n_nodes) + " nodes");
  for (double w : weights)
    if (!(w > 0)) throw PartitionError("node weights must be positive, got " + std::to_string(w));
  const double head = head_cost_in_layers(c);
  auto time_with = [&](const std::vector<int64_t>& counts, size_t i, int64_t extra) {
    return (static_cast<double>(counts[i] + extra) + (i == 0 ? head : 0.0)) / weights[i];
  };
  // Unit jobs on machines of different speeds: giving each next layer to the
  // node that would finish it first minimises the slowest node's time.
  std::vector<int64_t> counts(n_nodes, 1);
  for (int64_t assigned = static_cast<int64_t>(n_nodes); assigned < c.n_layers; ++assigned) {
    size_t best = n_nodes - 1;
    for (size_t i = n_nodes; i-- > 0;)
      if (time_with(counts, i, 1) < time_with(counts, best, 1) - 1e-12) best = i;
    ++counts[best];
  }
  return counts;
}

void check_layer_counts(const ModelConfig& c, size_t n_nodes, const std::vector<int64_t>& counts) {
  check_node_count(c, n_nodes);
  if (counts.size() != n_nodes)
    throw PartitionError("--layers gives " + std::to_string(counts.size()) + " counts for " + std::to_string(n_nodes) + " nodes");
  int64_t total = 0;
  for (auto n : counts) {
    if (n < 1) throw PartitionError("--layers: every node needs at least one layer, got " + std::to_string(n));
    total += n;
  }
  if (total != c.n_layers)
    throw PartitionError("--layers counts sum to " + std::to_string(total) + ", the model has " + std::to_string(c.n_layers) + " layers");
}

const ChunkEntry& ChunkManifest::starter() const {
  for (auto& n : nodes)
    if (n.role == "starter") return n;
  throw std::runtime_error("manifest has no starter chunk");
}

const ChunkEntry& ChunkManifest::secondary(int64_t index) const {
  for (auto& n : nodes)
    if (n.role == "secondary" && n.index == index) return n;
  throw std::runtime_error("manifest has no chunk for secondary " + std::to_string(index) + " (it splits the model over " +
                           std::to_string(nodes.size()) + " nodes)");
}

std::string ChunkManifest::to_json() const {
  nlohmann::json j;
  j["model"] = model.to_hf_json();
  j["dtype"] = dtype;
  j["n_nodes"] = nodes.size();
  j["nodes"] = nlohmann::json::array();
  for (auto& n : nodes)
    j["nodes"].push_back({{"role", n.role},
                          {"index", n.index},
                          {"file", n.file},
                          {"layers", {n.layer_begin, n.layer_end}},
                          {"embedding", n.embedding},
                          {"head", n.head},
                          {"bytes", n.bytes},
                          {"sha256", n.sha256}});
  return j.dump(2) + "\n";
}

ChunkManifest ChunkManifest::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot open (run prepare_model for this node count first)");
  ChunkManifest m;
  try {
    auto j = nlohmann::json::parse(in);
    m.model = ModelConfig::from_hf_json(j.at("model"), path.string() + ": model");
    m.dtype = j.at("dtype").get<std::string>();
    for (auto& n : j.at("nodes")) {
      ChunkEntry e;
      e.role = n.at("role").get<std::string>();
      e.index = n.at("index").get<int64_t>();
      e.file = n.at("file").get<std::string>();
      e.layer_begin = n.at("layers").at(0).get<int64_t>();
      e.layer_end = n.at("layers").at(1).get<int64_t>();
      e.embedding = n.at("embedding").get<bool>();
      e.head = n.at("head").get<bool>();
      e.bytes = n.at("bytes").get<uint64_t>();
      e.sha256 = n.at("sha256").get<std::string>();
      if (std::filesystem::path(e.file).has_parent_path()) throw std::runtime_error("chunk file \"" + e.file + "\" is not a plain file name");
      m.nodes.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path.string() + ": malformed manifest: " + e.what());
  }
  return m;
}

std::filesystem::path manifest_path(const std::filesystem::path& model_dir, size_t n_nodes) {
  return model_dir / "chunks" / (std::to_string(n_nodes) + "nodes") / "manifest.json";
}

std::string partition_table(const ChunkManifest& m) {
  std::ostringstream out;
  out << "node         layers        count  holds                 size\n";
  for (auto& n : m.nodes) {
    std::string name = n.role == "starter" ? "starter" : "secondary" + std::to_string(n.index);
    std::string holds = std::string(n.embedding ? "embedding " : "") + (n.head ? "norm+head" : "");
    char line[200];
    std::snprintf(line, sizeof line, "%-12s [%3lld, %3lld)   %5lld  %-20s %8.1f MiB\n", name.c_str(), (long long)n.layer_begin,
                  (long long)n.layer_end, (long long)(n.layer_end - n.layer_begin), holds.c_str(), double(n.bytes) / (1 << 20));
    out << line;
  }
  return out.str();
}

}  // namespace mdi
