// Threads and actors of one node's ring links.
//
//   connect_ring(), caller thread                      accept thread (std::async)
//   ------------------------------------------         ------------------------------------------
//   RingListener: bind + listen on port_in  ---------> accept_prev(): poll the acceptor until
//   connect_next(): bind port_out, connect to            timeouts.accept; close strangers (wrong
//     the next node's port_in, retrying with             address or source port); read the
//     backoff until timeouts.connect;                    previous node's Hello, answer with ours
//     send our Hello, check the next node's
//                 |                                                   |
//                 v                                                   v
//          TcpLink to_next                                     TcpLink from_prev
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

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace mdi {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Asio sockets need a context; these are never driven by run(). Never destroyed,
// because a link may outlive static destruction.
asio::io_context& socket_context() {
  static auto* context = new asio::io_context;
  return *context;
}

std::string ms_text(milliseconds duration) { return std::to_string(duration.count()) + " ms"; }

std::string errno_text(int error) { return std::system_category().message(error); }

std::string endpoint_text(const tcp::endpoint& endpoint) {
  const auto address = endpoint.address();
  return (address.is_v6() ? "[" + address.to_string() + "]" : address.to_string()) + ":" +
         std::to_string(endpoint.port());
}

std::string node_text(size_t ring_index, const std::string& addr, uint16_t port) {
  return "ring index " + std::to_string(ring_index) + " (" + addr + ":" + std::to_string(port) + ")";
}

milliseconds remaining(Clock::time_point deadline) {
  return std::max(milliseconds(0), std::chrono::ceil<milliseconds>(deadline - Clock::now()));
}

// Waits until `fd` is ready for `events`, at most `timeout`; false on timeout.
// POLLERR and POLLHUP count as ready: the recv/send that follows reports why.
bool wait_ready(int fd, short events, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  pollfd watched{fd, events, 0};
  for (;;) {
    const auto wait_ms = std::min<int64_t>(remaining(deadline).count(), std::numeric_limits<int>::max());
    const int ready = ::poll(&watched, 1, static_cast<int>(wait_ms));
    if (ready > 0) return true;
    if (ready == 0) return false;
    if (errno != EINTR) throw TransportError("poll: " + errno_text(errno));
  }
}

// Reads exactly `size` bytes, giving up when no byte arrives for `idle_timeout`.
void read_exact(int fd, uint8_t* data, size_t size, milliseconds idle_timeout) {
  size_t done = 0;
  auto progress = [&] {
    return done == 0 ? std::string() : " after " + std::to_string(done) + " of " + std::to_string(size) + " bytes";
  };
  while (done < size) {
    if (!wait_ready(fd, POLLIN, idle_timeout))
      throw TransportError("no data for " + ms_text(idle_timeout) + " (receive timeout)" + progress());
    const ssize_t got = ::recv(fd, data + done, size - done, MSG_DONTWAIT);
    if (got > 0) {
      done += static_cast<size_t>(got);
    } else if (got == 0) {
      throw TransportError("peer closed the connection" + progress());
    } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
      throw TransportError("recv: " + errno_text(errno) + progress());
    }
  }
}

// Writes all of `parts`, giving up when the peer takes no byte for `idle_timeout`.
void write_all(int fd, iovec* parts, size_t n_parts, milliseconds idle_timeout) {
  while (n_parts > 0) {
    msghdr message{};
    message.msg_iov = parts;
    message.msg_iovlen = n_parts;
    // MSG_NOSIGNAL: a vanished peer must give EPIPE here, not a SIGPIPE that kills the process.
    const ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) throw TransportError("send: " + errno_text(errno));
      if (!wait_ready(fd, POLLOUT, idle_timeout))
        throw TransportError("peer took no data for " + ms_text(idle_timeout) + " (receive timeout)");
      continue;
    }
    for (size_t left = static_cast<size_t>(sent); left > 0;) {
      const size_t step = std::min(left, parts->iov_len);
      parts->iov_base = static_cast<uint8_t*>(parts->iov_base) + step;
      parts->iov_len -= step;
      left -= step;
      if (parts->iov_len == 0) {
        ++parts;
        --n_parts;
      }
    }
  }
}

void write_frame(int fd, const Frame& frame, milliseconds idle_timeout) {
  uint8_t header[kFrameHeaderBytes];
  encode_header(frame.header, header);
  iovec parts[2] = {{header, sizeof header}, {const_cast<uint8_t*>(frame.payload.data()), frame.payload.size()}};
  try {
    write_all(fd, parts, frame.payload.empty() ? 1 : 2, idle_timeout);
  } catch (const std::exception& e) {
    throw TransportError(std::string("sending ") + frame_type_name(frame.header.type) + " frame: " + e.what());
  }
}

Frame read_frame(int fd, const FrameLimits& limits, milliseconds idle_timeout) {
  Frame frame;
  try {
    uint8_t header[kFrameHeaderBytes];
    read_exact(fd, header, sizeof header, idle_timeout);
    frame.header = decode_header(header, limits);
  } catch (const std::exception& e) {
    throw TransportError(std::string("receiving frame header: ") + e.what());
  }
  try {
    frame.payload.resize(frame.header.payload_bytes);
    read_exact(fd, frame.payload.data(), frame.payload.size(), idle_timeout);
  } catch (const std::exception& e) {
    throw TransportError(std::string("receiving ") + frame_type_name(frame.header.type) + " payload of " +
                         std::to_string(frame.header.payload_bytes) + " bytes: " + e.what());
  }
  return frame;
}

// Checks the Hello the other end sent: the node we expect, in the same ring and run.
void check_hello(const Frame& frame, size_t expected_index, const NodesConfig& config, uint64_t run_id) {
  const HelloInfo hello = decode_hello(frame);
  if (hello.ring_index != expected_index)
    throw TransportError("its Hello says ring index " + std::to_string(hello.ring_index) + ", expected " +
                         std::to_string(expected_index));
  if (hello.n_nodes != config.n_nodes())
    throw TransportError("its Hello says the ring has " + std::to_string(hello.n_nodes) +
                         " nodes, this node's config has " + std::to_string(config.n_nodes()));
  if (hello.run_id != run_id)
    throw TransportError("its Hello is for run " + std::to_string(hello.run_id) + ", this node is in run " +
                         std::to_string(run_id) + " (a node left over from another run?)");
}

Frame hello_frame(const NodesConfig& config, size_t my_ring_index, uint64_t run_id) {
  return make_hello_frame({static_cast<uint32_t>(my_ring_index), static_cast<uint32_t>(config.n_nodes()), run_id});
}

// Socket options of every ring connection, set in one place.
void configure_link_socket(tcp::socket& socket, const RingTimeouts& timeouts) {
  socket.set_option(tcp::no_delay(true));
  // Heartbeats detect a dead peer first; keepalive backs them up at the kernel level.
  socket.set_option(asio::socket_base::keep_alive(true));
  const int idle_s =
      static_cast<int>(std::max<int64_t>(1, std::chrono::ceil<std::chrono::seconds>(timeouts.receive).count()));
  const int interval_s = 1, probes = 3;
  const int fd = socket.native_handle();
  if (::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s) != 0 ||
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof interval_s) != 0 ||
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes) != 0)
    throw TransportError("setsockopt(TCP_KEEP*): " + errno_text(errno));
}

// `family`: only addresses of that family (a sender binds the family it connects with).
std::vector<tcp::endpoint> resolve(const std::string& host, uint16_t port, std::optional<tcp> family = std::nullopt) {
  tcp::resolver resolver(socket_context());
  const std::string service = std::to_string(port);
  const auto results = family ? resolver.resolve(*family, host, service, tcp::resolver::numeric_service)
                              : resolver.resolve(host, service, tcp::resolver::numeric_service);
  std::vector<tcp::endpoint> endpoints;
  for (const auto& entry : results) endpoints.push_back(entry.endpoint());
  return endpoints;  // never empty: resolve() throws when nothing is found
}

// An IPv4 peer seen by an IPv6 socket looks like ::ffff:a.b.c.d.
asio::ip::address unmapped(const asio::ip::address& address) {
  if (address.is_v6() && address.to_v6().is_v4_mapped())
    return asio::ip::make_address_v4(asio::ip::v4_mapped, address.to_v6());
  return address;
}

// Connects `socket` to `remote`, waiting at most until `deadline`. 0 or an errno.
int connect_until(tcp::socket& socket, const tcp::endpoint& remote, Clock::time_point deadline) {
  socket.non_blocking(true);
  const int fd = socket.native_handle();
  if (::connect(fd, remote.data(), static_cast<socklen_t>(remote.size())) == 0) return 0;
  if (errno != EINPROGRESS && errno != EINTR) return errno;
  if (!wait_ready(fd, POLLOUT, remaining(deadline))) return ETIMEDOUT;
  int error = 0;
  socklen_t length = sizeof error;
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) return errno;
  return error;
}

}  // namespace

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
    reader = std::thread([this] { read_loop(); });
    writer = std::thread([this] { write_loop(); });
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
      spdlog::debug("ring: received from {}: {} sample {} pos {} tokens {} ({} bytes)", peer, frame_type_name(h.type),
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
  spdlog::debug("ring: sent to {}: {} sample {} pos {} tokens {} ({} bytes)", peer, frame_type_name(h.type), h.sample_id,
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
  if (!why.empty()) spdlog::error("ring: link failed: {}", why);
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

namespace {

std::unique_ptr<TcpLink> make_link(tcp::socket socket, std::string peer, const NodesConfig& config,
                                const LinkOptions& options) {
  const FrameLimits limits{config.max_frame_bytes, options.max_tokens};
  return std::make_unique<TcpLink>(
      std::make_unique<TcpLink::Impl>(std::move(socket), std::move(peer), config.timeouts, limits, options));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ring setup

struct RingListener::Impl {
  Impl(const NodesConfig& ring, size_t ring_index) : config(ring), my_index(ring_index) {}

  const NodesConfig config;
  const size_t my_index;
  tcp::acceptor acceptor{socket_context()};
  std::atomic<bool> cancelled{false};
};

RingListener::RingListener(const NodesConfig& config, size_t my_ring_index)
    : impl_(std::make_unique<Impl>(config, my_ring_index)) {
  const NodeEndpoint& me = config.node(my_ring_index);
  try {
    const tcp::endpoint local = resolve(me.bind_addr, me.port_in).front();
    impl_->acceptor.open(local.protocol());
    impl_->acceptor.set_option(tcp::acceptor::reuse_address(true));
    impl_->acceptor.bind(local);
    impl_->acceptor.listen();
    impl_->acceptor.non_blocking(true);
  } catch (const std::exception& e) {
    throw RingSetupError("ring index " + std::to_string(my_ring_index) + ": cannot listen on " + me.bind_addr + ":" +
                         std::to_string(me.port_in) + " (its port_in): " + e.what());
  }
}

RingListener::~RingListener() = default;

void RingListener::cancel() {
  impl_->cancelled = true;
  // On Linux, shutting a listening socket down wakes a poll() or accept() on it.
  ::shutdown(impl_->acceptor.native_handle(), SHUT_RDWR);
}

std::unique_ptr<TcpLink> RingListener::accept_prev(uint64_t run_id, const LinkOptions& options) {
  Impl& self = *impl_;
  const NodesConfig& config = self.config;
  const size_t prev_index = config.prev(self.my_index);
  const NodeEndpoint& prev = config.node(prev_index);
  const std::string expected = node_text(prev_index, prev.addr, prev.port_out);
  const std::string doing = "ring index " + std::to_string(self.my_index) + ": accepting " + expected + " on port_in " +
                            std::to_string(config.node(self.my_index).port_in);
  const FrameLimits limits{config.max_frame_bytes, options.max_tokens};

  std::vector<asio::ip::address> prev_addresses;
  try {
    for (const auto& endpoint : resolve(prev.addr, prev.port_out))
      prev_addresses.push_back(unmapped(endpoint.address()));
  } catch (const std::exception& e) {
    throw RingSetupError(doing + ": cannot resolve " + prev.addr + ": " + e.what());
  }
  auto is_prev = [&](const tcp::endpoint& remote) {
    return remote.port() == prev.port_out &&
           std::find(prev_addresses.begin(), prev_addresses.end(), unmapped(remote.address())) != prev_addresses.end();
  };

  const auto deadline = Clock::now() + config.timeouts.accept;
  std::string last_rejection;
  for (;;) {
    if (self.cancelled) throw RingSetupError(doing + ": cancelled");
    if (!wait_ready(self.acceptor.native_handle(), POLLIN, remaining(deadline)))
      throw RingSetupError(doing + ": nothing acceptable within " + ms_text(config.timeouts.accept) +
                           " (timeouts.accept_s)" +
                           (last_rejection.empty() ? "" : "; last refused: " + last_rejection));
    boost::system::error_code ec;
    tcp::socket socket = self.acceptor.accept(ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again || ec == asio::error::connection_aborted)
      continue;
    if (self.cancelled) throw RingSetupError(doing + ": cancelled");
    if (ec) throw RingSetupError(doing + ": accept: " + ec.message());
    const tcp::endpoint remote = socket.remote_endpoint(ec);
    if (ec) continue;  // gone already

    const std::string from = endpoint_text(remote);
    if (!is_prev(remote)) {
      last_rejection = "a connection from " + from;
      spdlog::warn("ring: {}: refused a connection from {}: only {} may connect", doing, from, expected);
      continue;
    }
    try {
      configure_link_socket(socket, config.timeouts);
      check_hello(read_frame(socket.native_handle(), limits, config.timeouts.receive), prev_index, config, run_id);
      write_frame(socket.native_handle(), hello_frame(config, self.my_index, run_id), config.timeouts.receive);
    } catch (const std::exception& e) {
      last_rejection = "the connection from " + from + ": " + e.what();
      spdlog::warn("ring: {}: refused {}", doing, last_rejection);
      continue;
    }
    spdlog::info("ring: ring index {} accepted ring index {} from {}", self.my_index, prev_index, from);
    return make_link(std::move(socket), "ring index " + std::to_string(prev_index) + " (" + from + ")", config,
                     options);
  }
}

std::unique_ptr<TcpLink> connect_next(const NodesConfig& config, size_t my_ring_index, uint64_t run_id,
                                   const LinkOptions& options) {
  const size_t next_index = config.next(my_ring_index);
  const NodeEndpoint& me = config.node(my_ring_index);
  const NodeEndpoint& next = config.node(next_index);
  const std::string target = node_text(next_index, next.addr, next.port_in);
  const std::string doing = "ring index " + std::to_string(my_ring_index) + ": connecting from port_out " +
                            std::to_string(me.port_out) + " to " + target;
  const FrameLimits limits{config.max_frame_bytes, options.max_tokens};

  tcp::endpoint remote, local;
  try {
    remote = resolve(next.addr, next.port_in).front();
    local = resolve(me.bind_addr, me.port_out, remote.protocol()).front();
  } catch (const std::exception& e) {
    throw RingSetupError(doing + ": cannot resolve: " + e.what());
  }

  const auto deadline = Clock::now() + config.timeouts.connect;
  // The next node may not be listening yet: retry, a little less eagerly each time.
  milliseconds backoff(20);
  constexpr milliseconds kMaxBackoff(1000);
  auto cancelled = [&] { return options.setup_cancel && options.setup_cancel->load(); };
  for (int attempt = 1;; ++attempt) {
    if (cancelled()) throw RingSetupError(doing + ": cancelled");
    tcp::socket socket(socket_context());
    try {
      socket.open(local.protocol());
      // MDI-LLM's receiver identifies its sender by source port, so the port is fixed
      // and must be bindable again right after a previous run.
      socket.set_option(tcp::socket::reuse_address(true));
      socket.bind(local);
    } catch (const std::exception& e) {
      throw RingSetupError(doing + ": cannot bind the source address " + endpoint_text(local) + ": " + e.what());
    }
    const int error = connect_until(socket, remote, deadline);
    if (error == 0) {
      try {
        configure_link_socket(socket, config.timeouts);
        write_frame(socket.native_handle(), hello_frame(config, my_ring_index, run_id), config.timeouts.receive);
        check_hello(read_frame(socket.native_handle(), limits, config.timeouts.receive), next_index, config, run_id);
      } catch (const std::exception& e) {
        throw RingSetupError(doing + ": " + e.what());
      }
      spdlog::info("ring: ring index {} connected to {}", my_ring_index, target);
      return make_link(std::move(socket), target, config, options);
    }
    if (Clock::now() >= deadline)
      throw RingSetupError(doing + ": gave up after " + ms_text(config.timeouts.connect) +
                           " (timeouts.connect_s) and " + std::to_string(attempt) + " attempts: " + errno_text(error));
    spdlog::debug("ring: {}: attempt {} failed ({}), retrying", doing, attempt, errno_text(error));
    std::this_thread::sleep_for(std::min(backoff, remaining(deadline)));
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

RingLinks connect_ring(const NodesConfig& config, size_t my_ring_index, uint64_t run_id, const LinkOptions& options) {
  if (config.n_nodes() < 2)
    throw RingSetupError("a ring needs at least 2 nodes; with no secondaries the starter runs standalone");
  RingListener listener(config, my_ring_index);
  auto accepted = std::async(std::launch::async, [&] { return listener.accept_prev(run_id, options); });
  RingLinks links;
  try {
    links.to_next = connect_next(config, my_ring_index, run_id, options);
  } catch (...) {
    listener.cancel();
    accepted.wait();
    throw;
  }
  // The previous node may still be on its way; a cancel request wakes the accept.
  while (accepted.wait_for(milliseconds(50)) != std::future_status::ready)
    if (options.setup_cancel && options.setup_cancel->load()) listener.cancel();
  links.from_prev = accepted.get();
  return links;
}

}  // namespace mdi
