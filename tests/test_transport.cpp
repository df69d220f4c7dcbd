#include "common/net/ring_setup.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <future>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/net/bounded_queue.hpp"
#include "common/net/in_process_link.hpp"
#include "tests/support.hpp"

namespace mdi {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kRunId = 0xC0FFEE;

// ---------------------------------------------------------------------------------------------
// BoundedQueue

TEST(BoundedQueue, PopTimesOutWhenEmpty) {
  BoundedQueue<int> queue(2);
  const auto start = Clock::now();
  EXPECT_FALSE(queue.pop(50ms));
  EXPECT_GE(Clock::now() - start, 50ms);
  EXPECT_FALSE(queue.closed());
}

TEST(BoundedQueue, TryPopTakesWhatIsQueuedInOrderAndFreesRoom) {
  BoundedQueue<int> queue(2);
  EXPECT_FALSE(queue.try_pop());
  EXPECT_TRUE(queue.push(1, 0ms));
  EXPECT_TRUE(queue.push(2, 0ms));
  EXPECT_FALSE(queue.push(3, 0ms));
  EXPECT_EQ(queue.try_pop(), 1);
  EXPECT_TRUE(queue.push(3, 0ms));  // the room it freed
  queue.close();
  EXPECT_EQ(queue.try_pop(), 2);  // a closed queue still drains
  EXPECT_EQ(queue.try_pop(), 3);
  EXPECT_FALSE(queue.try_pop());
}

TEST(BoundedQueue, PushTimesOutWhenFullAndKeepsTheItem) {
  BoundedQueue<std::string> queue(1);
  EXPECT_TRUE(queue.push(std::string("first"), 0ms));
  std::string second = "second";
  EXPECT_FALSE(queue.push(std::move(second), 50ms));
  EXPECT_EQ(second, "second");  // not moved from: the caller may retry
  EXPECT_EQ(queue.size(), 1u);
}

TEST(BoundedQueue, CloseWakesEveryWaiter) {
  BoundedQueue<int> empty(1), full(1);
  ASSERT_TRUE(full.push(1, 0ms));
  auto popper = std::async(std::launch::async, [&] { return empty.pop(60s); });
  auto pusher = std::async(std::launch::async, [&] { return full.push(2, 60s); });
  empty.close();
  full.close();
  ASSERT_EQ(popper.wait_for(5s), std::future_status::ready);
  ASSERT_EQ(pusher.wait_for(5s), std::future_status::ready);
  EXPECT_FALSE(popper.get());
  EXPECT_FALSE(pusher.get());
}

TEST(BoundedQueue, ClosedQueueDrainsThenReportsWhy) {
  BoundedQueue<int> queue(4);
  ASSERT_TRUE(queue.push(1, 0ms));
  ASSERT_TRUE(queue.push(2, 0ms));
  queue.close_with_error("peer died");
  queue.close_with_error("second reason is ignored");
  EXPECT_FALSE(queue.push(3, 0ms));
  EXPECT_EQ(queue.pop(0ms), 1);
  EXPECT_EQ(queue.pop(0ms), 2);
  EXPECT_FALSE(queue.pop(0ms));
  EXPECT_EQ(queue.error(), "peer died");
}

TEST(BoundedQueue, FullQueueHoldsTheProducerBack) {
  BoundedQueue<int> queue(2);
  auto producer = std::async(std::launch::async, [&] {
    for (int i = 0; i < 6; ++i)
      if (!queue.push(i, 10s)) return false;
    return true;
  });
  ASSERT_TRUE(test::wait_until([&] { return queue.size() == 2; }, 5s));
  EXPECT_NE(producer.wait_for(0ms), std::future_status::ready);
  for (int i = 0; i < 6; ++i) {
    EXPECT_LE(queue.size(), 2u);
    EXPECT_EQ(queue.pop(5s), i);
  }
  EXPECT_TRUE(producer.get());
}

// ---------------------------------------------------------------------------------------------
// Helpers: loopback rings and a hand-driven peer

NodesConfig loopback_ring(size_t n_nodes, milliseconds receive = 5s, milliseconds heartbeat = 200ms) {
  NodesConfig config;
  for (size_t i = 0; i < n_nodes; ++i) {
    NodeEndpoint node;
    node.addr = node.bind_addr = "127.0.0.1";
    node.control_port = static_cast<uint16_t>(test::free_tcp_port());
    node.port_in = static_cast<uint16_t>(test::free_tcp_port());
    node.port_out = static_cast<uint16_t>(test::free_tcp_port());
    if (i == 0) {
      config.starter = node;
    } else {
      node.starter_addr = "127.0.0.1";
      config.secondaries.push_back(node);
    }
  }
  config.timeouts.connect = 5s;
  config.timeouts.accept = 5s;
  config.timeouts.receive = receive;
  config.timeouts.heartbeat = heartbeat;
  return config;
}

// Every node calls connect_ring at once, as separate processes would.
std::vector<RingLinks> connect_all(const NodesConfig& config, const LinkOptions& options) {
  std::vector<std::future<RingLinks>> pending;
  for (size_t i = 0; i < config.n_nodes(); ++i)
    pending.push_back(std::async(std::launch::async, [&, i] { return connect_ring(config, i, kRunId, options); }));
  std::vector<RingLinks> rings;
  for (auto& node : pending) rings.push_back(node.get());
  return rings;
}

Frame float_frame(FrameType type, uint32_t sample_id, size_t n_values) {
  std::vector<float> values(n_values);
  std::iota(values.begin(), values.end(), static_cast<float>(sample_id));
  Frame frame = make_tensor_frame(type, sample_id, 0, WireDType::F32, {1, static_cast<uint32_t>(n_values)},
                                  values.data(), values.size() * sizeof(float));
  frame.header.n_tokens = 1;
  return frame;
}

Frame pop_or_fail(FrameLink& link, milliseconds timeout = 5s) {
  std::optional<Frame> frame = link.inbound().pop(timeout);
  if (!frame) throw std::runtime_error("no frame from " + link.peer() + ": " + link.inbound().error());
  return std::move(*frame);
}

sockaddr_in loopback(uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  return address;
}

// A peer under the test's control, for what a well-behaved FrameLink never does.
class RawPeer {
 public:
  // Connects from 127.0.0.1:source_port to 127.0.0.1:port.
  RawPeer(uint16_t source_port, uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    const int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    const sockaddr_in local = loopback(source_port), remote = loopback(port);
    if (::bind(fd_, reinterpret_cast<const sockaddr*>(&local), sizeof local) != 0 ||
        ::connect(fd_, reinterpret_cast<const sockaddr*>(&remote), sizeof remote) != 0)
      throw std::runtime_error("RawPeer: cannot connect from port " + std::to_string(source_port) + " to " +
                               std::to_string(port));
  }
  ~RawPeer() { ::close(fd_); }
  RawPeer(const RawPeer&) = delete;
  RawPeer& operator=(const RawPeer&) = delete;

  // A peer the node refuses at accept may find the connection closed before it has sent a byte.
  void expect_refusal() { refusal_expected_ = true; }
  void send_bytes(const void* data, size_t size) {
    const ssize_t sent = ::send(fd_, data, size, MSG_NOSIGNAL);
    if (sent < 0 && refusal_expected_ && (errno == EPIPE || errno == ECONNRESET)) return;
    ASSERT_EQ(sent, static_cast<ssize_t>(size));
  }
  void send_frame(const Frame& frame) {
    uint8_t header[kFrameHeaderBytes];
    encode_header(frame.header, header);
    send_bytes(header, sizeof header);
    if (!frame.payload.empty()) send_bytes(frame.payload.data(), frame.payload.size());
  }
  // The connection's opening Hello, then (after the acceptor's answer) the one proving `token`.
  void send_hello(uint32_t ring_index, uint32_t n_nodes, uint64_t run_id = kRunId) {
    opening_ = {ring_index, n_nodes, run_id, new_hello_nonce(), {}};
    send_frame(make_hello_frame(opening_));
  }
  void send_proof(const HelloInfo& answer, const std::string& token = "") {
    HelloInfo proving = opening_;
    proving.proof = hello_proof(token, HelloRole::connector, opening_.run_id, opening_.ring_index, answer.ring_index, opening_.nonce, answer.nonce);
    send_frame(make_hello_frame(proving));
  }

  // The Hello the accepting node answers with.
  HelloInfo receive_hello(milliseconds timeout) {
    Frame frame;
    uint8_t header[kFrameHeaderBytes];
    if (!read_exact(header, sizeof header, timeout)) throw std::runtime_error("RawPeer: no Hello header");
    frame.header = decode_header(header, {});
    frame.payload.resize(frame.header.payload_bytes);
    if (!read_exact(frame.payload.data(), frame.payload.size(), timeout)) throw std::runtime_error("RawPeer: no Hello");
    return decode_hello(frame);
  }

  // True when the other end hangs up (EOF or reset) within `timeout`.
  bool closed_by_peer(milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    uint8_t scratch[256];
    while (wait_readable(deadline)) {
      if (::recv(fd_, scratch, sizeof scratch, 0) <= 0) return true;
    }
    return false;
  }

 private:
  bool wait_readable(Clock::time_point deadline) {
    pollfd watched{fd_, POLLIN, 0};
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    return left.count() > 0 && ::poll(&watched, 1, static_cast<int>(left.count())) > 0;
  }
  bool read_exact(void* data, size_t size, milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    for (size_t done = 0; done < size;) {
      if (!wait_readable(deadline)) return false;
      const ssize_t got = ::recv(fd_, static_cast<uint8_t*>(data) + done, size - done, 0);
      if (got <= 0) return false;
      done += static_cast<size_t>(got);
    }
    return true;
  }

  int fd_;
  HelloInfo opening_;
  bool refusal_expected_ = false;
};

// Ring index 1 of a 2-node ring, accepting a RawPeer that plays ring index 0.
struct AcceptedRawPeer {
  explicit AcceptedRawPeer(NodesConfig ring, LinkOptions options = {}) : config(std::move(ring)), listener(config, 1) {
    auto accepted = std::async(std::launch::async, [&] { return listener.accept_prev(kRunId, options); });
    peer = std::make_unique<RawPeer>(config.node(0).port_out, config.node(1).port_in);
    peer->send_hello(0, 2);
    const HelloInfo answer = peer->receive_hello(5s);
    EXPECT_EQ(answer.ring_index, 1u);
    peer->send_proof(answer);
    link = accepted.get();
  }
  std::string prev_name() const { return "ring index 0 (127.0.0.1:" + std::to_string(config.node(0).port_out) + ")"; }

  NodesConfig config;
  RingListener listener;
  std::unique_ptr<RawPeer> peer;
  std::unique_ptr<TcpLink> link;
};

// Waits for `link` to fail; returns its error.
std::string wait_for_failure(FrameLink& link, milliseconds timeout) {
  EXPECT_FALSE(link.inbound().pop(timeout)) << "expected the link to fail, got a frame";
  EXPECT_TRUE(link.inbound().closed());
  EXPECT_EQ(link.inbound().error(), link.error());
  return link.error();
}

// ---------------------------------------------------------------------------------------------
// Ring setup and links

TEST(Transport, ThreeNodeRingCarriesFramesForwardAndBackward) {
  const NodesConfig config = loopback_ring(3);
  std::atomic<int> errors{0};
  LinkOptions options;
  options.on_error = [&](const std::string&) { ++errors; };
  std::vector<RingLinks> ring = connect_all(config, options);
  EXPECT_EQ(ring[0].to_next->peer(), "ring index 1 (127.0.0.1:" + std::to_string(config.node(1).port_in) + ")");
  EXPECT_EQ(ring[1].from_prev->peer(), "ring index 0 (127.0.0.1:" + std::to_string(config.node(0).port_out) + ")");

  // Forward: starter -> 1 -> 2 -> starter. 4 MiB makes every write a partial one.
  const Frame sent = float_frame(FrameType::Activations, 3, 1 << 20);
  ring[0].to_next->send(sent, 5s);
  for (size_t node : {1, 2}) ring[node].to_next->send(pop_or_fail(*ring[node].from_prev), 5s);
  const Frame around = pop_or_fail(*ring[0].from_prev);
  EXPECT_EQ(around.header.sample_id, 3u);
  EXPECT_EQ(around.header.n_tokens, 1u);
  EXPECT_EQ(around.payload, sent.payload);

  // Backward over the same sockets: starter -> 2 -> 1 -> starter.
  const Frame gradients = float_frame(FrameType::Gradients, 9, 1000);
  ring[0].from_prev->send(gradients, 5s);
  for (size_t node : {2, 1}) ring[node].from_prev->send(pop_or_fail(*ring[node].to_next), 5s);
  const Frame back = pop_or_fail(*ring[0].to_next);
  EXPECT_EQ(back.header.type, FrameType::Gradients);
  EXPECT_EQ(back.payload, gradients.payload);

  EXPECT_EQ(ring[1].from_prev->stats().frames_in, 1u);
  EXPECT_EQ(ring[1].to_next->stats().frames_in, 1u);
  EXPECT_GE(ring[1].from_prev->stats().bytes_in, 4u << 20);

  // RunStop goes around; each link then ends in order, reporting nothing.
  ring[0].to_next->send(make_control_frame(FrameType::RunStop), 5s);
  for (size_t node : {1, 2}) ring[node].to_next->send(pop_or_fail(*ring[node].from_prev), 5s);
  EXPECT_EQ(pop_or_fail(*ring[0].from_prev).header.type, FrameType::RunStop);
  ASSERT_TRUE(ring[0].to_next->flush(5s));
  EXPECT_THROW(ring[0].to_next->send(make_control_frame(FrameType::SampleStop), 5s), LinkError);
  for (size_t node : {1, 2}) {
    EXPECT_FALSE(ring[node].from_prev->inbound().pop(5s));
    EXPECT_EQ(ring[node].from_prev->error(), "");
  }
  EXPECT_EQ(errors, 0);
}

// Small frames are written by the sending thread, big ones by the link's writer;
// neither may overtake the other.
TEST(Transport, SmallAndBigFramesArriveInTheOrderSent) {
  std::vector<RingLinks> ring = connect_all(loopback_ring(2), {});
  constexpr uint32_t kFrames = 60;
  auto sent = [](uint32_t i) { return float_frame(FrameType::Activations, i, i % 3 == 0 ? 256 * 1024 : 16); };
  auto sender = std::async(std::launch::async, [&] {
    for (uint32_t i = 0; i < kFrames; ++i) ring[0].to_next->send(sent(i), 5s);
  });
  for (uint32_t i = 0; i < kFrames; ++i) {
    const Frame got = pop_or_fail(*ring[1].from_prev);
    ASSERT_EQ(got.header.sample_id, i);
    ASSERT_EQ(got.payload, sent(i).payload);
  }
  sender.get();
  EXPECT_EQ(ring[0].to_next->stats().frames_out, kFrames);
  EXPECT_TRUE(ring[0].to_next->flush(1s));
}

TEST(Transport, SendRejectsFramesThePeerWouldReject) {
  std::vector<RingLinks> ring = connect_all(loopback_ring(2), {});
  EXPECT_THROW(ring[0].to_next->send(make_hello_frame({0, 2, kRunId}), 1s), std::invalid_argument);
  Frame bad = float_frame(FrameType::Activations, 0, 4);
  bad.header.ndim = 3;
  EXPECT_THROW(ring[0].to_next->send(bad, 1s), ProtocolError);
}

TEST(Transport, FullInboundQueueStopsTheReader) {
  const NodesConfig config = loopback_ring(2);
  LinkOptions options;
  options.inbound_capacity = 2;
  std::vector<RingLinks> ring = connect_all(config, options);
  for (uint32_t sample = 0; sample < 8; ++sample)
    ring[0].to_next->send(float_frame(FrameType::Activations, sample, 16), 5s);
  ASSERT_TRUE(ring[0].to_next->flush(5s));
  FrameLink& receiver = *ring[1].from_prev;
  // Two frames queued and one held by the parked reader; the rest waits in the socket.
  ASSERT_TRUE(test::wait_until([&] { return receiver.stats().frames_in == 3; }, 5s));
  EXPECT_EQ(receiver.inbound().size(), 2u);
  for (uint32_t sample = 0; sample < 8; ++sample) EXPECT_EQ(pop_or_fail(receiver).header.sample_id, sample);
  EXPECT_EQ(receiver.error(), "");
}

TEST(Transport, HeartbeatsKeepAnIdleLinkAlive) {
  const NodesConfig config = loopback_ring(2, 300ms, 50ms);
  std::vector<RingLinks> ring = connect_all(config, {});
  // Three receive timeouts of silence from the application.
  EXPECT_FALSE(ring[1].from_prev->inbound().pop(900ms));
  EXPECT_FALSE(ring[1].from_prev->inbound().closed()) << ring[1].from_prev->error();
  EXPECT_GE(ring[1].from_prev->stats().heartbeats_in, 3u);
  EXPECT_GE(ring[0].to_next->stats().heartbeats_out, 3u);
  EXPECT_EQ(ring[1].from_prev->stats().frames_in, 0u);
  ring[0].to_next->send(float_frame(FrameType::Activations, 1, 8), 1s);
  EXPECT_EQ(pop_or_fail(*ring[1].from_prev).header.sample_id, 1u);
}

TEST(Transport, WrongSourcePortIsRefusedAndTheRightOneAccepted) {
  const NodesConfig config = loopback_ring(2);
  RingListener listener(config, 1);
  auto accepted = std::async(std::launch::async, [&] { return listener.accept_prev(kRunId, {}); });

  RawPeer stranger(static_cast<uint16_t>(test::free_tcp_port()), config.node(1).port_in);
  stranger.expect_refusal();
  stranger.send_hello(0, 2);
  EXPECT_TRUE(stranger.closed_by_peer(5s));

  RawPeer prev(config.node(0).port_out, config.node(1).port_in);
  prev.send_hello(0, 2);
  const HelloInfo answer = prev.receive_hello(5s);
  EXPECT_EQ(answer.ring_index, 1u);
  EXPECT_EQ(answer.n_nodes, 2u);
  EXPECT_EQ(answer.run_id, kRunId);
  prev.send_proof(answer);
  EXPECT_EQ(accepted.get()->peer(), "ring index 0 (127.0.0.1:" + std::to_string(config.node(0).port_out) + ")");
}

// With an auth_token, the previous node's own address, port and run id are not enough:
// a peer that cannot prove the token is refused, and ring setup goes on waiting.
TEST(Transport, WithATokenAHelloThatDoesNotProveItIsRefusedAndOneThatDoesIsAccepted) {
  NodesConfig config = loopback_ring(2);
  config.auth_token = "s3cret";
  RingListener listener(config, 1);
  auto accepted = std::async(std::launch::async, [&] { return listener.accept_prev(kRunId, {}); });
  for (const std::string token : {"", "wrong"}) {
    RawPeer forger(config.node(0).port_out, config.node(1).port_in);
    forger.send_hello(0, 2);
    const HelloInfo answer = forger.receive_hello(5s);
    forger.send_proof(answer, token);
    EXPECT_TRUE(forger.closed_by_peer(5s)) << "a Hello proving \"" << token << "\" was taken";
  }
  RawPeer prev(config.node(0).port_out, config.node(1).port_in);
  prev.send_hello(0, 2);
  const HelloInfo answer = prev.receive_hello(5s);
  prev.send_proof(answer, "s3cret");
  EXPECT_EQ(accepted.get()->peer(), "ring index 0 (127.0.0.1:" + std::to_string(config.node(0).port_out) + ")");
}

// Two real nodes whose tokens differ never form a ring.
TEST(Transport, NodesWithDifferentTokensRefuseEachOther) {
  NodesConfig config = loopback_ring(2);
  config.timeouts.accept = 1s;
  config.timeouts.connect = 1s;
  NodesConfig other = config;
  config.auth_token = "one";
  other.auth_token = "two";
  auto starter = std::async(std::launch::async, [&] { return test::error_of<RingSetupError>([&] { connect_ring(config, 0, kRunId); }); });
  const std::string error = test::error_of<RingSetupError>([&] { connect_ring(other, 1, kRunId); });
  const std::string starter_error = starter.get();
  EXPECT_FALSE(error.empty());
  EXPECT_FALSE(starter_error.empty());
  // whichever node checks a proof first fails on it; the other may see only its peer leave
  EXPECT_THAT(error + starter_error, HasSubstr("does not prove the ring's auth_token"));
}

TEST(Transport, HelloFromAnotherRunIsRefused) {
  NodesConfig config = loopback_ring(2);
  config.timeouts.accept = 500ms;
  RingListener listener(config, 1);
  auto accepted = std::async(std::launch::async, [&] { return listener.accept_prev(kRunId, {}); });
  RawPeer stale(config.node(0).port_out, config.node(1).port_in);
  stale.send_hello(0, 2, kRunId + 1);
  EXPECT_TRUE(stale.closed_by_peer(5s));
  try {
    accepted.get();
    FAIL() << "accepted a Hello from another run";
  } catch (const RingSetupError& e) {
    EXPECT_THAT(e.what(), HasSubstr("nothing acceptable within 500 ms"));
    EXPECT_THAT(e.what(), HasSubstr("its Hello is for run"));
  }
}

TEST(Transport, SilentPeerIsDeclaredDeadWithinTheReceiveTimeout) {
  AcceptedRawPeer node(loopback_ring(2, 300ms, 100ms));
  const auto start = Clock::now();
  const std::string error = wait_for_failure(*node.link, 5s);
  const auto elapsed = Clock::now() - start;
  EXPECT_THAT(error, HasSubstr(node.prev_name()));
  EXPECT_THAT(error, HasSubstr("receiving frame header: no data for 300 ms"));
  EXPECT_LT(elapsed, 300ms + 700ms);
}

TEST(Transport, TruncatedFrameNamesThePeer) {
  std::atomic<int> reported{0};
  LinkOptions options;
  options.on_error = [&](const std::string&) { ++reported; };
  AcceptedRawPeer node(loopback_ring(2), options);
  const Frame frame = float_frame(FrameType::Activations, 0, 256);
  uint8_t header[kFrameHeaderBytes];
  encode_header(frame.header, header);
  node.peer->send_bytes(header, sizeof header);
  node.peer->send_bytes(frame.payload.data(), 100);
  node.peer.reset();  // hangs up mid-frame

  const std::string error = wait_for_failure(*node.link, 5s);
  EXPECT_THAT(error, HasSubstr(node.prev_name()));
  EXPECT_THAT(error, HasSubstr("receiving Activations payload of 1024 bytes"));
  EXPECT_THAT(error, HasSubstr("peer closed the connection after 100 of 1024 bytes"));
  EXPECT_TRUE(test::wait_until([&] { return reported == 1; }, 5s));
  EXPECT_THROW(node.link->send(float_frame(FrameType::Activations, 1, 4), 1s), LinkError);
  EXPECT_EQ(reported, 1);
}

TEST(Transport, BadHeaderClosesThatLink) {
  AcceptedRawPeer node(loopback_ring(2));
  uint8_t header[kFrameHeaderBytes];
  encode_header(float_frame(FrameType::Activations, 0, 4).header, header);
  header[0] = 'X';
  node.peer->send_bytes(header, sizeof header);
  const std::string error = wait_for_failure(*node.link, 5s);
  EXPECT_THAT(error, HasSubstr(node.prev_name()));
  EXPECT_THAT(error, HasSubstr("receiving frame header: frame magic"));
  EXPECT_TRUE(node.peer->closed_by_peer(5s));
}

TEST(Transport, OversizedFrameIsRefusedBeforeItsPayload) {
  NodesConfig config = loopback_ring(2);
  config.max_frame_bytes = 1024;
  AcceptedRawPeer node(config);
  node.peer->send_frame(float_frame(FrameType::Activations, 0, 1024));
  EXPECT_THAT(wait_for_failure(*node.link, 5s), HasSubstr("payload_bytes 4096 exceeds the limit 1024"));
}

// The model's cap, not only max_frame_bytes: a 64-byte header claiming [2^20, 255] F32
// (1020 MiB, under the 1 GiB default) must not make the node allocate it.
TEST(Transport, HeaderOverTheModelCapIsRefusedWithoutAllocating) {
  LinkOptions options;
  options.max_payload_bytes = inference_payload_cap(64, 512, 32);
  AcceptedRawPeer node(loopback_ring(2), options);
  FrameHeader huge;
  huge.type = FrameType::Activations;
  huge.dtype = WireDType::F32;
  huge.ndim = 2;
  huge.shape = {1u << 20, 255, 0, 0};
  huge.n_tokens = 1u << 20;
  huge.payload_bytes = uint64_t{1u << 20} * 255 * 4;
  uint8_t header[kFrameHeaderBytes];
  encode_header(huge, header);
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  node.peer->send_bytes(header, sizeof header);

  const std::string error = wait_for_failure(*node.link, 5s);
  EXPECT_THAT(error, HasSubstr(node.prev_name()));
  EXPECT_THAT(error, HasSubstr("payload_bytes 1069547520 exceeds the limit " + std::to_string(options.max_payload_bytes) +
                               " (what the run's model allows one frame)"));
  EXPECT_TRUE(node.peer->closed_by_peer(5s));
  rusage after{};
  ::getrusage(RUSAGE_SELF, &after);
  EXPECT_LT(after.ru_maxrss - before.ru_maxrss, 64 * 1024) << "peak RSS grew by " << (after.ru_maxrss - before.ru_maxrss) << " KiB";
}

TEST(Transport, ConnectGivesUpAtTheDeadlineNamingTheAddress) {
  NodesConfig config = loopback_ring(2);
  config.timeouts.connect = 300ms;
  const auto start = Clock::now();
  try {
    connect_next(config, 0, kRunId, {});
    FAIL() << "connected to a port nobody listens on";
  } catch (const RingSetupError& e) {
    EXPECT_THAT(e.what(), HasSubstr("127.0.0.1:" + std::to_string(config.node(1).port_in)));
    EXPECT_THAT(e.what(), HasSubstr("gave up after 300 ms"));
  }
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 3s);
}

TEST(Transport, StandaloneHasNoRing) {
  NodesConfig config = loopback_ring(1);
  EXPECT_THROW(connect_ring(config, 0, kRunId), RingSetupError);
}

// ---------------------------------------------------------------------------------------------
// The in-process fake behaves as a TcpLink does where the ring's loops can tell.

TEST(InProcessLink, DeliversInOrderBothWaysAndEndsAfterRunStop) {
  auto link = make_in_process_link("starter", "secondary 0", 4);
  EXPECT_EQ(link.a->peer(), "secondary 0");
  EXPECT_EQ(link.b->peer(), "starter");
  for (uint32_t i = 0; i < 3; ++i) link.a->send(float_frame(FrameType::Activations, i, 8), 1s);
  link.b->send(float_frame(FrameType::Gradients, 9, 8), 1s);
  for (uint32_t i = 0; i < 3; ++i) EXPECT_EQ(pop_or_fail(*link.b).header.sample_id, i);
  EXPECT_EQ(pop_or_fail(*link.a).header.type, FrameType::Gradients);
  EXPECT_EQ(link.a->stats().frames_out, 3u);
  EXPECT_EQ(link.b->stats().frames_in, 3u);
  EXPECT_THROW(link.a->send(make_hello_frame({0, 2, kRunId}), 1s), std::invalid_argument);

  link.a->send(make_control_frame(FrameType::RunStop), 1s);
  EXPECT_THROW(link.a->send(make_control_frame(FrameType::SampleStop), 1s), LinkError);
  EXPECT_EQ(pop_or_fail(*link.b).header.type, FrameType::RunStop);
  try {
    link.b->receive(1s);
    FAIL() << "a frame after RunStop";
  } catch (const LinkError& e) {
    EXPECT_EQ(std::string(e.what()), "the link with starter closed before the run ended");
  }
  EXPECT_EQ(link.b->error(), "");
}

TEST(InProcessLink, FailureReachesBothEndsAfterTheQueuedFrames) {
  auto link = make_in_process_link("starter", "secondary 0", 2);
  link.a->send(float_frame(FrameType::Activations, 1, 8), 1s);
  link.a->send(float_frame(FrameType::Activations, 2, 8), 1s);
  EXPECT_THROW(link.a->send(float_frame(FrameType::Activations, 3, 8), 50ms), LinkError) << "a full queue took a third frame";
  link.b->fail("secondary 0: peer closed the connection");
  EXPECT_EQ(pop_or_fail(*link.b).header.sample_id, 1u);
  EXPECT_EQ(pop_or_fail(*link.b).header.sample_id, 2u);
  for (FrameLink* end : {static_cast<FrameLink*>(link.a.get()), static_cast<FrameLink*>(link.b.get())}) {
    EXPECT_EQ(end->error(), "secondary 0: peer closed the connection");
    EXPECT_THROW(end->receive(1s), LinkError);
    EXPECT_THROW(end->send(float_frame(FrameType::Activations, 4, 8), 1s), LinkError);
  }
}

TEST(InProcessLink, ReceiveUntilCancelledReturnsNothingOnceCancelled) {
  auto link = make_in_process_link("a", "b");
  std::atomic<bool> cancel{true};
  double waited_s = 0;
  EXPECT_FALSE(link.b->receive(cancel, waited_s));
  link.a->send(float_frame(FrameType::Activations, 5, 8), 1s);
  cancel = false;
  auto frame = link.b->receive(cancel, waited_s);
  ASSERT_TRUE(frame);
  EXPECT_EQ(frame->header.sample_id, 5u);
}

// Without a limit it waits as long as it takes (many polls), with one it gives up then.
TEST(InProcessLink, ReceiveUntilCancelledWaitsPastManyPollsAndGivesUpOnlyAtItsLimit) {
  auto link = make_in_process_link("a", "b");
  const std::atomic<bool> cancel{false};
  double waited_s = 0;
  auto late = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(500ms);  // the frame is late on purpose: what is tested is the wait
    link.a->send(float_frame(FrameType::Activations, 6, 8), 1s);
  });
  auto frame = link.b->receive(cancel, waited_s);
  ASSERT_TRUE(frame);
  EXPECT_EQ(frame->header.sample_id, 6u);
  EXPECT_GE(waited_s, 0.4);
  late.get();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(link.b->receive(cancel, waited_s, 300ms));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 300ms);
}

}  // namespace
}  // namespace mdi
