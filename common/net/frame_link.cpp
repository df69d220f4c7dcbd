#include "common/net/frame_link.hpp"

namespace mdi {

using clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kPollInterval{100};  // how often a long wait looks at its cancel flag

std::optional<Frame> FrameLink::receive(std::chrono::milliseconds timeout) {
  if (auto frame = inbound().pop(timeout)) return frame;
  if (!inbound().closed()) return std::nullopt;
  if (auto frame = inbound().try_pop()) return frame;  // queued just before the link ended
  const std::string why = error();
  throw LinkError(why.empty() ? "the link with " + peer() + " closed before the run ended" : why);
}

std::optional<Frame> FrameLink::receive(const std::atomic<bool>& cancel, double& waited_s, std::chrono::milliseconds give_up_after) {
  const auto start = clock::now();
  std::optional<Frame> frame;
  // in milliseconds: give_up_after may be milliseconds::max(), which nanoseconds cannot hold
  auto waited = [&] { return std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - start); };
  while (!cancel && !(frame = receive(kPollInterval)) && waited() < give_up_after) {
  }
  waited_s += std::chrono::duration<double>(clock::now() - start).count();
  return frame;
}

void stop_ring_run(RingLinks& links, std::chrono::milliseconds send_timeout, std::chrono::milliseconds timeout) {
  links.to_next->send(make_control_frame(FrameType::RunStop), send_timeout);
  const auto deadline = clock::now() + timeout;
  while (clock::now() < deadline)
    if (auto frame = links.from_prev->receive(kPollInterval); frame && frame->header.type == FrameType::RunStop) return;
  throw LinkError("the run's stop did not come back around the ring within " + std::to_string(timeout.count()) + " ms (from " +
                  links.from_prev->peer() + ")");
}

}  // namespace mdi
