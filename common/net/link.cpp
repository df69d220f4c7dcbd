// The threads of one TcpLink.
//
//   Every TcpLink: one socket, two threads, two bounded queues.
//
//     send() --> [outgoing queue] --> writer thread --> socket --> peer
//       |                              | idle for timeouts.heartbeat: writes a Heartbeat
//       +-- small frame, nothing queued, writer idle: written by the caller (write_now)
//                                      | peer takes no byte for timeouts.receive: fail
//                                      | after RunStop: half-close (FIN), exit
//
//     consumer <-- [inbound queue] <-- reader thread <-- socket <-- peer
//                   full: the reader     | header validated before the payload is allocated
//                   waits (backpressure) | Heartbeat: counted, dropped
//                                        | no byte for timeouts.receive: fail
//
//   end(error): once per link. Shuts the socket down (wakes the other thread out of
//   poll()), closes both queues (wakes send() and the consumer), and calls on_error
//   when there is an error. close() is end("") from the owner.
//
// Sockets are Asio's, but I/O is non-blocking syscalls with poll() deadlines on
// their descriptors, one thread per direction: every wait is bounded and a full
// inbound queue simply parks the reader, with no io_context to keep running.
#include "common/net/link.hpp"

#include <pthread.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/net/socket_io.hpp"

namespace mdi {

using namespace socket_io;

// ---------------------------------------------------------------------------------------------
// TcpLink

struct TcpLink::Impl {
  Impl(tcp::socket connected, std::string peer_name, const RingTimeouts& ring_timeouts, const FrameLimits& frame_limits,
       const LinkOptions& options)
      : socket(std::move(connected)),
        peer(std::move(peer_name)),
        timeouts(ring_timeouts),
        limits(frame_limits),
        inbound(options.inbound_capacity),
        outgoing(options.outbound_capacity),
        on_error(options.on_error) {
    // named for top -H and gdb; otherwise they would take the name of the thread that made the link
    reader = std::thread([this] {
      pthread_setname_np(pthread_self(), "mdi-link-read");
      read_loop();
    });
    writer = std::thread([this] {
      pthread_setname_np(pthread_self(), "mdi-link-write");
      write_loop();
    });
  }

  ~Impl() {
    end("");
    reader.join();
    writer.join();
  }

  int fd() { return socket.native_handle(); }
  void read_loop();
  void write_loop();
  bool write_now(const Frame& frame);
  void written(const Frame& frame);
  void end(const std::string& error);
  void fail(const std::string& what);

  tcp::socket socket;
  const std::string peer;
  const RingTimeouts timeouts;
  const FrameLimits limits;
  BoundedQueue<Frame> inbound;
  BoundedQueue<Frame> outgoing;
  const std::function<void(const std::string&)> on_error;

  // Held while frame bytes go into the socket, by the writer thread (which pops under
  // it, so that no frame overtakes one it has taken) or by write_now().
  std::mutex write_mutex;
  Clock::time_point last_write = Clock::now();  // guarded by write_mutex

  mutable std::mutex mutex;          // guards the fields up to `error`
  std::condition_variable progress;  // frames_written or writer_done changed
  uint64_t frames_queued = 0;
  uint64_t frames_written = 0;
  bool writer_done = false;
  bool ended = false;
  std::string error;
  // RunStop passed in either direction: the run is over, so the peer hanging up
  // (EOF, reset, silence) is the expected end of the link, not a failure.
  std::atomic<bool> run_stopped{false};

  std::atomic<uint64_t> frames_in{0}, frames_out{0}, bytes_in{0}, bytes_out{0}, heartbeats_in{0}, heartbeats_out{0};

  std::thread reader;  // started last, once everything above exists
  std::thread writer;
};

void TcpLink::Impl::read_loop() {
  try {
    for (;;) {
      Frame frame = read_frame(fd(), limits, timeouts.receive);
      bytes_in += kFrameHeaderBytes + frame.payload.size();
      const FrameHeader& h = frame.header;
      if (h.type == FrameType::Heartbeat) {
        ++heartbeats_in;
        continue;
      }
      if (h.type == FrameType::Hello)
        throw TransportError("receiving frame header: a second Hello after the handshake");
      if (h.type == FrameType::RunStop) run_stopped = true;
      ++frames_in;
      // Per frame: trace (-vv), so that -v stays readable on a long run.
      spdlog::trace("ring: received from {}: {} sample {} pos {} tokens {} ({} bytes)", peer, frame_type_name(h.type),
                    h.sample_id, h.start_pos, h.n_tokens, h.payload_bytes);
      // Waiting on our own consumer is not the peer's fault, so no receive deadline
      // applies; end() closes the queue, which wakes this wait.
      while (!inbound.push(std::move(frame), timeouts.receive)) {
        if (inbound.closed()) return;
        spdlog::debug("ring: inbound queue from {} full for {}; the consumer is behind", peer,
                      ms_text(timeouts.receive));
      }
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
}

void TcpLink::Impl::write_loop() {
  try {
    for (;;) {
      const bool has_frame = outgoing.wait_for_item(timeouts.heartbeat);
      std::lock_guard writing(write_mutex);
      if (!has_frame) {
        if (outgoing.closed()) break;
        if (Clock::now() - last_write < timeouts.heartbeat) continue;
        write_frame(fd(), make_control_frame(FrameType::Heartbeat), timeouts.receive);
        last_write = Clock::now();
        ++heartbeats_out;
        bytes_out += kFrameHeaderBytes;
        continue;
      }
      std::optional<Frame> frame = outgoing.try_pop();
      if (!frame) continue;  // closed meanwhile: the next wait says so
      write_frame(fd(), *frame, timeouts.receive);
      written(*frame);
      if (frame->header.type == FrameType::RunStop) break;
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  {
    std::lock_guard lock(mutex);
    writer_done = true;
  }
  progress.notify_all();
}

// Writes `frame` on the caller's thread when it is small, nothing is queued before it
// and the writer is idle: a decode step's frame then leaves without waking the writer
// thread (a wake-up on another CPU measured ~20 µs on a 2-vCPU VM, a fifth of a ring
// hop). Bigger frames go through the writer, so that the caller computes while they
// are written. False when the frame was not written; after a failure the link has ended.
bool TcpLink::Impl::write_now(const Frame& frame) {
  constexpr size_t kMaxBytes = 64 * 1024;
  if (frame.payload.size() > kMaxBytes) return false;
  std::unique_lock writing(write_mutex, std::try_to_lock);
  if (!writing.owns_lock() || outgoing.size() != 0 || outgoing.closed()) return false;
  try {
    write_frame(fd(), frame, timeouts.receive);
  } catch (const std::exception& e) {
    fail(e.what());
    return false;
  }
  written(frame);
  return true;
}

// Bookkeeping after `frame` went into the socket; write_mutex held.
void TcpLink::Impl::written(const Frame& frame) {
  last_write = Clock::now();
  const FrameHeader& h = frame.header;
  ++frames_out;
  bytes_out += kFrameHeaderBytes + frame.payload.size();
  spdlog::trace("ring: sent to {}: {} sample {} pos {} tokens {} ({} bytes)", peer, frame_type_name(h.type), h.sample_id,
                h.start_pos, h.n_tokens, h.payload_bytes);
  if (h.type == FrameType::RunStop) {
    // Nothing may follow a RunStop; the FIN tells the peer so. Done before the
    // count below, so that a flush() that saw RunStop written finds the link finished.
    run_stopped = true;
    outgoing.close();
    ::shutdown(fd(), SHUT_WR);
  }
  {
    std::lock_guard lock(mutex);
    ++frames_written;
  }
  progress.notify_all();
}

void TcpLink::Impl::fail(const std::string& what) {
  if (run_stopped) {
    spdlog::debug("ring: link with {} ended after RunStop ({})", peer, what);
    end("");
  } else {
    end(peer + ": " + what);
  }
}

void TcpLink::Impl::end(const std::string& why) {
  {
    std::lock_guard lock(mutex);
    if (ended) return;
    ended = true;
    error = why;
  }
  // The link's owner reports the error (it surfaces from send() and receive()), once.
  if (!why.empty()) spdlog::debug("ring: link failed: {}", why);
  // Wakes whichever of the two threads sits in poll(); the descriptor stays open
  // until both are joined, so it cannot be reused under them.
  ::shutdown(fd(), SHUT_RDWR);
  outgoing.close_with_error(why);
  inbound.close_with_error(why);
  progress.notify_all();
  if (!why.empty() && on_error) on_error(why);
}

TcpLink::TcpLink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TcpLink::~TcpLink() = default;

void TcpLink::send(Frame frame, milliseconds timeout) {
  Impl& link = *impl_;
  const FrameType type = frame.header.type;
  if (type == FrameType::Hello || type == FrameType::Heartbeat)
    throw std::invalid_argument(std::string("TcpLink::send: ") + frame_type_name(type) + " frames are the link's own");
  if (frame.header.payload_bytes != frame.payload.size())
    throw std::invalid_argument("TcpLink::send: header.payload_bytes is " + std::to_string(frame.header.payload_bytes) +
                                " but the payload has " + std::to_string(frame.payload.size()) + " bytes");
  // The peer applies exactly these rules; failing here points at the caller, not the peer.
  uint8_t header[kFrameHeaderBytes];
  encode_header(frame.header, header);
  decode_header(header, link.limits);

  {
    std::lock_guard lock(link.mutex);
    if (!link.error.empty()) throw LinkError(link.error);
    ++link.frames_queued;
  }
  if (link.write_now(frame) || link.outgoing.push(std::move(frame), timeout)) return;

  std::string why;
  {
    std::lock_guard lock(link.mutex);
    --link.frames_queued;
    const std::string sending = link.peer + ": sending " + frame_type_name(type) + " frame: ";
    if (!link.error.empty())
      why = link.error;
    else if (link.outgoing.closed())
      why = sending + (link.run_stopped ? "the link is finished (RunStop was sent)" : "the link is closed");
    else
      why = sending + "the outgoing queue stayed full for " + ms_text(timeout);
  }
  link.progress.notify_all();
  throw LinkError(why);
}

BoundedQueue<Frame>& TcpLink::inbound() { return impl_->inbound; }

bool TcpLink::flush(milliseconds timeout) {
  Impl& link = *impl_;
  std::unique_lock lock(link.mutex);
  const uint64_t target = link.frames_queued;
  auto written = [&] { return link.frames_written >= std::min(target, link.frames_queued); };
  link.progress.wait_for(lock, timeout, [&] { return written() || link.writer_done; });
  return written();
}

void TcpLink::close() { impl_->end(""); }

std::string TcpLink::error() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->error;
}

LinkStats TcpLink::stats() const {
  const Impl& link = *impl_;
  return {link.frames_in, link.frames_out, link.bytes_in, link.bytes_out, link.heartbeats_in, link.heartbeats_out};
}

const std::string& TcpLink::peer() const { return impl_->peer; }

FrameLimits socket_io::frame_limits(const NodesConfig& config, const LinkOptions& options) {
  FrameLimits limits{config.max_frame_bytes, options.max_tokens};
  if (options.max_payload_bytes != 0 && options.max_payload_bytes < limits.max_payload_bytes) {
    limits.max_payload_bytes = options.max_payload_bytes;
    limits.payload_limit_source = "what the run's model allows one frame";
  }
  return limits;
}

std::unique_ptr<TcpLink> socket_io::make_tcp_link(tcp::socket socket, std::string peer, const NodesConfig& config,
                                const LinkOptions& options) {
  const FrameLimits limits = frame_limits(config, options);
  return std::make_unique<TcpLink>(
      std::make_unique<TcpLink::Impl>(std::move(socket), std::move(peer), config.timeouts, limits, options));
}

}  // namespace mdi
