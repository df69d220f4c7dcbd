#pragma once
// Both ends of a link inside one process: what one end sends, the other receives,
// in order, through bounded queues like a TcpLink's (a full queue makes send()
// wait). It is the ring without sockets, so that scheduling (the ring's loops,
// training, batching) is tested with threads alone, and a peer's failure is one
// call: fail() ends both ends with an error, as a dead peer's socket would.
#include <memory>
#include <string>

#include "common/net/frame_link.hpp"

namespace mdi {

class InProcessLink : public FrameLink {
 public:
  struct Shared;
  InProcessLink(std::shared_ptr<Shared> shared, int side);
  ~InProcessLink() override;

  void send(Frame frame, std::chrono::milliseconds timeout) override;
  BoundedQueue<Frame>& inbound() override;
  bool flush(std::chrono::milliseconds timeout) override;  // every sent frame is queued at the peer at once
  void close() override;                                    // ends both ends, without an error
  std::string error() const override;
  LinkStats stats() const override;
  const std::string& peer() const override;

  // Ends both ends with `error`, as a link whose peer died: each end's error() is
  // `error`, queued frames are still received, then receive() throws it.
  void fail(const std::string& error);

 private:
  std::shared_ptr<Shared> shared_;
  int side_;  // 0 or 1: which end of `shared_` this is
};

struct InProcessLinkPair {
  std::unique_ptr<InProcessLink> a, b;
};
// a's peer() is `b_name` and b's is `a_name`. `capacity`: frames each direction holds.
InProcessLinkPair make_in_process_link(const std::string& a_name, const std::string& b_name, size_t capacity = 16);

}  // namespace mdi
