// The secondary daemon against bad input, auth, and a dying peer: live
// processes on loopback. After every bad input the daemon still answers.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>

#include "common/net/http/control_plane.hpp"
#include "common/net/ring_setup.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/model_store.hpp"
#include "common/store/sha256.hpp"
#include "common/train/plan.hpp"
#include "common/wire/frame.hpp"
#include "common/wire/init_request.hpp"
#include "tests/support.hpp"

namespace {
namespace fs = std::filesystem;
using mdi::test::ChildProcess;
using std::chrono::milliseconds;
using std::chrono::seconds;

// A loopback nodes-config of n nodes on free ports, with short timeouts.
nlohmann::json loopback_config(size_t n_nodes, const std::string& auth_token = "", uint64_t max_frame_bytes = 0) {
  auto config = mdi::test::loopback_nodes_config(
      n_nodes, {{"connect_s", 5}, {"accept_s", 5}, {"receive_s", 3}, {"http_init_s", 20}, {"heartbeat_s", 0.5}});
  if (!auth_token.empty()) config["auth_token"] = auth_token;
  if (max_frame_bytes) config["max_frame_bytes"] = max_frame_bytes;
  return config;
}

uint16_t control_port(const nlohmann::json& config, size_t index) {
  return config["nodes"]["secondary"][index]["communication"]["port"].get<uint16_t>();
}

class Daemon : public ::testing::Test {
 protected:
  void SetUp() override {
    reader_ = mdi::open_random("random:stories260K", 1);
    model_dir_ = dir_ / "model";
    mdi::write_model_directory(*reader_, model_dir_, torch::kFloat32, "random", nullptr);
    for (size_t n : {2, 3}) mdi::write_chunks(model_dir_, mdi::balanced_layer_counts(reader_->config(), n), nullptr);
  }

  fs::path write_config(const nlohmann::json& config, const std::string& name) {
    const fs::path path = dir_ / (name + ".json");
    std::ofstream(path) << config.dump(2);
    return path;
  }

  // `launcher` goes before the binary, e.g. a shell that sets limits and execs it.
  std::unique_ptr<ChildProcess> start_secondary(const fs::path& config, size_t index, std::map<std::string, std::string> env = {},
                                                std::vector<std::string> launcher = {}) {
    std::vector<std::string> argv = std::move(launcher);
    for (std::string arg : {(mdi::test::bin_dir() / "secondary").string(), std::string("--nodes-config"), config.string(),
                            std::to_string(index), std::string("--threads"), std::string("1"), std::string("--chunk-cache"),
                            (dir_ / ("cache" + std::to_string(index))).string(),
                            std::string("--chunk-dir"), dir_.path().string()})
      argv.push_back(std::move(arg));
    return std::make_unique<ChildProcess>(argv, dir_.path(), config.stem().string() + "-secondary" + std::to_string(index), env);
  }

  // Waits until the daemon answers /status (it may still be starting).
  mdi::HttpResult status(mdi::ControlClient& client) {
    return mdi::request_with_retry(client, "GET", "/status", nullptr, seconds(20));
  }

  // A valid /init for secondary `index` of `config`.
  nlohmann::json init_body(const nlohmann::json& config, size_t index, uint64_t run_id) {
    const size_t n_nodes = config["nodes"]["secondary"].size() + 1;
    auto manifest = mdi::ChunkManifest::load(mdi::manifest_path(model_dir_, n_nodes));
    const auto& entry = manifest.secondary(static_cast<int64_t>(index));
    mdi::InitRequest r;
    r.run_id = run_id;
    r.ring_index = index + 1;
    r.nodes_json = config;
    r.nodes = mdi::parse_nodes_config(config, "test");
    r.model = manifest.model;
    r.layer_begin = entry.layer_begin;
    r.layer_end = entry.layer_end;
    r.dtype = "float32";
    r.max_seq_len = manifest.model.max_seq_len;
    r.chunk_sha256 = entry.sha256;
    r.chunk_path = (mdi::manifest_path(model_dir_, n_nodes).parent_path() / entry.file).string();
    r.chunk_bytes = entry.bytes;
    return r.to_json();
  }

  void fail_secondary_0_mid_run(int signal, std::chrono::seconds within);

  // From here on the runs use a random Llama of this shape (FFN 4 x hidden), split so.
  void use_random_model(const std::string& name, int64_t hidden, int64_t layers, int64_t context, std::vector<int64_t> split) {
    const nlohmann::json shape = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", hidden}, {"intermediate_size", 4 * hidden},
                                  {"num_hidden_layers", layers}, {"num_attention_heads", 8}, {"num_key_value_heads", 8},
                                  {"vocab_size", 512}, {"max_position_embeddings", context}, {"rms_norm_eps", 1e-5},
                                  {"tie_word_embeddings", false}};
    std::ofstream(dir_ / (name + "-config.json")) << shape.dump();
    auto reader = mdi::open_checkpoint("random:" + (dir_ / (name + "-config.json")).string());
    model_dir_ = dir_ / name;
    mdi::write_model_directory(*reader, model_dir_, torch::kFloat32, "random", nullptr);
    mdi::write_chunks(model_dir_, split, nullptr);
  }

  mdi::test::ScratchDir dir_;
  std::unique_ptr<mdi::CheckpointReader> reader_;
  fs::path model_dir_;
};

TEST_F(Daemon, BadControlPlaneInputGetsAClearErrorAndTheDaemonKeepsServing) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "badhttp"), 0);
  mdi::ControlClient client("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>());
  ASSERT_EQ(status(client).body["state"], "idle");

  struct Case {
    std::string body;
    int status;
    std::string expect;
  };
  auto impossible = init_body(config, 0, 1);
  impossible["layers"] = {3, 9};
  auto missing = init_body(config, 0, 1);
  missing.erase("model");
  auto wrong_index = init_body(config, 0, 1);
  wrong_index["ring_index"] = 5;
  auto nested = [](size_t depth) { return "{\"run_id\": " + std::string(depth, '[') + std::string(depth, ']') + "}"; };
  std::string wide_run_id = "{\"run_id\": [0";
  for (int i = 0; i < 20000; ++i) wide_run_id += ",0";
  wide_run_id += "]}";
  const std::vector<Case> cases = {
      {"{not json", 400, "malformed JSON"},
      {"{\"a\": \"" + std::string(100000, 'x') + " ", 400, "malformed JSON"},
      {"{}", 400, "missing field"},
      {missing.dump(), 400, "\"model\""},
      {impossible.dump(), 400, "impossible"},
      {wrong_index.dump(), 400, "ring_index 5"},
      {nested(100000), 400, "nests deeper than 64 levels"},
      {nested(20000), 400, "nests deeper than 64 levels"},
      {wide_run_id, 400, "\"run_id\" must be a non-negative integer, got [0,0,"},
      {std::string(2 << 20, ' '), 413, ""},
  };
  for (auto& c : cases) {
    mdi::ControlClient raw("127.0.0.1", client.port());
    // the client only sends JSON it built; send the text as written
    const fs::path file = dir_ / "body.txt";
    std::ofstream(file) << c.body;
    auto result = raw.upload_file("POST", "/init", file);
    EXPECT_EQ(result.status, c.status) << c.body.substr(0, 40) << " → " << result.body.dump().substr(0, 400);
    if (!c.expect.empty()) {
      EXPECT_NE(result.body.value("error", std::string()).find(c.expect), std::string::npos) << result.body.dump().substr(0, 400);
    }
    // a message quotes a bad value only in part, never echoing the request back
    EXPECT_LT(result.body.dump().size(), 400u) << c.body.substr(0, 40);
    EXPECT_EQ(status(client).body["state"], "idle") << "after " << c.body.substr(0, 40);
  }
  // nor a path nobody routes
  const auto unrouted = client.request("GET", "/" + std::string(10000, 'a'));
  EXPECT_EQ(unrouted.status, 404);
  EXPECT_LT(unrouted.body.dump().size(), 200u) << unrouted.body.dump().substr(0, 400);
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, AChunkPathThatIsNotARegularFileGets400AndTheNodeStaysIdle) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "badpath"), 0);
  // Bounded, so a node hashing /dev/zero forever fails the test instead of hanging it.
  mdi::ControlClient client("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>(), "", seconds(5));
  ASSERT_EQ(status(client).body["state"], "idle");
  fs::create_directories(dir_ / "a-directory");
  ASSERT_EQ(::mkfifo((dir_ / "fifo.safetensors").c_str(), 0600), 0);
  // Inside the node's --chunk-dir but not a file: refused at once, never opened.
  for (const fs::path& path : {dir_ / "a-directory", dir_ / "fifo.safetensors"}) {
    auto body = init_body(config, 0, 4);
    body["chunk"]["path"] = path.string();
    mdi::HttpResult result{0, nullptr};
    ASSERT_NO_THROW(result = client.request("POST", "/init", &body)) << path;
    EXPECT_EQ(result.status, 400) << path << " → " << result.body;
    EXPECT_NE(result.body.value("error", std::string()).find(path.string() + "\" is not a regular file"), std::string::npos) << result.body;
    EXPECT_EQ(client.request("GET", "/status").body["state"], "idle") << "after " << path;
  }
  auto good = init_body(config, 0, 5);
  EXPECT_EQ(client.request("POST", "/init", &good).status, 200) << "a refused /init must not leave the node busy";
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

// A loopback connection that sends nothing.
int connect_idle(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in remote{AF_INET, htons(port), {htonl(INADDR_LOOPBACK)}, {}};
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof remote), 0);
  return fd;
}

// Whether the peer has closed `fd` (it sends nothing else on an idle connection).
bool closed_by_peer(int fd) {
  pollfd readable{fd, POLLIN, 0};
  char byte;
  return ::poll(&readable, 1, 0) == 1 && ::recv(fd, &byte, 1, MSG_DONTWAIT) <= 0;
}

TEST_F(Daemon, WithFewFileDescriptorsIdleConnectionsNeitherLockTheStarterOutNorFloodTheLog) {
  auto config = loopback_config(2);
  // `ulimit -n 64`, as in the issue: the node serves at most 32 connections at once.
  auto secondary = start_secondary(write_config(config, "fdlimit"), 0, {}, {"/bin/sh", "-c", "ulimit -n 64 && exec \"$0\" \"$@\""});
  const auto port = config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>();
  mdi::ControlClient client("127.0.0.1", port, "", seconds(2));

  // A careless client's 80 idle connections: each past the 32nd displaces the one idle longest.
  // They are the node's first connections: an earlier request's session could still hold a
  // place while they arrive, and free it at any time after.
  std::vector<int> idle;
  ASSERT_TRUE(mdi::test::wait_until([&] {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in remote{AF_INET, htons(port), {htonl(INADDR_LOOPBACK)}, {}};
    if (::connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof remote) != 0) {
      ::close(fd);
      return false;
    }
    idle.push_back(fd);
    return true;
  }, seconds(20))) << "the node never listened";
  while (idle.size() < 80) idle.push_back(connect_idle(port));
  auto closed_among = [&](size_t begin, size_t end) {
    return static_cast<size_t>(std::count_if(idle.begin() + begin, idle.begin() + end, closed_by_peer));
  };
  EXPECT_TRUE(mdi::test::wait_until([&] { return closed_among(0, 48) == 48; }, seconds(5)))
      << closed_among(0, 48) << " of the 48 oldest closed";
  const size_t oldest_open = 48;
  EXPECT_EQ(closed_among(oldest_open, 80), 0u);

  const auto asked_at = std::chrono::steady_clock::now();
  mdi::HttpResult result{0, nullptr};
  ASSERT_NO_THROW(result = client.request("GET", "/status"));
  EXPECT_EQ(result.status, 200);
  EXPECT_LT(std::chrono::steady_clock::now() - asked_at, milliseconds(500));
  EXPECT_TRUE(mdi::test::wait_until([&] { return closed_among(oldest_open, oldest_open + 1) == 1; }, seconds(5)))
      << "the starter displaced the oldest";
  EXPECT_EQ(closed_among(oldest_open + 1, 80), 0u);
  for (int fd : idle) ::close(fd);
  EXPECT_EQ(status(client).body["state"], "idle");

  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0);
  const std::string log = secondary->err();
  EXPECT_NE(log.find("at most 32 connections at once (half the open-file limit of 64"), std::string::npos) << log.substr(0, 2000);
  EXPECT_LT(std::count(log.begin(), log.end(), '\n'), 20) << log.substr(0, 2000);
  EXPECT_LT(log.size(), 4000u) << log.substr(0, 2000);
}

// Every place taken by a request stalled mid-body, and the connections refused with 503
// never closed by their peers: the 503s still go out, so a client is told to retry
// rather than cut off unanswered until the stalled requests time out (30 s).
TEST_F(Daemon, WhenEveryConnectionIsMidRequestNewOnesStillGet503AndRefusedOnesDoNotHoldTheirPlace) {
  auto config = loopback_config(2);
  // 32 places (half of 64 descriptors), so few connections fill them
  auto secondary = start_secondary(write_config(config, "midbody"), 0, {}, {"/bin/sh", "-c", "ulimit -n 64 && exec \"$0\" \"$@\""});
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "", seconds(2));
  ASSERT_EQ(status(client).body["state"], "idle");
  const std::string stalled = "POST /init HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
  std::vector<int> held;
  auto answer_of = [&](int fd) {
    char reply[64] = {};
    pollfd readable{fd, POLLIN, 0};
    if (::poll(&readable, 1, 2000) != 1) return std::string("no answer");
    const ssize_t n = ::recv(fd, reply, sizeof reply - 1, 0);
    return n <= 0 ? std::string("closed") : std::string(reply, static_cast<size_t>(n)).substr(0, 12);
  };
  for (int i = 0; i < 40; ++i) {
    held.push_back(connect_idle(control_port(config, 0)));
    ::send(held.back(), stalled.data(), stalled.size(), MSG_NOSIGNAL);
  }
  // Past the places and the refusals under way, each new connection, kept open as a
  // careless client would, is answered 503 once a refused one has had its second.
  for (int round = 0; round < 3; ++round) {
    const auto asked_at = std::chrono::steady_clock::now();
    std::string answer;
    ASSERT_TRUE(mdi::test::wait_until([&] {
      const int fd = connect_idle(control_port(config, 0));
      ::send(fd, stalled.data(), stalled.size(), MSG_NOSIGNAL);
      held.push_back(fd);
      answer = answer_of(fd);
      return answer == "HTTP/1.1 503";
    }, seconds(10))) << "round " << round << ": last answer " << answer;
    EXPECT_LT(std::chrono::steady_clock::now() - asked_at, seconds(5)) << "round " << round;
  }
  for (int fd : held) ::close(fd);
  EXPECT_TRUE(mdi::test::wait_until([&] {
    try {
      return client.request("GET", "/status").status == 200;
    } catch (const mdi::ControlPlaneError&) {
      return false;
    }
  }, seconds(10)));
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

// Plays the starter of a 2-node ring by hand: accepts the secondary's
// connection with the real transport, and opens its own connection to the
// secondary's port_in from a raw socket, so it can send anything.
class HandRing {
 public:
  HandRing(const nlohmann::json& config, uint64_t run_id) : config_(mdi::parse_nodes_config(config, "test")), run_id_(run_id) {
    listener_ = std::make_unique<mdi::RingListener>(config_, 0);
    accepted_ = std::async(std::launch::async, [this] { return listener_->accept_prev(run_id_, {}); });
  }

  // Connects from the starter's port_out and exchanges Hellos, proving `token` (by
  // default the config's); returns the socket.
  int connect_and_hello(std::optional<std::string> token = std::nullopt) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in local{AF_INET, htons(config_.starter.port_out), {htonl(INADDR_LOOPBACK)}, {}};
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&local), sizeof local), 0);
    sockaddr_in remote{AF_INET, htons(config_.secondaries[0].port_in), {htonl(INADDR_LOOPBACK)}, {}};
    bool connected = mdi::test::wait_until([&] { return ::connect(fd_, reinterpret_cast<sockaddr*>(&remote), sizeof remote) == 0; }, seconds(10));
    EXPECT_TRUE(connected);
    mdi::HelloInfo hello{0, 2, run_id_, mdi::new_hello_nonce(), {}};
    send_frame(mdi::make_hello_frame(hello));
    uint8_t reply[mdi::kFrameHeaderBytes + mdi::kHelloPayloadBytes];
    size_t got = 0;
    while (got < sizeof reply) {
      ssize_t n = ::recv(fd_, reply + got, sizeof reply - got, 0);
      if (n <= 0) break;
      got += size_t(n);
    }
    EXPECT_EQ(got, sizeof reply) << "no Hello back from the secondary";
    if (got != sizeof reply) return fd_;
    mdi::Frame answer;
    answer.header = mdi::decode_header(reply, {});
    answer.payload.assign(reply + mdi::kFrameHeaderBytes, reply + sizeof reply);
    const mdi::HelloInfo theirs = mdi::decode_hello(answer);
    hello.proof = mdi::hello_proof(token.value_or(config_.auth_token), mdi::HelloRole::connector, run_id_, 0, 1, hello.nonce, theirs.nonce);
    send_frame(mdi::make_hello_frame(hello));
    return fd_;
  }

  void send_frame(const mdi::Frame& frame) {
    uint8_t header[mdi::kFrameHeaderBytes];
    mdi::encode_header(frame.header, header);
    send_bytes(header, sizeof header);
    send_bytes(frame.payload.data(), frame.payload.size());
  }
  void send_bytes(const void* data, size_t n) { ASSERT_EQ(::send(fd_, data, n, MSG_NOSIGNAL), ssize_t(n)); }
  void close_socket() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  ~HandRing() {
    close_socket();
    listener_->cancel();
    try {
      accepted_.get();
    } catch (...) {
    }
  }

 private:
  mdi::NodesConfig config_;
  uint64_t run_id_;
  std::unique_ptr<mdi::RingListener> listener_;
  std::future<std::unique_ptr<mdi::TcpLink>> accepted_;
  int fd_ = -1;
};

TEST_F(Daemon, BadFramesEndThatRunWithAClearErrorAndTheDaemonGoesBackToIdle) {
  auto config = loopback_config(2, "", /*max_frame_bytes=*/64 * 1024);
  auto secondary = start_secondary(write_config(config, "badframes"), 0);
  mdi::ControlClient client("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>());
  ASSERT_EQ(status(client).body["state"], "idle");

  auto header_bytes = [](mdi::FrameHeader h) {
    std::vector<uint8_t> bytes(mdi::kFrameHeaderBytes);
    mdi::encode_header(h, bytes.data());
    return bytes;
  };
  auto activations = [](uint32_t tokens, uint32_t dim) {
    mdi::FrameHeader h;
    h.type = mdi::FrameType::Activations;
    h.n_tokens = tokens;
    h.ndim = 2;
    h.shape = {tokens, dim, 0, 0};
    h.payload_bytes = uint64_t(tokens) * dim * 4;
    return h;
  };
  struct Case {
    std::string name;
    std::vector<uint8_t> bytes;
    std::string expect;
  };
  std::vector<Case> cases;
  {
    auto b = header_bytes(activations(1, 64));
    b[0] ^= 0xff;
    cases.push_back({"wrong magic", b, "magic"});
  }
  {
    auto b = header_bytes(activations(1, 64));
    b[4] = 9;
    cases.push_back({"wrong version", b, "version"});
  }
  {
    auto b = header_bytes(activations(1, 64));
    b[6] = 77;
    cases.push_back({"unknown type", b, "type"});
  }
  {
    auto h = activations(1, 64);
    h.payload_bytes = 100;
    cases.push_back({"shape does not match payload", header_bytes(h), "payload"});
  }
  cases.push_back({"payload over the configured maximum", header_bytes(activations(1024, 64)), "payload"});
  {
    auto b = header_bytes(activations(1, 64));
    b.resize(b.size() + 100);  // 256 bytes announced, 100 sent, then the connection closes
    cases.push_back({"truncated frame", b, "closed"});
  }
  {
    auto h = activations(1, 32);  // well-formed frame, wrong hidden size for this model
    auto b = header_bytes(h);
    b.resize(b.size() + 128);
    cases.push_back({"wrong hidden size", b, "expected [n_tokens, 64]"});
  }

  uint64_t run_id = 100;
  for (auto& c : cases) {
    ++run_id;
    auto body = init_body(config, 0, run_id);
    ASSERT_EQ(client.request("POST", "/init", &body).status, 200) << c.name;
    {
      HandRing ring(config, run_id);
      ring.connect_and_hello();
      ring.send_bytes(c.bytes.data(), c.bytes.size());
      if (c.name == "truncated frame") ring.close_socket();
      // the run ends on the secondary, which goes back to idle and says why
      bool idle = mdi::test::wait_until([&] {
        auto s = client.request("GET", "/status").body;
        return s["state"] == "idle" && s.contains("last_error");
      }, seconds(15));
      EXPECT_TRUE(idle) << c.name;
    }
    auto s = client.request("GET", "/status").body;
    EXPECT_NE(s.value("last_error", "").find(c.expect), std::string::npos) << c.name << ": " << s;
  }
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, DataPortRefusesAConnectionThatIsNotThePreviousNode) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "stranger"), 0);
  mdi::ControlClient client("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>());
  ASSERT_EQ(status(client).body["state"], "idle");
  auto body = init_body(config, 0, 7);
  ASSERT_EQ(client.request("POST", "/init", &body).status, 200);
  // a stranger: right address, but not the previous node's source port
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in remote{AF_INET, htons(config["nodes"]["secondary"][0]["inference"]["port_in"].get<uint16_t>()), {htonl(INADDR_LOOPBACK)}, {}};
  ASSERT_TRUE(mdi::test::wait_until([&] { return ::connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof remote) == 0; }, seconds(10)));
  char byte;
  EXPECT_EQ(::recv(fd, &byte, 1, 0), 0) << "the stranger's connection should be closed";
  ::close(fd);
  // another stranger: the previous node's source port, but from another address
  fd = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in other{AF_INET, htons(config["nodes"]["starter"]["inference"]["port_out"].get<uint16_t>()), {htonl(0x7f000002)}, {}};
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&other), sizeof other), 0) << "127.0.0.2";
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof remote), 0);
  EXPECT_EQ(::recv(fd, &byte, 1, 0), 0) << "a connection from 127.0.0.2 should be closed";
  ::close(fd);
  // the real previous node is still accepted afterwards
  {
    HandRing ring(config, 7);
    ring.connect_and_hello();
    EXPECT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "running"; }, seconds(10)));
  }
  EXPECT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "idle"; }, seconds(15)));
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0);
}

// The hijack of issue 17: a same-host process binds the starter's port_out and says
// Hello with the run id. With a token, its Hello must prove it, so it is refused.
TEST_F(Daemon, WithATokenAHelloFromTheStartersPortThatCannotProveTheTokenIsRefused) {
  auto config = loopback_config(2, "s3cret");
  auto secondary = start_secondary(write_config(config, "forger"), 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "s3cret");
  ASSERT_EQ(status(client).body["state"], "idle");
  auto body = init_body(config, 0, 7);
  ASSERT_EQ(client.request("POST", "/init", &body).status, 200);
  for (const std::string token : {"", "not the token"}) {
    HandRing forger(config, 7);
    const int fd = forger.connect_and_hello(token);
    pollfd readable{fd, POLLIN, 0};
    ASSERT_EQ(::poll(&readable, 1, 5000), 1) << "the node neither answered nor closed the forger's connection";
    char byte;
    EXPECT_LE(::recv(fd, &byte, 1, 0), 0) << "a Hello proving \"" << token << "\" was taken";
    EXPECT_EQ(client.request("GET", "/status").body["state"], "ready");
  }
  {
    HandRing ring(config, 7);
    ring.connect_and_hello();
    EXPECT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "running"; }, seconds(10)));
  }
  EXPECT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "idle"; }, seconds(15)));
  EXPECT_NE(secondary->err().find("does not prove the ring's auth_token"), std::string::npos) << secondary->err();
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, WithATokenEveryRequestNeedsItAndTheStarterSendsIt) {
  auto config = loopback_config(2, "s3cret");
  const fs::path path = write_config(config, "auth");
  auto secondary = start_secondary(path, 0);
  const auto port = config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>();
  mdi::ControlClient anonymous("127.0.0.1", port), wrong("127.0.0.1", port, "nope"), right("127.0.0.1", port, "s3cret");
  ASSERT_EQ(mdi::request_with_retry(right, "GET", "/status", nullptr, seconds(20)).status, 200);
  EXPECT_EQ(anonymous.request("GET", "/status").status, 401);
  auto body = init_body(config, 0, 3);
  EXPECT_EQ(anonymous.request("POST", "/init", &body).status, 401);
  EXPECT_EQ(wrong.request("POST", "/init", &body).status, 401);
  EXPECT_EQ(right.request("GET", "/status").body["state"], "idle") << "a refused /init must not start anything";
  // The scheme is case-insensitive (RFC 7235); the token is not.
  const fs::path empty_body = dir_ / "empty";
  std::ofstream{empty_body};
  auto reset_with = [&](const std::string& authorization) {
    return anonymous.upload_file("POST", "/reset", empty_body, {{"Authorization", authorization}}).status;
  };
  EXPECT_EQ(reset_with("bearer s3cret"), 200);
  EXPECT_EQ(reset_with("BEARER s3cret"), 200);
  EXPECT_EQ(reset_with("bearer S3CRET"), 401);
  EXPECT_EQ(reset_with("bearers3cret"), 401);

  auto starter = [&](std::map<std::string, std::string> env) {
    ChildProcess p({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(), "--n-tokens",
                    "8", "--prompt", "a", "--keep-nodes", "--threads", "1"},
                   dir_.path(), "auth-starter", env);
    auto code = p.wait(seconds(120));
    return std::make_pair(code.value_or(-1), p.err());
  };
  auto [bad_code, bad_err] = starter({{"MDI_TOKEN", "nope"}});
  EXPECT_EQ(bad_code, 1);
  EXPECT_NE(bad_err.find("401"), std::string::npos) << bad_err;
  auto [good_code, good_err] = starter({});
  EXPECT_EQ(good_code, 0) << good_err;
  EXPECT_EQ(right.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0);
}

TEST_F(Daemon, WithoutATokenRequestsAreServed) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "noauth"), 0);
  mdi::ControlClient client("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>());
  EXPECT_EQ(status(client).status, 200);
  auto body = init_body(config, 0, 9);
  EXPECT_EQ(client.request("POST", "/init", &body).status, 200);
  EXPECT_EQ(client.request("POST", "/reset").status, 200);
  EXPECT_EQ(client.request("GET", "/status").body["state"], "idle");
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0);
}

// A ring run that ended early: every sample cut short with `reason` in --out, with
// tokens past its prompt, and printed with the reason after the per-sample lines.
void expect_cut_short(const fs::path& out, const std::string& printed, const std::string& reason, size_t n_samples) {
  const auto result = nlohmann::json::parse(mdi::test::read_file(out));
  EXPECT_TRUE(result.contains("error")) << result.dump().substr(0, 500);
  ASSERT_EQ(result.at("samples").size(), n_samples);
  size_t generated = 0, index = 0;
  for (const auto& sample : result.at("samples")) {
    EXPECT_EQ(sample.at("stop_reason"), reason);
    generated += sample.at("tokens").size() - sample.at("prompt_tokens").size();
    // printed as the tokens' bytes (random weights give invalid UTF-8, which --out replaces)
    EXPECT_NE(printed.find("[sample " + std::to_string(index++) + "] a"), std::string::npos) << printed;
  }
  EXPECT_EQ(mdi::test::count(printed, " [" + reason + "]\n"), n_samples) << printed;
  EXPECT_GT(generated, 0u);
  EXPECT_EQ(result.at("stats").at("generated_tokens"), generated);
}

// Secondary 0 killed, or frozen, mid-run: the starter stops, names that node once (not
// secondary 1, whose link to the starter is the one that breaks first), and keeps the
// samples' tokens; the survivor goes back to idle.
void Daemon::fail_secondary_0_mid_run(int signal, std::chrono::seconds within) {
  auto config = loopback_config(3);
  config.erase("timeouts");  // the defaults are what users get
  const std::string name = signal == SIGKILL ? "kill" : "freeze";
  const fs::path path = write_config(config, name);
  auto s0 = start_secondary(path, 0), s1 = start_secondary(path, 1);
  mdi::ControlClient c0("127.0.0.1", control_port(config, 0)), c1("127.0.0.1", control_port(config, 1));
  ASSERT_EQ(status(c0).status, 200);
  ASSERT_EQ(status(c1).status, 200);
  const fs::path out = dir_ / (name + "-out.json");
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                        "--n-samples", "3", "--n-tokens", "500", "--prompt", "a", "--threads", "1", "--out", out.string()},
                       dir_.path(), name + "-starter");
  ASSERT_TRUE(mdi::test::wait_until([&] {
    auto s = c0.request("GET", "/status").body;
    return s["state"] == "running" && s["stage"]["frames"].get<int64_t>() > 10;
  }, seconds(60))) << starter.err();
  s0->kill(signal);
  const auto failed_at = std::chrono::steady_clock::now();
  auto code = starter.wait(within);
  if (signal == SIGSTOP) s0->kill(SIGCONT);
  ASSERT_TRUE(code.has_value()) << "the starter did not stop within " << within.count() << " s";
  EXPECT_LT(std::chrono::steady_clock::now() - failed_at, within);
  EXPECT_EQ(*code, 1);
  const std::string err = starter.err();
  const std::string named = "secondary 0 (127.0.0.1:" + std::to_string(control_port(config, 0)) + ") stopped answering, so the run stopped";
  EXPECT_EQ(mdi::test::count(err, named), 1u) << err;
  EXPECT_EQ(mdi::test::count(err, "secondary 1 (127.0.0.1:" + std::to_string(control_port(config, 1)) + ") stopped answering"), 0u) << err;
  // the link's error, which the message quotes, is printed once
  const size_t seen = err.find("the starter saw: ");
  ASSERT_NE(seen, std::string::npos) << err;
  const std::string link_error = err.substr(seen + 17, err.find(')', err.find(')', seen) + 1) - seen - 17);
  EXPECT_EQ(mdi::test::count(err, link_error.substr(0, 40)), 1u) << link_error << "\n" << err;
  expect_cut_short(out, starter.out(), "failed", 3);
  // the survivor is idle, answers, and takes a new /init
  EXPECT_TRUE(mdi::test::wait_until([&] { return c1.request("GET", "/status").body["state"] == "idle"; }, seconds(15)));
  auto body = init_body(config, 1, 42);
  EXPECT_EQ(c1.request("POST", "/init", &body).status, 200);
  EXPECT_EQ(c1.request("PUT", "/stop").status, 200);
  EXPECT_EQ(s1->wait(seconds(40)), 0);
}

TEST_F(Daemon, ASecondaryKilledMidRunStopsTheStarterWithin10sNamingIt) { fail_secondary_0_mid_run(SIGKILL, seconds(10)); }

// The starter's link to the frozen node goes silent: receive_s (10 s), then 5 s for the
// status query that finds which node it was.
TEST_F(Daemon, ASecondaryFrozenMidRunStopsTheStarterWithin20sNamingIt) { fail_secondary_0_mid_run(SIGSTOP, seconds(20)); }

// One thread of a child process stopped with ptrace while its others run on: a node
// whose compute hangs while its link threads keep sending heartbeats.
class FrozenThread {
 public:
  FrozenThread(pid_t pid, const std::string& name) {
    for (const auto& task : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
      std::string comm = mdi::test::read_file(task.path() / "comm");
      if (comm != name + "\n") continue;
      if (tid_ != 0) throw std::runtime_error("process " + std::to_string(pid) + " has more than one thread named " + name);
      tid_ = std::stoi(task.path().filename().string());
    }
    if (tid_ == 0) throw std::runtime_error("process " + std::to_string(pid) + " has no thread named " + name);
    if (::ptrace(PTRACE_SEIZE, tid_, nullptr, nullptr) != 0 || ::ptrace(PTRACE_INTERRUPT, tid_, nullptr, nullptr) != 0)
      throw std::runtime_error(std::string("ptrace: ") + std::strerror(errno));
    int status = 0;
    if (::waitpid(tid_, &status, __WALL) != tid_) throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
  }
  ~FrozenThread() { ::ptrace(PTRACE_DETACH, tid_, nullptr, nullptr); }
  FrozenThread(const FrozenThread&) = delete;
  FrozenThread& operator=(const FrozenThread&) = delete;

 private:
  pid_t tid_ = 0;
};

TEST_F(Daemon, ANodeWhoseComputeHangsWhileItsLinksLiveStopsTheRunAfterTheProgressTimeout) {
  // Steps of a few ms, so the run is still going when its node's compute is frozen.
  use_random_model("medium", 512, 4, 2048, {1, 3});
  auto config = loopback_config(2);
  config["timeouts"]["progress_s"] = 2;
  const fs::path path = write_config(config, "stuck");
  auto s0 = start_secondary(path, 0);
  mdi::ControlClient c0("127.0.0.1", control_port(config, 0));
  ASSERT_EQ(status(c0).status, 200);
  const fs::path out = dir_ / "stuck-out.json";
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                        "--n-samples", "2", "--n-tokens", "2000", "--prompt", "a", "--threads", "1", "--out", out.string()},
                       dir_.path(), "stuck-starter");
  ASSERT_TRUE(mdi::test::wait_until([&] {
    auto s = c0.request("GET", "/status").body;
    return s["state"] == "running" && s["stage"]["frames"].get<int64_t>() > 10;
  }, seconds(60))) << starter.err();
  std::optional<int> code;
  {
    FrozenThread compute(s0->pid(), "mdi-ring");
    const auto frozen_at = std::chrono::steady_clock::now();
    // 2 s without progress, then up to 10 s for the stuck node to refuse its /stop
    code = starter.wait(seconds(20));
    ASSERT_TRUE(code.has_value()) << "the starter waited on a stuck ring for 20 s\n" << starter.err();
    EXPECT_GE(std::chrono::steady_clock::now() - frozen_at, seconds(2));
    EXPECT_EQ(c0.request("GET", "/status").body["state"], "running") << "the node's links and control plane were meant to live on";
  }
  EXPECT_EQ(*code, 1);
  EXPECT_NE(starter.err().find("no frame came back around the ring for 2000 ms"), std::string::npos) << starter.err();
  expect_cut_short(out, starter.out(), "failed", 2);
  // its compute free again, the node finds its run cancelled and goes back to idle
  EXPECT_TRUE(mdi::test::wait_until([&] { return c0.request("GET", "/status").body["state"] == "idle"; }, seconds(15)));
  EXPECT_EQ(c0.request("PUT", "/stop").status, 200);
  EXPECT_EQ(s0->wait(seconds(20)), 0);
}

TEST_F(Daemon, SigintStopsARingRunKeepingEverySamplesTokensAndTheNodeGoesBackToIdle) {
  auto config = loopback_config(2);
  const fs::path path = write_config(config, "sigint");
  auto s0 = start_secondary(path, 0);
  mdi::ControlClient c0("127.0.0.1", config["nodes"]["secondary"][0]["communication"]["port"].get<uint16_t>());
  ASSERT_EQ(status(c0).status, 200);
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                        "--n-samples", "3", "--n-tokens", "500", "--prompt", "a", "--threads", "1", "--micro-batch", "67", "--out",
                        (dir_ / "sigint-out.json").string()},
                       dir_.path(), "sigint-starter");
  ASSERT_TRUE(mdi::test::wait_until([&] {
    auto s = c0.request("GET", "/status").body;
    return s["state"] == "running" && s["stage"]["frames"].get<int64_t>() > 10;
  }, seconds(60))) << starter.err();
  starter.kill(SIGINT);
  auto code = starter.wait(seconds(10));
  ASSERT_TRUE(code.has_value()) << "SIGINT did not stop the starter within 10 s";
  EXPECT_EQ(*code, 128 + SIGINT) << starter.err();
  EXPECT_NE(starter.err().find("interrupted by SIGINT"), std::string::npos) << starter.err();
  // --micro-batch 67 with 3 samples: frames carry 3 at most (and never more than 32 rows)
  EXPECT_NE(starter.err().find("micro-batches of up to 3 samples per frame"), std::string::npos) << starter.err();
  expect_cut_short(dir_ / "sigint-out.json", starter.out(), "interrupted", 3);
  // the starter reset the node on its way out: no run left behind
  EXPECT_EQ(c0.request("GET", "/status").body["state"], "idle");
  EXPECT_EQ(c0.request("PUT", "/stop").status, 200);
  EXPECT_EQ(s0->wait(seconds(20)), 0);
}

void write_bytes(const fs::path& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

TEST_F(Daemon, AnInitNamesOnlyFilesInTheNodesChunkDirsAndTheNodeTakesOnlyTheUploadItAskedFor) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "paths"), 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "", seconds(5));
  ASSERT_EQ(status(client).body["state"], "idle");
  const std::string passwd_digest = mdi::sha256_file("/etc/passwd");
  fs::create_symlink("/etc/passwd", dir_ / "passwd.safetensors");
  // Outside --chunk-dir (a symbolic link is judged by where it leads): neither read
  // nor hashed, so the answer gives nothing away; the starter would upload instead.
  for (const fs::path& path : {fs::path("/etc/passwd"), fs::path("/dev/zero"), dir_ / "passwd.safetensors"}) {
    auto body = init_body(config, 0, 4);
    body["chunk"]["path"] = path.string();
    mdi::HttpResult result{0, nullptr};
    ASSERT_NO_THROW(result = client.request("POST", "/init", &body)) << path;
    EXPECT_EQ(result.status, 404) << path << " → " << result.body;
    EXPECT_TRUE(result.body.value("need_upload", false)) << result.body;
    EXPECT_NE(result.body.value("error", "").find("outside this node's chunk directories"), std::string::npos) << result.body;
    EXPECT_EQ(result.body.dump().find(passwd_digest), std::string::npos) << result.body;
  }
  // Inside, of the manifest's size, one byte changed: hashed, and refused naming both digests.
  auto body = init_body(config, 0, 5);
  const fs::path chunk = body["chunk"]["path"].get<std::string>();
  std::string bytes = mdi::test::read_file(chunk);
  bytes.back() ^= 1;
  write_bytes(dir_ / "flipped.safetensors", bytes);
  body["chunk"]["path"] = (dir_ / "flipped.safetensors").string();
  auto result = client.request("POST", "/init", &body);
  EXPECT_EQ(result.status, 400) << result.body;
  EXPECT_NE(result.body.value("error", "").find("has sha256 " + mdi::sha256_file(dir_ / "flipped.safetensors") + ", the starter expects"),
            std::string::npos)
      << result.body;

  // An upload nobody asked for is refused from its head and leaves nothing on disk.
  write_bytes(dir_ / "junk", std::string(1 << 20, 'x'));
  result = client.upload_file("POST", "/chunk?sha256=" + mdi::sha256_file(dir_ / "junk"), dir_ / "junk");
  EXPECT_EQ(result.status, 409) << result.body;
  EXPECT_NE(result.body.value("error", "").find("expects no upload"), std::string::npos) << result.body;
  auto stored = [&] {
    size_t files = 0;
    for (auto& entry : fs::recursive_directory_iterator(dir_ / "cache0")) files += entry.is_regular_file();
    return files;
  };
  EXPECT_EQ(stored(), 0u);

  // Asked for (need_upload): larger than the manifest says is refused from its head
  // too; the chunk itself is taken, and the next /init finds it.
  body["chunk"]["path"] = "";
  result = client.request("POST", "/init", &body);
  ASSERT_EQ(result.status, 404) << result.body;
  const std::string sha = body["chunk"]["sha256"];
  write_bytes(dir_ / "longer", mdi::test::read_file(chunk) + "x");
  result = client.upload_file("POST", "/chunk?sha256=" + sha, dir_ / "longer");
  EXPECT_EQ(result.status, 413) << result.body;
  EXPECT_EQ(stored(), 0u);
  EXPECT_EQ(client.upload_file("POST", "/chunk?sha256=" + sha, chunk).status, 200);
  EXPECT_EQ(client.request("POST", "/init", &body).status, 200);
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, StatusStopResetAndInitAnswerAtOnceDuringASlowLoadAndResetCancelsIt) {
  // Seven layers of 64 MiB: hashing and loading them takes long enough to be caught at it.
  use_random_model("big", 1024, 8, 256, {1, 7});
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "slowload"), 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "", seconds(60));
  mdi::ControlClient quick("127.0.0.1", control_port(config, 0), "", seconds(2));
  ASSERT_EQ(status(client).body["state"], "idle");

  const auto body = init_body(config, 0, 7);
  auto first = std::async(std::launch::async, [&] { return client.request("POST", "/init", &body); });
  ASSERT_TRUE(mdi::test::wait_until([&] { return quick.request("GET", "/status").body["state"] == "loading"; }, seconds(30)));
  // While it loads: another run's /init and another run's stop are refused at once.
  const auto other = init_body(config, 0, 8);
  auto answer = quick.request("POST", "/init", &other);
  EXPECT_EQ(answer.status, 409) << answer.body;
  answer = quick.request("PUT", "/stop?reset=1&run_id=8");
  EXPECT_EQ(answer.status, 409) << answer.body;
  EXPECT_EQ(answer.body.value("run_id", uint64_t{0}), 7u) << answer.body;
  EXPECT_EQ(quick.request("POST", "/reset?run_id=not-a-number").status, 400);
  // /reset of this run cancels the load, and answers once the node is idle.
  answer = mdi::ControlClient("127.0.0.1", control_port(config, 0), "", seconds(15)).request("POST", "/reset?run_id=7");
  EXPECT_EQ(answer.status, 200) << answer.body;
  EXPECT_EQ(quick.request("GET", "/status").body["state"], "idle");
  const auto cancelled = first.get();
  EXPECT_EQ(cancelled.status, 409) << cancelled.body;
  EXPECT_NE(cancelled.body.value("error", "").find("stopped while its chunk was loading"), std::string::npos) << cancelled.body;
  EXPECT_EQ(quick.request("GET", "/status").body["state"], "idle") << "a cancelled load must not come back as ready";
  // The node takes the next run, and a retried /init of it gets the same answer.
  const auto next = init_body(config, 0, 9);
  answer = client.request("POST", "/init", &next);
  ASSERT_EQ(answer.status, 200) << answer.body;
  const auto again = client.request("POST", "/init", &next);
  EXPECT_EQ(again.status, 200) << again.body;
  EXPECT_EQ(again.body, answer.body);
  EXPECT_EQ(quick.request("PUT", "/stop?run_id=9").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, ASecondStarterAimedAtABusyNodeLeavesItsRunAlone) {
  auto config = loopback_config(2);
  config["timeouts"]["connect_s"] = 120;  // the first run waits for its ring all through the test
  config["timeouts"]["accept_s"] = 120;
  const fs::path path = write_config(config, "busy");
  auto secondary = start_secondary(path, 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "", seconds(5));
  ASSERT_EQ(status(client).body["state"], "idle");
  const auto body = init_body(config, 0, 7);
  ASSERT_EQ(client.request("POST", "/init", &body).status, 200);

  ChildProcess second({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                       "--n-tokens", "4", "--prompt", "a", "--threads", "1"},
                      dir_.path(), "second-starter");
  const auto code = second.wait(seconds(60));
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 1);
  EXPECT_NE(second.err().find("a run is already going"), std::string::npos) << second.err();
  const auto s = client.request("GET", "/status").body;
  EXPECT_EQ(s["state"], "ready") << s;
  EXPECT_EQ(s["run_id"], 7) << s;
  EXPECT_EQ(client.request("PUT", "/stop?run_id=7").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, WhileASecondaryDoesNotAnswerTheStarterSaysSoEvery5sUntilItGivesUp) {
  auto config = loopback_config(2);  // secondary 0 is never started: its port is held, not listening
  config["timeouts"]["http_init_s"] = 6;
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", write_config(config, "absent").string(), "--ckpt",
                        model_dir_.string(), "--n-tokens", "4", "--prompt", "a", "--threads", "1"},
                       dir_.path(), "absent-starter");
  const auto code = starter.wait(seconds(30));
  ASSERT_TRUE(code.has_value()) << starter.err();
  EXPECT_EQ(*code, 1);
  const std::string err = starter.err();
  const std::string retrying = "secondary 0 (127.0.0.1:" + std::to_string(control_port(config, 0)) + "): ";
  EXPECT_EQ(mdi::test::count(err, "; retrying for up to "), 2u) << err;  // at once, and 5 s later
  EXPECT_NE(err.find(retrying), std::string::npos) << err;
  EXPECT_NE(err.find("is it running, at that address?"), std::string::npos) << err;
  EXPECT_NE(err.find("gave up after"), std::string::npos) << err;
}

TEST_F(Daemon, AnInitWithALeaseIsDroppedOnceItsStarterStopsRenewingIt) {
  auto config = loopback_config(2);
  config["timeouts"]["accept_s"] = 120;  // only the lease ends the wait for the ring
  auto secondary = start_secondary(write_config(config, "lease"), 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0), "", seconds(5));
  ASSERT_EQ(status(client).body["state"], "idle");
  auto body = init_body(config, 0, 7);
  body["lease_ms"] = 1000;
  ASSERT_EQ(client.request("POST", "/init", &body).status, 200);
  EXPECT_EQ(client.request("PUT", "/lease").status, 400);
  EXPECT_EQ(client.request("PUT", "/lease?run_id=8").status, 409);
  // renewed every 250 ms for 3 s: the run stays
  const auto renewing_until = std::chrono::steady_clock::now() + seconds(3);
  while (std::chrono::steady_clock::now() < renewing_until) {
    ASSERT_EQ(client.request("PUT", "/lease?run_id=7").status, 200);
    ASSERT_FALSE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] != "ready"; }, milliseconds(250)));
  }
  // no more renewals: dropped within the lease and the node's 200 ms check
  const auto last_renewal = std::chrono::steady_clock::now();
  ASSERT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "idle"; }, seconds(5)));
  EXPECT_LT(std::chrono::steady_clock::now() - last_renewal, milliseconds(2500));
  EXPECT_NE(secondary->err().find("did not renew it for 1000 ms"), std::string::npos) << secondary->err();
  EXPECT_EQ(client.request("PUT", "/lease?run_id=7").status, 409);
  // and takes the next run
  body["run_id"] = 9;
  EXPECT_EQ(client.request("POST", "/init", &body).status, 200);
  EXPECT_EQ(client.request("PUT", "/stop?run_id=9").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

TEST_F(Daemon, AStarterKilledBeforeTheRingIsUpLeavesItsNodesIdleWithinTheLease) {
  auto config = loopback_config(3);  // secondary 1 is never started, so the ring never comes up
  for (const char* wait : {"connect_s", "accept_s", "http_init_s"}) config["timeouts"][wait] = 120;
  config["timeouts"]["lease_s"] = 1;
  const fs::path path = write_config(config, "orphan");
  auto s0 = start_secondary(path, 0);
  mdi::ControlClient c0("127.0.0.1", control_port(config, 0), "", seconds(5));
  ASSERT_EQ(status(c0).body["state"], "idle");
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                        "--n-tokens", "4", "--prompt", "a", "--threads", "1"},
                       dir_.path(), "orphan-starter");
  ASSERT_TRUE(mdi::test::wait_until([&] { return c0.request("GET", "/status").body["state"] == "ready"; }, seconds(60))) << starter.err();
  // the live starter renews the lease: three leases long, the node stays in the run
  EXPECT_FALSE(mdi::test::wait_until([&] { return c0.request("GET", "/status").body["state"] != "ready"; }, seconds(3))) << s0->err();
  starter.kill(SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  EXPECT_TRUE(mdi::test::wait_until([&] { return c0.request("GET", "/status").body["state"] == "idle"; }, seconds(10))) << s0->err();
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, seconds(3)) << "a 1 s lease, and ring setup gives up within a second";
  EXPECT_NE(s0->err().find("did not renew it for 1000 ms"), std::string::npos) << s0->err();
  EXPECT_EQ(c0.request("PUT", "/stop").status, 200);
  EXPECT_EQ(s0->wait(seconds(20)), 0) << s0->err();
}

TEST_F(Daemon, AFrozenSecondaryThatWakesAfterItsStarterGaveUpDropsTheAbandonedInit) {
  auto config = loopback_config(2);
  config["timeouts"]["http_init_s"] = 2;
  config["timeouts"]["accept_s"] = 120;
  config["timeouts"]["lease_s"] = 1;
  const fs::path path = write_config(config, "frozen");
  auto s0 = start_secondary(path, 0);
  mdi::ControlClient c0("127.0.0.1", control_port(config, 0), "", seconds(5));
  ASSERT_EQ(status(c0).body["state"], "idle");
  s0->kill(SIGSTOP);
  ChildProcess starter({(mdi::test::bin_dir() / "starter").string(), "--nodes-config", path.string(), "--ckpt", model_dir_.string(),
                        "--n-tokens", "4", "--prompt", "a", "--threads", "1"},
                       dir_.path(), "frozen-starter");
  const auto code = starter.wait(seconds(30));
  s0->kill(SIGCONT);
  ASSERT_TRUE(code.has_value()) << starter.err();
  EXPECT_EQ(*code, 1);
  // Awake, it finds the /init its starter abandoned, and drops it once the lease is out.
  ASSERT_TRUE(mdi::test::wait_until([&] { return s0->err().find("did not renew it for 1000 ms") != std::string::npos; }, seconds(10)))
      << s0->err();
  EXPECT_TRUE(mdi::test::wait_until([&] { return c0.request("GET", "/status").body["state"] == "idle"; }, seconds(5)));
  EXPECT_EQ(c0.request("PUT", "/stop").status, 200);
  EXPECT_EQ(s0->wait(seconds(20)), 0) << s0->err();
}

TEST_F(Daemon, TheRunsContextAndFrameCapFromInitBoundWhatTheNodeAccepts) {
  auto config = loopback_config(2);
  auto secondary = start_secondary(write_config(config, "runcaps"), 0);
  mdi::ControlClient client("127.0.0.1", control_port(config, 0));
  ASSERT_EQ(status(client).body["state"], "idle");
  struct Case {
    const char* field;
    int64_t value;
    uint32_t start_pos, n_tokens;
    const char* expect;
  };
  // Both frames are within the model's own limits (context 512, 1 GiB frames).
  const std::vector<Case> cases = {{"max_seq_len", 8, 6, 4, "past the run's context length 8"},
                                   {"max_frame_bytes", 1024, 0, 8, "max_frame_bytes"}};
  uint64_t run_id = 300;
  for (const Case& c : cases) {
    auto body = init_body(config, 0, ++run_id);
    body[c.field] = c.value;
    ASSERT_EQ(client.request("POST", "/init", &body).status, 200) << c.field;
    {
      HandRing ring(config, run_id);
      ring.connect_and_hello();
      mdi::Frame frame;
      frame.header.type = mdi::FrameType::Activations;
      frame.header.start_pos = c.start_pos;
      frame.header.n_tokens = c.n_tokens;
      frame.header.ndim = 2;
      frame.header.shape = {c.n_tokens, 64, 0, 0};
      frame.header.payload_bytes = uint64_t(c.n_tokens) * 64 * 4;
      frame.payload.assign(frame.header.payload_bytes, 0);
      ring.send_frame(frame);
      EXPECT_TRUE(mdi::test::wait_until([&] {
        auto s = client.request("GET", "/status").body;
        return s["state"] == "idle" && s.contains("last_error");
      }, seconds(15))) << c.field;
    }
    const auto s = client.request("GET", "/status").body;
    EXPECT_NE(s.value("last_error", "").find(c.expect), std::string::npos) << c.field << ": " << s;
  }
  // A training run's frames hold one micro-batch: 2 sequences of 16 rows of dim 64, in float32.
  auto training = init_body(config, 0, ++run_id);
  mdi::TrainingPlan plan;
  plan.micro_batches = 2;
  plan.seq_len = 16;
  plan.micro_batch_sequences = 2;
  plan.trainable = mdi::parse_trainable_set("all", reader_->config().n_layers);
  plan.steps = 1;
  training["training"] = plan.to_json();
  ASSERT_EQ(client.request("POST", "/init", &training).status, 200);
  {
    HandRing ring(config, run_id);
    ring.connect_and_hello();
    mdi::FrameHeader header;
    header.type = mdi::FrameType::Activations;
    header.n_tokens = 33;
    header.ndim = 2;
    header.shape = {33, 64, 0, 0};  // one row past the micro-batch, header only: refused before its payload
    header.payload_bytes = 33 * 64 * 4;
    uint8_t bytes[mdi::kFrameHeaderBytes];
    mdi::encode_header(header, bytes);
    ring.send_bytes(bytes, sizeof bytes);
    EXPECT_TRUE(mdi::test::wait_until([&] { return client.request("GET", "/status").body["state"] == "idle"; }, seconds(15)));
  }
  const auto s = client.request("GET", "/status").body;
  EXPECT_NE(s.value("last_error", "").find("exceeds the limit 8192"), std::string::npos) << s;
  EXPECT_EQ(client.request("PUT", "/stop").status, 200);
  EXPECT_EQ(secondary->wait(seconds(20)), 0) << secondary->err();
}

}  // namespace
