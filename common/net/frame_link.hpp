#pragma once
// One end of a full-duplex connection carrying frames to and from one peer. The
// ring's loops and training see their links only through this, so they run alike
// over TCP (TcpLink, common/net/link.hpp) and over an in-process pair
// (common/net/in_process_link.hpp), which is how their scheduling is tested
// without sockets.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/net/bounded_queue.hpp"
#include "common/wire/frame.hpp"

namespace mdi {

struct TransportError : std::runtime_error {
  using std::runtime_error::runtime_error;
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

class FrameLink {
 public:
  virtual ~FrameLink() = default;

  // Sends `frame`, waiting up to `timeout` for room. Throws LinkError if the link
  // failed or was closed, or stayed full. Hello and Heartbeat frames are the link's
  // own business (std::invalid_argument). After a RunStop the link sends nothing more.
  virtual void send(Frame frame, std::chrono::milliseconds timeout) = 0;

  // Frames from the peer. Closed when the link ends: with error() when it failed,
  // with an empty error after close() or an orderly end.
  virtual BoundedQueue<Frame>& inbound() = 0;

  // Waits until every frame sent so far was handed on; false on timeout or when
  // the link stopped writing first.
  virtual bool flush(std::chrono::milliseconds timeout) = 0;

  // Ends the link now: frames not yet handed on are dropped, nothing is reported.
  // Idempotent, callable from any thread.
  virtual void close() = 0;

  virtual std::string error() const = 0;  // "" unless the link failed
  virtual LinkStats stats() const = 0;
  virtual const std::string& peer() const = 0;  // e.g. "ring index 1 (127.0.0.1:5090)"

  // The next frame from the peer, waiting up to `timeout`; nullopt when none came in
  // time. Frames that arrived before the link ended are still handed out; after them
  // it throws LinkError: the link's error, or that the link with peer() closed.
  std::optional<Frame> receive(std::chrono::milliseconds timeout);
  // The next frame, until `cancel` is set or `give_up_after` has passed (nullopt then;
  // the flag is looked at every 100 ms). The time spent waiting is added to `waited_s`.
  // Never waits unbounded on a silent peer: a link fails after its receive timeout.
  std::optional<Frame> receive(const std::atomic<bool>& cancel, double& waited_s,
                               std::chrono::milliseconds give_up_after = std::chrono::milliseconds::max());
};

// A node's two links in the ring: activations come in from the previous node and
// go out to the next; gradients travel the other way over the same two.
struct RingLinks {
  std::unique_ptr<FrameLink> from_prev;  // accepted on port_in
  std::unique_ptr<FrameLink> to_next;    // connected from port_out
};

// Ends a run: a RunStop to the next node, then waits up to `timeout` for it to come
// back from the previous one, which it does once every node has passed it on, so the
// ring is drained; frames ahead of it are dropped. Throws LinkError when it does not.
void stop_ring_run(RingLinks& links, std::chrono::milliseconds send_timeout, std::chrono::milliseconds timeout);

}  // namespace mdi
