#include "common/net/in_process_link.hpp"

#include <mutex>

namespace mdi {

struct InProcessLink::Shared {
  Shared(std::string a_name, std::string b_name, size_t capacity)
      : names{std::move(a_name), std::move(b_name)}, to{BoundedQueue<Frame>(capacity), BoundedQueue<Frame>(capacity)} {}

  void end(const std::string& why) {
    {
      std::lock_guard lock(mutex);
      if (ended) return;
      ended = true;
      error = why;
    }
    to[0].close_with_error(why);
    to[1].close_with_error(why);
  }

  const std::string names[2];
  BoundedQueue<Frame> to[2];  // to[i]: the frames end i receives
  mutable std::mutex mutex;   // guards the fields below
  bool ended = false;
  bool run_stop_sent[2] = {false, false};
  std::string error;
  LinkStats stats[2];
};

InProcessLink::InProcessLink(std::shared_ptr<Shared> shared, int side) : shared_(std::move(shared)), side_(side) {}

InProcessLink::~InProcessLink() { close(); }

void InProcessLink::send(Frame frame, std::chrono::milliseconds timeout) {
  const FrameType type = frame.header.type;
  if (type == FrameType::Hello || type == FrameType::Heartbeat)
    throw std::invalid_argument(std::string("InProcessLink::send: ") + frame_type_name(type) + " frames are the link's own");
  const std::string sending = peer() + ": sending " + frame_type_name(type) + " frame: ";
  {
    std::lock_guard lock(shared_->mutex);
    if (!shared_->error.empty()) throw LinkError(shared_->error);
    if (shared_->run_stop_sent[side_]) throw LinkError(sending + "the link is finished (RunStop was sent)");
  }
  const uint64_t bytes = kFrameHeaderBytes + frame.payload.size();
  if (!shared_->to[1 - side_].push(std::move(frame), timeout)) {
    const std::string why = error();
    throw LinkError(!why.empty() ? why : shared_->to[1 - side_].closed() ? sending + "the link is closed"
                                                                          : sending + "the peer's queue stayed full for " +
                                                                                std::to_string(timeout.count()) + " ms");
  }
  std::lock_guard lock(shared_->mutex);
  ++shared_->stats[side_].frames_out;
  shared_->stats[side_].bytes_out += bytes;
  ++shared_->stats[1 - side_].frames_in;
  shared_->stats[1 - side_].bytes_in += bytes;
  // A TcpLink half-closes after a RunStop: the peer drains what came before it and
  // then finds its inbound queue closed, without an error.
  if (type == FrameType::RunStop) {
    shared_->run_stop_sent[side_] = true;
    shared_->to[1 - side_].close();
  }
}

BoundedQueue<Frame>& InProcessLink::inbound() { return shared_->to[side_]; }

bool InProcessLink::flush(std::chrono::milliseconds) { return error().empty(); }

void InProcessLink::close() { shared_->end(""); }

void InProcessLink::fail(const std::string& error) { shared_->end(error); }

std::string InProcessLink::error() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->error;
}

LinkStats InProcessLink::stats() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->stats[side_];
}

const std::string& InProcessLink::peer() const { return shared_->names[1 - side_]; }

InProcessLinkPair make_in_process_link(const std::string& a_name, const std::string& b_name, size_t capacity) {
  auto shared = std::make_shared<InProcessLink::Shared>(a_name, b_name, capacity);
  return {std::make_unique<InProcessLink>(shared, 0), std::make_unique<InProcessLink>(shared, 1)};
}

}  // namespace mdi
