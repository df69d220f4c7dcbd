#pragma once
// Where every node of a ring lives: MDI-LLM's nodes-config JSON, unchanged.
//
//   {"nodes": {
//      "starter":   {"addr", "communication": {"port"}, "inference": {"port_in", "port_out"}, "device"?},
//      "secondary": [{"addr", "communication": {"starter_addr", "port"},
//                     "inference": {"port_in", "port_out"}, "device"?}, ...]}}
//
// "secondary": [] is a standalone run. A secondary may also be given only its own
// object ({"addr", "communication", "inference", ...}), as MDI-LLM allows.
//
// Optional extensions of ours (MDI-LLM ignores them, so a file stays usable by both):
//   per node           "bind_addr": address to listen on and bind the data sender to
//                                   (default: the node's "addr"; "0.0.0.0" behind NAT or in containers)
//   top level or in "nodes" (not both):
//                      "timeouts": {"connect_s": 30, "accept_s": 30, "receive_s": 10,
//                                   "http_init_s": 60, "heartbeat_s": 1}   (seconds, fractions allowed)
//                      "auth_token": shared secret of the control plane (default: none)
//                      "max_frame_bytes": cap on one frame's payload (default 1 GiB)
// docs/PROTOCOL.md describes what each timeout bounds.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/model/model_config.hpp"  // ConfigError

namespace mdi {

struct NodeEndpoint {
  std::string addr;           // how the other nodes reach this one (IP or host name)
  std::string bind_addr;      // where this node listens; defaults to addr
  uint16_t control_port = 0;  // "communication.port": HTTP control plane
  uint16_t port_in = 0;       // ring: activations arrive here from the previous node
  uint16_t port_out = 0;      // ring: source port of the connection to the next node
  std::string device;         // "" when not given
  std::string starter_addr;   // secondaries only: where their starter is
};

struct RingTimeouts {
  std::chrono::milliseconds connect{30'000};    // connecting to the next node, retries included
  std::chrono::milliseconds accept{30'000};     // waiting for the previous node to connect
  std::chrono::milliseconds receive{10'000};    // silence after which a peer is declared dead
  std::chrono::milliseconds http_init{60'000};  // control-plane initialisation of a secondary
  std::chrono::milliseconds heartbeat{1'000};   // idle time after which a link sends a heartbeat
  // No frame back around the ring for this long, though every link is alive: a node's
  // compute is stuck (heartbeats prove only that its link threads run).
  std::chrono::milliseconds progress{300'000};
  // A secondary between /init and ring up drops a run whose starter has not renewed
  // it for this long (the starter renews every fifth of it).
  std::chrono::milliseconds lease{5'000};
};

inline constexpr uint64_t kDefaultMaxFrameBytes = 1ull << 30;

struct NodesConfig {
  NodeEndpoint starter;
  std::vector<NodeEndpoint> secondaries;
  RingTimeouts timeouts;
  std::string auth_token;
  uint64_t max_frame_bytes = kDefaultMaxFrameBytes;

  size_t n_nodes() const { return 1 + secondaries.size(); }
  // Ring index 0 is the starter, index i is secondary i-1. Throws std::out_of_range.
  const NodeEndpoint& node(size_t ring_index) const;
  size_t next(size_t ring_index) const;
  size_t prev(size_t ring_index) const;
};

// Throws ConfigError naming `where` and the JSON path of the bad field, e.g.
// "config.json: nodes.secondary[1].inference.port_in: expected an integer 1..65535".
NodesConfig parse_nodes_config(const nlohmann::json& j, const std::string& where);
// A nodes-config file's JSON as written (the starter forwards it to the secondaries).
// Throws ConfigError naming the file.
nlohmann::json read_nodes_config_json(const std::filesystem::path& path);
// The control plane's shared secret: MDI_TOKEN when it is set, so that the secret
// need not sit in a file every node reads; else `configured`, the file's.
std::string auth_token_or_env(const std::string& configured);
// The file, parsed, with auth_token_or_env() applied: how every command reads
// --nodes-config. `as_written`, when given, receives the JSON.
NodesConfig load_nodes_config(const std::filesystem::path& path, nlohmann::json* as_written = nullptr);

// A secondary's own object, the form MDI-LLM's secondaries may be started with.
bool is_single_secondary_object(const nlohmann::json& j);
NodeEndpoint parse_secondary_only(const nlohmann::json& j, const std::string& where);

}  // namespace mdi
