// Threads of one node's ring setup.
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
// Sockets are Asio's, but every step is a non-blocking syscall with a poll() deadline
// (common/net/socket_io): every wait is bounded.
#include "common/net/ring_setup.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <future>
#include <optional>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/net/kernel_random.hpp"
#include "common/net/socket_io.hpp"

namespace mdi {

HelloProof hello_proof(const std::string& token, HelloRole sender_role, uint64_t run_id, uint32_t sender, uint32_t receiver,
                       const HelloNonce& sender_nonce, const HelloNonce& receiver_nonce) {
  static constexpr char kLabel[] = "mdi ring hello v3";
  uint8_t message[sizeof kLabel + 1 + 8 + 4 + 4 + 2 * kHelloNonceBytes];
  uint8_t* at = std::copy(std::begin(kLabel), std::end(kLabel), message);
  *at++ = static_cast<uint8_t>(sender_role);
  for (int i = 0; i < 8; ++i) *at++ = static_cast<uint8_t>(run_id >> (8 * i));
  for (uint32_t v : {sender, receiver})
    for (int i = 0; i < 4; ++i) *at++ = static_cast<uint8_t>(v >> (8 * i));
  at = std::copy(sender_nonce.begin(), sender_nonce.end(), at);
  std::copy(receiver_nonce.begin(), receiver_nonce.end(), at);
  HelloProof proof{};
  unsigned int length = 0;
  static const char kNoKey = 0;  // HMAC() takes a null key as "the previous one"
  if (!HMAC(EVP_sha256(), token.empty() ? &kNoKey : token.data(), static_cast<int>(token.size()), message, sizeof message, proof.data(),
            &length) ||
      length != proof.size())
    throw TransportError("HMAC-SHA256 of a Hello failed");
  return proof;
}

HelloNonce new_hello_nonce() {
  HelloNonce nonce{};
  kernel_random_bytes(nonce.data(), nonce.size());
  return nonce;
}

namespace {

using namespace socket_io;

std::string endpoint_text(const tcp::endpoint& endpoint) {
  const auto address = endpoint.address();
  return (address.is_v6() ? "[" + address.to_string() + "]" : address.to_string()) + ":" +
         std::to_string(endpoint.port());
}

std::string node_text(size_t ring_index, const std::string& addr, uint16_t port) {
  return "ring index " + std::to_string(ring_index) + " (" + addr + ":" + std::to_string(port) + ")";
}

// Checks the Hello the other end sent: the node we expect, in the same ring and run.
HelloInfo check_hello(const Frame& frame, size_t expected_index, const NodesConfig& config, uint64_t run_id) {
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
  return hello;
}

// Checks that `hello` proves the token over our nonce and its own.
void check_proof(const HelloInfo& hello, const NodesConfig& config, HelloRole its_role, size_t my_index, const HelloNonce& my_nonce) {
  const HelloProof expected =
      hello_proof(config.auth_token, its_role, hello.run_id, hello.ring_index, static_cast<uint32_t>(my_index), hello.nonce, my_nonce);
  if (CRYPTO_memcmp(expected.data(), hello.proof.data(), expected.size()) != 0)
    throw TransportError("its Hello does not prove the ring's auth_token (a node with another token, or no node of this ring)");
}

// Our Hello on a connection where we are `my_role` and the peer has ring index `peer_index`:
// with the peer's nonce, it proves the token over both nonces; without, the proof is zero.
Frame hello_frame(const NodesConfig& config, HelloRole my_role, size_t my_index, size_t peer_index, uint64_t run_id,
                  const HelloNonce& nonce, const HelloNonce* peer_nonce = nullptr) {
  const auto me = static_cast<uint32_t>(my_index);
  const HelloProof proof = peer_nonce ? hello_proof(config.auth_token, my_role, run_id, me, static_cast<uint32_t>(peer_index), nonce, *peer_nonce)
                                      : HelloProof{};
  return make_hello_frame({me, static_cast<uint32_t>(config.n_nodes()), run_id, nonce, proof});
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
  const FrameLimits limits = frame_limits(config, options);

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
      const int fd = socket.native_handle();
      const HelloInfo opening = check_hello(read_frame(fd, limits, config.timeouts.receive), prev_index, config, run_id);
      const HelloNonce nonce = new_hello_nonce();
      write_frame(fd, hello_frame(config, HelloRole::acceptor, self.my_index, prev_index, run_id, nonce, &opening.nonce),
                  config.timeouts.receive);
      const HelloInfo proving = check_hello(read_frame(fd, limits, config.timeouts.receive), prev_index, config, run_id);
      if (proving.nonce != opening.nonce) throw TransportError("its second Hello has another nonce than its first");
      check_proof(proving, config, HelloRole::connector, self.my_index, nonce);
    } catch (const std::exception& e) {
      last_rejection = "the connection from " + from + ": " + e.what();
      spdlog::warn("ring: {}: refused {}", doing, last_rejection);
      continue;
    }
    spdlog::info("ring: ring index {} accepted ring index {} from {}", self.my_index, prev_index, from);
    return make_tcp_link(std::move(socket), "ring index " + std::to_string(prev_index) + " (" + from + ")", config,
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
  const FrameLimits limits = frame_limits(config, options);

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
        const int fd = socket.native_handle();
        const HelloNonce nonce = new_hello_nonce();
        write_frame(fd, hello_frame(config, HelloRole::connector, my_ring_index, next_index, run_id, nonce), config.timeouts.receive);
        const HelloInfo answer = check_hello(read_frame(fd, limits, config.timeouts.receive), next_index, config, run_id);
        check_proof(answer, config, HelloRole::acceptor, my_ring_index, nonce);
        write_frame(fd, hello_frame(config, HelloRole::connector, my_ring_index, next_index, run_id, nonce, &answer.nonce),
                    config.timeouts.receive);
      } catch (const std::exception& e) {
        throw RingSetupError(doing + ": " + e.what());
      }
      spdlog::info("ring: ring index {} connected to {}", my_ring_index, target);
      return make_tcp_link(std::move(socket), target, config, options);
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
