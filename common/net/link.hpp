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
// A Link is made by ring setup only (RingListener::accept_prev, connect_next,
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

#include "common/net/bounded_queue.hpp"
#include "common/wire/frame.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

struct TransportError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The ring did not come up: listening, connecting, accepting or the Hello exchange failed.
struct RingSetupError : TransportError {
  using TransportError::TransportError;
};
// An established link failed, was closed, or could not take a frame in time.
struct LinkError : TransportError {
  using TransportError::TransportError;
};

struct LinkStats {
  uint64_t frames_in = 0, frames_out = 0;  // heartbeats not included
  uint64_t bytes_in = 0, bytes_out = 0;    // headers and heartbeats included
  uint64_t heartbeats_in = 0, heartbeats_out = 0;
};

struct LinkOptions {
  size_t inbound_capacity = 16;                    // frames; when full, the link stops reading (backpressure)
  size_t outbound_capacity = 16;                   // frames; when full, send() waits
  uint32_t max_tokens = FrameLimits{}.max_tokens;  // the payload cap is NodesConfig::max_frame_bytes
  // Called once, with the link's error, from one of the link's threads or from the
  // send() whose write failed. It may call Link::close() but must not destroy the link.
  std::function<void(const std::string& error)> on_error;
  // When set and it becomes true, ring setup (connect_ring, connect_next) gives up
  // within about a second with RingSetupError "cancelled": a node told to stop
  // must not sit out the connect and accept timeouts.
  const std::atomic<bool>* setup_cancel = nullptr;
};

class Link {
 public:
  struct Impl;
  explicit Link(std::unique_ptr<Impl> impl);  // ring setup builds links; Impl is private to transport.cpp
  ~Link();                                    // close(), then waits for the link's threads
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  // Sends `frame`: written at once on the caller's thread when it is small (64 KiB
  // of payload at most) and nothing is queued ahead of it, else queued for the
  // writer, waiting up to `timeout` for room. The header is checked with the peer's
  // rules first (ProtocolError: a bug of the caller). Throws LinkError if the link
  // failed or was closed, or the queue stayed full.
  // Hello and Heartbeat frames are the link's own business (std::invalid_argument).
  // After a RunStop the link sends nothing more and half-closes.
  void send(Frame frame, std::chrono::milliseconds timeout);

  // Frames from the peer, heartbeats removed. Closed when the link ends: with
  // error() when it failed, with an empty error after close() or an orderly end.
  BoundedQueue<Frame>& inbound();

  // Waits until every frame queued so far was handed to the kernel; false on timeout
  // or when the writer stopped first.
  bool flush(std::chrono::milliseconds timeout);

  // Ends the link now: frames not yet written are dropped, nothing is reported.
  // Idempotent, callable from any thread.
  void close();

  std::string error() const;  // "" unless the link failed
  LinkStats stats() const;
  const std::string& peer() const;  // e.g. "ring index 1 (127.0.0.1:5090)"

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
  std::unique_ptr<Link> accept_prev(uint64_t run_id, const LinkOptions& options);

  // Makes a pending or later accept_prev() give up at once. Callable from any thread.
  void cancel();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Connects from this node's bind_addr:port_out to the next node's port_in, retrying
// while the next node is not listening yet, for up to timeouts.connect; then sends
// our Hello and checks the next node's. Throws RingSetupError naming address:port.
std::unique_ptr<Link> connect_next(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                                   const LinkOptions& options);

struct RingLinks {
  std::unique_ptr<Link> from_prev;  // accepted on port_in
  std::unique_ptr<Link> to_next;    // connected from port_out
};

// Both halves at once (accepting on a second thread), so that every node may call
// this at about the same time, in any order. Needs at least 2 nodes. Throws
// RingSetupError; nothing stays open when it throws.
RingLinks connect_ring(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                       const LinkOptions& options = {});

}  // namespace mdi
