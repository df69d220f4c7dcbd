#pragma once
// The ring's data plane: full-duplex TCP links carrying frames (common/wire/frame.hpp),
// and the setup that connects each node to its neighbours the way MDI-LLM does.
//
//   starter --port_out--> port_in secondary 0 --port_out--> ... secondary N-1 --port_out--> port_in starter
//
// Activations travel forward; gradients (fine-tuning) travel backward over the same
// sockets, so every link reads and writes. docs/PROTOCOL.md describes the behaviour
// on the wire: handshake, heartbeats, timeouts, limits and failures.
//
// A TcpLink is made by ring setup only (RingListener::accept_prev, connect_next,
// connect_ring). Small frames are written by the sending thread, others by the
// link's writer; received frames land in the link's inbound queue. When a link
// fails it closes its inbound queue with an error naming the peer and what was
// being done, and calls on_error once.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/net/frame_link.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

// The ring did not come up: listening, connecting, accepting or the Hello exchange failed.
struct RingSetupError : TransportError {
  using TransportError::TransportError;
};

struct LinkOptions {
  size_t inbound_capacity = 16;                    // frames; when full, the link stops reading (backpressure)
  size_t outbound_capacity = 16;                   // frames; when full, send() waits
  uint32_t max_tokens = FrameLimits{}.max_tokens;  // the payload cap is NodesConfig::max_frame_bytes
  // Called once, with the link's error, from one of the link's threads or from the
  // send() whose write failed. It may call close() but must not destroy the link.
  std::function<void(const std::string& error)> on_error;
  // When set and it becomes true, ring setup (connect_ring, connect_next) gives up
  // within about a second with RingSetupError "cancelled": a node told to stop
  // must not sit out the connect and accept timeouts.
  const std::atomic<bool>* setup_cancel = nullptr;
};

class TcpLink : public FrameLink {
 public:
  struct Impl;
  explicit TcpLink(std::unique_ptr<Impl> impl);  // ring setup builds links; Impl is private to link.cpp
  ~TcpLink() override;                           // close(), then waits for the link's threads
  TcpLink(const TcpLink&) = delete;
  TcpLink& operator=(const TcpLink&) = delete;

  // Written at once on the caller's thread when the frame is small (64 KiB of payload
  // at most) and nothing is queued ahead of it, else queued for the writer. The header
  // is checked with the peer's rules first (ProtocolError: a bug of the caller). After
  // a RunStop the link half-closes.
  void send(Frame frame, std::chrono::milliseconds timeout) override;
  BoundedQueue<Frame>& inbound() override;  // heartbeats removed
  bool flush(std::chrono::milliseconds timeout) override;  // handed to the kernel
  void close() override;
  std::string error() const override;
  LinkStats stats() const override;
  const std::string& peer() const override;

 private:
  std::unique_ptr<Impl> impl_;
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
