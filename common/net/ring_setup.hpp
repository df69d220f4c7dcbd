#pragma once
// Connects each node of the ring to its neighbours the way MDI-LLM does, over
// TcpLinks (common/net/link.hpp):
//
//   starter --port_out--> port_in secondary 0 --port_out--> ... secondary N-1 --port_out--> port_in starter
//
// Each connection opens with three Hellos (ring index, ring size, run id, a nonce and
// a proof): the connecting node's, the accepting node's, proving the ring's auth_token
// over both nonces, and the connecting node's again, proving it too. So a stranger,
// a node of another run, or one without the token is turned away (docs/PROTOCOL.md).
#include <cstdint>
#include <memory>
#include <string>

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

enum class HelloRole : uint8_t { connector = 1, acceptor = 2 };

// What a Hello proves: HMAC-SHA256 under `token` of the sender's role, the run, who
// sends it to whom, and both ends' nonces, the sender's first. With no token the key is
// empty: the exchange is the same but proves nothing, as the ring is then open anyway.
HelloProof hello_proof(const std::string& token, HelloRole sender_role, uint64_t run_id, uint32_t sender, uint32_t receiver,
                       const HelloNonce& sender_nonce, const HelloNonce& receiver_nonce);
// 16 bytes from the kernel's random source.
HelloNonce new_hello_nonce();

// Both halves at once (accepting on a second thread), so that every node may call
// this at about the same time, in any order. Needs at least 2 nodes. Throws
// RingSetupError; nothing stays open when it throws.
RingLinks connect_ring(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                       const LinkOptions& options = {});

}  // namespace mdi
