#pragma once
// The ring's data plane: full-duplex TCP links carrying frames (common/wire/frame.hpp).
// Activations travel forward; gradients (fine-tuning) travel backward over the same
// sockets, so every link reads and writes. docs/PROTOCOL.md describes the behaviour
// on the wire: handshake, heartbeats, timeouts, limits and failures.
//
// A TcpLink is made by ring setup only (common/net/ring_setup.hpp). Small frames are
// written by the sending thread, others by the link's writer; received frames land
// in the link's inbound queue. When a link
// fails it closes its inbound queue with an error naming the peer and what was
// being done, and calls on_error once.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/net/frame_link.hpp"
#include "common/wire/nodes_config.hpp"

namespace mdi {

struct LinkOptions {
  size_t inbound_capacity = 16;                    // frames; when full, the link stops reading (backpressure)
  size_t outbound_capacity = 16;                   // frames; when full, send() waits
  uint32_t max_tokens = FrameLimits{}.max_tokens;
  // What the run's model allows one frame's payload (e.g. inference_payload_cap()), checked
  // against each received header before its payload is allocated; 0: no such cap.
  // NodesConfig::max_frame_bytes stays the outer limit.
  uint64_t max_payload_bytes = 0;
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

}  // namespace mdi
