#include "common/wire/nodes_config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/wire/json_excerpt.hpp"

namespace mdi {
namespace {

using nlohmann::json;

// Every error names the source and the JSON path of the field, so a user with a
// 3-node file knows which line to fix.
class FieldReader {
 public:
  explicit FieldReader(std::string where) : where_(std::move(where)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& message) const {
    throw ConfigError(where_ + ": " + (path.empty() ? std::string("(top level)") : path) + ": " + message);
  }

  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

  const json& object(const json& parent, const std::string& key, const std::string& path) const {
    const json& value = required(parent, key, path);
    if (!value.is_object()) fail(join(path, key), "expected an object");
    return value;
  }

  std::string string(const json& parent, const std::string& key, const std::string& path) const {
    const json& value = required(parent, key, path);
    if (!value.is_string() || value.get_ref<const std::string&>().empty())
      fail(join(path, key), "expected a non-empty string");
    return value.get<std::string>();
  }

  std::string optional_string(const json& parent, const std::string& key, const std::string& path,
                              std::string fallback) const {
    return parent.contains(key) ? string(parent, key, path) : std::move(fallback);
  }

  uint16_t port(const json& parent, const std::string& key, const std::string& path) const {
    const json& value = required(parent, key, path);
    if (!value.is_number_integer() || value.get<int64_t>() < 1 || value.get<int64_t>() > 65535)
      fail(join(path, key), "expected an integer 1..65535, got " + json_excerpt(value));
    return static_cast<uint16_t>(value.get<int64_t>());
  }

  std::chrono::milliseconds seconds(const json& parent, const std::string& key, const std::string& path) const {
    // A day is far beyond any sensible timeout and keeps the conversion far from overflow.
    constexpr double kMaxSeconds = 86400;
    const json& value = parent.at(key);
    if (!value.is_number() || !(value.get<double>() > 0) || value.get<double>() > kMaxSeconds)
      fail(join(path, key), "expected a number of seconds in (0, 86400], got " + json_excerpt(value));
    return std::chrono::milliseconds(std::max<int64_t>(1, std::llround(value.get<double>() * 1000)));
  }

 private:
  const json& required(const json& parent, const std::string& key, const std::string& path) const {
    if (!parent.contains(key)) fail(join(path, key), "missing required field");
    return parent.at(key);
  }

  std::string where_;
};

std::string secondary_path(size_t i) { return "nodes.secondary[" + std::to_string(i) + "]"; }

enum class NodeRole { Starter, Secondary };

NodeEndpoint parse_endpoint(const FieldReader& in, const json& j, const std::string& path, NodeRole role) {
  if (!j.is_object()) in.fail(path, "expected an object");
  NodeEndpoint node;
  node.addr = in.string(j, "addr", path);
  node.bind_addr = in.optional_string(j, "bind_addr", path, node.addr);
  node.device = j.contains("device") ? in.string(j, "device", path) : "";

  const std::string communication_path = FieldReader::join(path, "communication");
  const json& communication = in.object(j, "communication", path);
  node.control_port = in.port(communication, "port", communication_path);
  if (role == NodeRole::Secondary) node.starter_addr = in.string(communication, "starter_addr", communication_path);

  const std::string inference_path = FieldReader::join(path, "inference");
  const json& inference = in.object(j, "inference", path);
  node.port_in = in.port(inference, "port_in", inference_path);
  node.port_out = in.port(inference, "port_out", inference_path);
  return node;
}

// The extensions may sit at the top level (next to "nodes") or inside "nodes";
// nullptr when absent, an error when given in both places.
const json* find_extension(const FieldReader& in, const json& root, const std::string& key, std::string& path) {
  const json& nodes = root.at("nodes");
  const bool top = root.contains(key), inner = nodes.contains(key);
  if (top && inner) in.fail(key, "given both at the top level and in \"nodes\"; keep one");
  if (top) {
    path = key;
    return &root.at(key);
  }
  if (inner) {
    path = "nodes." + key;
    return &nodes.at(key);
  }
  return nullptr;
}

RingTimeouts parse_timeouts(const FieldReader& in, const json& j, const std::string& path) {
  if (!j.is_object()) in.fail(path, "expected an object");
  RingTimeouts t;
  const std::pair<const char*, std::chrono::milliseconds*> fields[] = {{"connect_s", &t.connect},
                                                                       {"accept_s", &t.accept},
                                                                       {"receive_s", &t.receive},
                                                                       {"http_init_s", &t.http_init},
                                                                       {"heartbeat_s", &t.heartbeat},
                                                                       {"progress_s", &t.progress},
                                                                       {"lease_s", &t.lease}};
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    auto* field = std::find_if(std::begin(fields), std::end(fields), [&](const auto& f) { return key == f.first; });
    // A misspelt timeout silently falling back to its default would be found only in production.
    if (field == std::end(fields))
      in.fail(FieldReader::join(path, key),
              "unknown timeout (known: connect_s, accept_s, receive_s, http_init_s, heartbeat_s, progress_s, lease_s)");
    *field->second = in.seconds(j, key, path);
  }
  // A link idle for `heartbeat` sends one; it must do so well before the peer gives up.
  if (t.heartbeat * 2 > t.receive)
    in.fail(FieldReader::join(path, "heartbeat_s"),
            "must be at most half of receive_s (" + std::to_string(t.heartbeat.count()) + " ms vs " +
                std::to_string(t.receive.count()) + " ms), or idle links would be declared dead");
  // Renewed every fifth of it, and /init refuses a shorter one.
  if (t.lease < std::chrono::milliseconds(500))
    in.fail(FieldReader::join(path, "lease_s"), "must be at least 0.5 s (" + std::to_string(t.lease.count()) + " ms given)");
  return t;
}

// Two sockets of one address cannot listen on (or bind) the same port.
// `nodes`: each node with the JSON path it was read from.
void check_port_conflicts(const FieldReader& in,
                          const std::vector<std::pair<const NodeEndpoint*, std::string>>& nodes) {
  std::map<std::pair<std::string, uint16_t>, std::string> owner;  // (addr, port) -> JSON path
  auto claim = [&](const std::string& addr, uint16_t port, const std::string& path) {
    auto [it, inserted] = owner.emplace(std::make_pair(addr, port), path);
    if (!inserted) in.fail(path, "port " + std::to_string(port) + " on " + addr + " is already used by " + it->second);
  };
  for (const auto& [node, path] : nodes) {
    claim(node->addr, node->control_port, FieldReader::join(path, "communication.port"));
    claim(node->addr, node->port_in, FieldReader::join(path, "inference.port_in"));
    claim(node->addr, node->port_out, FieldReader::join(path, "inference.port_out"));
  }
}

}  // namespace

static void require_ring_index(const NodesConfig& config, size_t ring_index) {
  if (ring_index >= config.n_nodes())
    throw std::out_of_range("ring index " + std::to_string(ring_index) + " is out of range for " +
                            std::to_string(config.n_nodes()) + " nodes");
}

const NodeEndpoint& NodesConfig::node(size_t ring_index) const {
  require_ring_index(*this, ring_index);
  return ring_index == 0 ? starter : secondaries[ring_index - 1];
}

size_t NodesConfig::next(size_t ring_index) const {
  require_ring_index(*this, ring_index);
  return (ring_index + 1) % n_nodes();
}

size_t NodesConfig::prev(size_t ring_index) const {
  require_ring_index(*this, ring_index);
  return (ring_index + n_nodes() - 1) % n_nodes();
}

NodesConfig parse_nodes_config(const json& j, const std::string& where) {
  FieldReader in(where);
  if (!j.is_object()) in.fail("", "expected a JSON object");
  if (!j.contains("nodes") && is_single_secondary_object(j))
    in.fail("nodes", "missing; this looks like a single secondary's object, which only a secondary accepts");
  const json& nodes = in.object(j, "nodes", "");

  NodesConfig config;
  config.starter = parse_endpoint(in, in.object(nodes, "starter", "nodes"), "nodes.starter", NodeRole::Starter);
  if (!nodes.contains("secondary") || !nodes.at("secondary").is_array())
    in.fail("nodes.secondary", "expected an array (use [] for a standalone run)");
  const json& secondaries = nodes.at("secondary");
  for (size_t i = 0; i < secondaries.size(); ++i)
    config.secondaries.push_back(parse_endpoint(in, secondaries[i], secondary_path(i), NodeRole::Secondary));

  std::string path;
  if (const json* timeouts = find_extension(in, j, "timeouts", path))
    config.timeouts = parse_timeouts(in, *timeouts, path);
  if (const json* token = find_extension(in, j, "auth_token", path)) {
    if (!token->is_string()) in.fail(path, "expected a string");
    config.auth_token = token->get<std::string>();
  }
  if (const json* max_bytes = find_extension(in, j, "max_frame_bytes", path)) {
    if (!max_bytes->is_number_integer() || max_bytes->get<int64_t>() <= 0)
      in.fail(path, "expected a positive integer, got " + json_excerpt(*max_bytes));
    config.max_frame_bytes = max_bytes->get<uint64_t>();
  }
  std::vector<std::pair<const NodeEndpoint*, std::string>> all_nodes{{&config.starter, "nodes.starter"}};
  for (size_t i = 0; i < config.secondaries.size(); ++i)
    all_nodes.emplace_back(&config.secondaries[i], secondary_path(i));
  check_port_conflicts(in, all_nodes);
  return config;
}

json read_nodes_config_json(const std::filesystem::path& path) {
  std::ifstream file(path);
  if (!file) throw ConfigError(path.string() + ": cannot open the nodes-config file");
  try {
    return json::parse(file);
  } catch (const json::parse_error& e) {
    throw ConfigError(path.string() + ": invalid JSON: " + e.what());
  }
}

std::string auth_token_or_env(const std::string& configured) {
  const char* token = std::getenv("MDI_TOKEN");
  return token && *token ? token : configured;
}

NodesConfig load_nodes_config(const std::filesystem::path& path, json* as_written) {
  json j = read_nodes_config_json(path);
  NodesConfig config = parse_nodes_config(j, path.string());
  config.auth_token = auth_token_or_env(config.auth_token);
  if (as_written) *as_written = std::move(j);
  return config;
}

bool is_single_secondary_object(const json& j) {
  return j.is_object() && !j.contains("nodes") && j.contains("addr") && j.contains("inference");
}

NodeEndpoint parse_secondary_only(const json& j, const std::string& where) {
  FieldReader in(where);
  NodeEndpoint node = parse_endpoint(in, j, "", NodeRole::Secondary);
  check_port_conflicts(in, {{&node, ""}});
  return node;
}

}  // namespace mdi
