#pragma once
// Connects each node of the ring to its neighbours the way MDI-LLM does, over
// TcpLinks (common/net/link.hpp):
//
//   starter --port_out--> port_in secondary 0 --port_out--> ... secondary N-1 --port_out--> port_in starter
//
// Each connection opens with a Hello in both directions (ring index, ring size,
// run id), so a stranger or a node of another run is turned away.
#include <cstdint>
#include <memory>

#include "common/net/link.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

// The ring did not come up: listening, connecting, accepting or the Hello exchange failed.
struct RingSetupError : TransportError {
  using TransportError::TransportError;
};

// Listens on this node's bind_addr:port_in. Created before connecting out, so that
// a previous node connecting early finds the port open.
class RingListener {
 public:
  // Throws RingSetupError when the address cannot be resolved or bound.
  RingListener(const NodesConfig& config, size_t my_ring_index);
  ~RingListener();
  RingListener(const RingListener&) = delete;
  RingListener& operator=(const RingListener&) = delete;

  // Accepts the previous node only: remote address = its addr, remote port = its
  // port_out. Any other connection is logged and closed. The previous node's Hello
  // must carry its ring index, the ring size and run_id; ours is sent back. Gives up
  // after timeouts.accept (RingSetupError naming the node and the last rejection).
  std::unique_ptr<TcpLink> accept_prev(uint64_t run_id, const LinkOptions& options);

  // Makes a pending or later accept_prev() give up at once. Callable from any thread.
  void cancel();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Connects from this node's bind_addr:port_out to the next node's port_in, retrying
// while the next node is not listening yet, for up to timeouts.connect; then sends
// our Hello and checks the next node's. Throws RingSetupError naming address:port.
std::unique_ptr<TcpLink> connect_next(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                                   const LinkOptions& options);

// Both halves at once (accepting on a second thread), so that every node may call
// this at about the same time, in any order. Needs at least 2 nodes. Throws
// RingSetupError; nothing stays open when it throws.
RingLinks connect_ring(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                       const LinkOptions& options = {});

}  // namespace mdi
