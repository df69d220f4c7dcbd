// libFuzzer target: the nodes-config parser (common/wire/nodes_config.cpp). Arbitrary
// bytes are parsed as JSON (invalid JSON stops there, as load_nodes_config turns it
// into a ConfigError), then given to parse_nodes_config and parse_secondary_only.
// The only exceptions allowed out are ConfigError and nlohmann's own; anything
// else escaping reaches libFuzzer as a crash. A config that parses must satisfy
// what nodes_config.hpp promises.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/wire/nodes_config.hpp"

namespace {

[[noreturn]] void bug(const char* what) {
  std::fprintf(stderr, "fuzz_nodes_config: %s\n", what);
  std::abort();
}
void check(bool ok, const char* what) {
  if (!ok) bug(what);
}

void check_endpoint(const mdi::NodeEndpoint& n, bool secondary) {
  check(!n.addr.empty() && !n.bind_addr.empty(), "empty addr or bind_addr");
  check(n.control_port != 0 && n.port_in != 0 && n.port_out != 0, "port 0 accepted");
  check(!secondary || !n.starter_addr.empty(), "secondary without starter_addr");
}

void check_config(const mdi::NodesConfig& c) {
  check_endpoint(c.starter, false);
  std::set<std::pair<std::string, uint16_t>> used;
  for (size_t i = 0; i < c.n_nodes(); ++i) {
    const mdi::NodeEndpoint& n = c.node(i);
    check_endpoint(n, i != 0);
    for (uint16_t port : {n.control_port, n.port_in, n.port_out})
      check(used.emplace(n.addr, port).second, "two sockets on one address and port accepted");
    check(c.prev(c.next(i)) == i, "prev(next(i)) != i");
  }
  try {
    c.node(c.n_nodes());
    bug("node(n_nodes) did not throw");
  } catch (const std::out_of_range&) {
  }
  const mdi::RingTimeouts& t = c.timeouts;
  for (auto ms : {t.connect, t.accept, t.receive, t.http_init, t.heartbeat})
    check(ms.count() >= 1 && ms.count() <= 86'400'000, "timeout outside (0, 1 day]");
  check(t.heartbeat * 2 <= t.receive, "heartbeat longer than half of receive");
  check(c.max_frame_bytes > 0 && c.max_frame_bytes <= uint64_t{INT64_MAX}, "max_frame_bytes not positive");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    check_config(mdi::parse_nodes_config(j, "fuzz"));
  } catch (const mdi::ConfigError&) {
  } catch (const nlohmann::json::exception&) {
  }
  try {
    const bool single = mdi::is_single_secondary_object(j);
    const mdi::NodeEndpoint n = mdi::parse_secondary_only(j, "fuzz");
    check(single, "parse_secondary_only accepted what is_single_secondary_object rejects");
    check_endpoint(n, true);
  } catch (const mdi::ConfigError&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
