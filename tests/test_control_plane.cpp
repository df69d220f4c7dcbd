#include "common/net/http/control_plane.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <random>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "common/store/sha256.hpp"
#include "tests/support.hpp"

namespace {
using mdi::test::error_of;

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using mdi::ControlClient;
using mdi::ControlServer;
using mdi::ControlServerOptions;
using mdi::HttpRequest;
using mdi::HttpResponse;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

ControlServerOptions loopback_options() {
  ControlServerOptions options;
  options.bind_addr = "127.0.0.1";
  return options;
}

// The routes most tests talk to: an echo of the JSON body and query, and one that fails.
void add_json_routes(ControlServer& server) {
  server.route("POST", "/echo", [](const HttpRequest& request) {
    return HttpResponse{200, {{"got", mdi::parse_json_body(request)},
                              {"layer", mdi::query_param(request, "layer").value_or("")},
                              {"peer", request.remote_addr}}};
  });
  server.route("GET", "/ping", [](const HttpRequest&) { return HttpResponse{200, {{"pong", true}}}; });
  server.route("GET", "/broken", [](const HttpRequest&) -> HttpResponse { throw std::runtime_error("disk on fire"); });
}

// A blocking loopback socket whose every wait is bounded, for what ControlClient
// will not send: malformed bodies, two requests on one connection, stalls.
class RawConnection {
 public:
  // Unconnected, so that the socket exists before a test takes the descriptors away.
  RawConnection() : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    if (fd_ < 0) throw std::runtime_error(std::string("socket() failed: ") + std::strerror(errno));
  }
  explicit RawConnection(uint16_t port) : RawConnection() { connect(port); }

  void connect(uint16_t port) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = htons(port);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0)
      throw std::runtime_error("cannot connect to 127.0.0.1:" + std::to_string(port));
  }
  ~RawConnection() { close(); }

  void send(const std::string& bytes) {
    for (size_t sent = 0; sent < bytes.size();) {
      ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) throw std::runtime_error("send failed");
      sent += static_cast<size_t>(n);
    }
  }

  // One whole response (head and Content-Length body), or "" if the server closed first.
  std::string read_response(std::chrono::milliseconds timeout = 5s) {
    const auto deadline = Clock::now() + timeout;
    size_t head_end;
    while ((head_end = pending_.find("\r\n\r\n")) == std::string::npos)
      if (!receive_some(deadline)) return "";
    size_t length_at = pending_.find("Content-Length: ");
    size_t body_bytes = length_at < head_end ? std::stoul(pending_.substr(length_at + 16)) : 0;
    while (pending_.size() < head_end + 4 + body_bytes)
      if (!receive_some(deadline)) return "";
    std::string response = pending_.substr(0, head_end + 4 + body_bytes);
    pending_.erase(0, response.size());
    return response;
  }

  // Whether the server closed the connection within `timeout`, discarding what it sent.
  bool closed_by_peer_within(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline)
      if (!receive_some(deadline)) return Clock::now() < deadline;
    return false;
  }

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  // False on end of stream, error or deadline.
  bool receive_some(Clock::time_point deadline) {
    // Rounded up, so that a poll that times out ends at or after the deadline.
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd readable{fd_, POLLIN, 0};
    if (left <= 0 || ::poll(&readable, 1, static_cast<int>(left)) != 1) return false;
    char buffer[65536];
    ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
    if (n <= 0) return false;
    pending_.append(buffer, static_cast<size_t>(n));
    return true;
  }

  int fd_;
  std::string pending_;
};

std::string json_post(const std::string& target, const std::string& body, const std::string& extra_headers = "") {
  return "POST " + target + " HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + extra_headers +
         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

int status_of(const std::string& raw_response) {
  return raw_response.size() > 12 ? std::stoi(raw_response.substr(9, 3)) : 0;
}

void write_random_file(const fs::path& path, size_t bytes) {
  std::string data(bytes, '\0');
  std::mt19937_64 random(42);
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t word = random();
    std::memcpy(&data[i], &word, 8);
  }
  std::ofstream(path, std::ios::binary) << data;
}

size_t files_in(const fs::path& dir) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

// While alive, the default logger's lines go here instead of stderr.
class CapturedLog {
 public:
  CapturedLog() : previous_(spdlog::default_logger()), sink_(std::make_shared<Sink>()) {
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("captured", sink_));
  }
  ~CapturedLog() { spdlog::set_default_logger(previous_); }

  size_t lines_with(const std::string& part) const { return sink_->lines_with(part); }

 private:
  class Sink : public spdlog::sinks::base_sink<std::mutex> {
   public:
    size_t lines_with(const std::string& part) {
      std::lock_guard lock(mutex_);
      return static_cast<size_t>(std::count_if(lines_.begin(), lines_.end(), [&](const std::string& line) { return contains(line, part); }));
    }

   protected:
    void sink_it_(const spdlog::details::log_msg& message) override { lines_.emplace_back(message.payload.data(), message.payload.size()); }
    void flush_() override {}

   private:
    std::vector<std::string> lines_;
  };
  std::shared_ptr<spdlog::logger> previous_;
  std::shared_ptr<Sink> sink_;
};

// CPU time this process has used, all threads together.
std::chrono::microseconds process_cpu_time() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto of = [](const timeval& t) { return std::chrono::seconds(t.tv_sec) + std::chrono::microseconds(t.tv_usec); };
  return of(usage.ru_utime) + of(usage.ru_stime);
}

// Lowers this process's soft open-file limit so that no descriptor can be opened
// (every number below the limit is taken); restores it when it dies.
class NoFreeDescriptors {
 public:
  NoFreeDescriptors() {
    ::getrlimit(RLIMIT_NOFILE, &saved_);
    const int lowest_free = ::dup(0);
    ::close(lowest_free);
    rlimit lowered = saved_;
    lowered.rlim_cur = static_cast<rlim_t>(lowest_free);
    if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) throw std::runtime_error("setrlimit failed");
  }
  ~NoFreeDescriptors() { restore(); }
  void restore() { ::setrlimit(RLIMIT_NOFILE, &saved_); }

 private:
  rlimit saved_{};
};

TEST(ControlPlaneHelpers, ParseJsonBodyThrowsHttp400OnMalformedJson) {
  HttpRequest request;
  request.body = R"({"layers": [0, 4]})";
  EXPECT_EQ(mdi::parse_json_body(request)["layers"][1], 4);
  request.body = "{not json";
  try {
    mdi::parse_json_body(request);
    FAIL() << "expected HttpError";
  } catch (const mdi::HttpError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_TRUE(contains(e.what(), "malformed JSON: ")) << e.what();
  }
}

TEST(ControlPlaneHelpers, QueryParamDecodesValues) {
  HttpRequest request;
  request.target = "/chunks?layer=3&name=model%2F0+a&flag&empty=";
  EXPECT_EQ(mdi::query_param(request, "layer"), "3");
  EXPECT_EQ(mdi::query_param(request, "name"), "model/0 a");
  EXPECT_EQ(mdi::query_param(request, "flag"), "");
  EXPECT_EQ(mdi::query_param(request, "empty"), "");
  EXPECT_EQ(mdi::query_param(request, "absent"), std::nullopt);
  request.target = "/chunks";
  EXPECT_EQ(mdi::query_param(request, "layer"), std::nullopt);
}

TEST(ControlPlaneHelpers, FormatEndpointBracketsIpv6) {
  EXPECT_EQ(mdi::format_endpoint("10.0.0.2", 8088), "10.0.0.2:8088");
  EXPECT_EQ(mdi::format_endpoint("::1", 8088), "[::1]:8088");
}

TEST(ControlServer, JsonRouteRoundTrip) {
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();
  ASSERT_NE(server.port(), 0);

  ControlClient client("127.0.0.1", server.port());
  nlohmann::json body = {{"model", "stories260K"}, {"layers", {0, 3}}};
  auto result = client.request("POST", "/echo?layer=2", &body);
  EXPECT_EQ(result.status, 200);
  EXPECT_EQ(result.body["got"], body);
  EXPECT_EQ(result.body["layer"], "2");
  EXPECT_TRUE(contains(result.body["peer"].get<std::string>(), "127.0.0.1:"));
}

TEST(ControlServer, UnknownPathIs404AndWrongMethodIs405) {
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();
  ControlClient client("127.0.0.1", server.port());

  auto missing = client.request("GET", "/nope");
  EXPECT_EQ(missing.status, 404);
  EXPECT_TRUE(contains(missing.body["error"].get<std::string>(), "/nope"));
  auto wrong_method = client.request("GET", "/echo");
  EXPECT_EQ(wrong_method.status, 405);
  EXPECT_TRUE(contains(wrong_method.body["error"].get<std::string>(), "allowed: POST"));
}

TEST(ControlServer, MalformedJsonIs400AndHandlerExceptionIs500AndServingGoesOn) {
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();

  RawConnection raw(server.port());
  raw.send(json_post("/echo", "{not json"));
  std::string response = raw.read_response();
  EXPECT_EQ(status_of(response), 400) << response;
  EXPECT_TRUE(contains(response, "malformed JSON: ")) << response;

  RawConnection garbage(server.port());
  garbage.send("NOT HTTP AT ALL\r\n\r\n");
  response = garbage.read_response();
  EXPECT_EQ(status_of(response), 400) << response;
  EXPECT_TRUE(contains(response, "malformed HTTP request")) << response;

  ControlClient client("127.0.0.1", server.port());
  auto broken = client.request("GET", "/broken");
  EXPECT_EQ(broken.status, 500);
  EXPECT_EQ(broken.body["error"], "disk on fire");
  EXPECT_EQ(client.request("GET", "/ping").status, 200);
}

TEST(ControlServer, KeepAliveServesSeveralRequestsOnOneConnection) {
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();

  RawConnection raw(server.port());
  for (int i = 0; i < 3; ++i) {
    raw.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
    std::string response = raw.read_response();
    EXPECT_EQ(status_of(response), 200) << "request " << i << ": " << response;
  }
  // The 404 has no body to skip, so it keeps the connection too.
  raw.send("GET /nope HTTP/1.1\r\nHost: test\r\n\r\n");
  EXPECT_EQ(status_of(raw.read_response()), 404);
  raw.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
  EXPECT_EQ(status_of(raw.read_response()), 200);
}

TEST(ControlServer, OversizeJsonBodyIs413WithTheLimit) {
  auto options = loopback_options();
  options.max_json_body_bytes = 1024;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  ControlClient client("127.0.0.1", server.port());
  nlohmann::json big = {{"blob", std::string(4096, 'x')}};
  auto result = client.request("POST", "/echo", &big);
  EXPECT_EQ(result.status, 413);
  EXPECT_TRUE(contains(result.body["error"].get<std::string>(), "limit of 1024 bytes")) << result.body;

  // A chunked body declares no length, so the limit applies while it is read.
  RawConnection raw(server.port());
  std::string chunk(2048, ' ');
  raw.send("POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + chunk + "\r\n0\r\n\r\n");
  EXPECT_EQ(status_of(raw.read_response()), 413);

  nlohmann::json small = {{"blob", "x"}};
  EXPECT_EQ(client.request("POST", "/echo", &small).status, 200);
}

TEST(ControlServer, BearerTokenIsRequiredWhenConfigured) {
  auto options = loopback_options();
  options.auth_token = "s3cret";
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  auto anonymous = ControlClient("127.0.0.1", server.port()).request("GET", "/ping");
  EXPECT_EQ(anonymous.status, 401);
  EXPECT_TRUE(anonymous.body.contains("error"));
  EXPECT_EQ(ControlClient("127.0.0.1", server.port(), "guess").request("GET", "/ping").status, 401);
  // Unknown routes are hidden from peers without the token.
  EXPECT_EQ(ControlClient("127.0.0.1", server.port(), "guess").request("GET", "/nope").status, 401);
  EXPECT_EQ(ControlClient("127.0.0.1", server.port(), "s3cret").request("GET", "/ping").status, 200);
}

TEST(ControlServer, WithoutTokenEveryoneIsServed) {
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();
  EXPECT_EQ(ControlClient("127.0.0.1", server.port(), "any-token").request("GET", "/ping").status, 200);
}

// Uploads land in upload_dir; the handler checks the digest named by the
// client and moves accepted files to `accepted_dir`.
class UploadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(upload_dir());
    fs::create_directories(accepted_dir());
    write_random_file(dir_ / "chunk.bin", kChunkBytes);
    chunk_sha_ = mdi::sha256_file(dir_ / "chunk.bin");
  }

  ControlServerOptions upload_options() const {
    auto options = loopback_options();
    options.upload_dir = upload_dir();
    return options;
  }

  void add_upload_route(ControlServer& server) {
    server.upload_route("PUT", "/chunks", [this](const HttpRequest& head, const fs::path& file, const std::string& sha) {
      {
        std::lock_guard<std::mutex> lock(seen_mutex_);
        seen_size_ = fs::file_size(file);
        seen_sha_ = sha;
      }
      if (sha != head.headers.at("x-expected-sha256"))
        return HttpResponse{409, {{"error", "sha256 mismatch: got " + sha}}};
      fs::rename(file, accepted_dir() / "chunk.bin");
      return HttpResponse{200, {{"sha256", sha}}};
    });
  }

  fs::path upload_dir() const { return dir_ / "incoming"; }
  fs::path accepted_dir() const { return dir_ / "accepted"; }

  static constexpr size_t kChunkBytes = 20 << 20;
  mdi::test::ScratchDir dir_;
  std::string chunk_sha_;
  // What the handler saw, written on the server's thread.
  std::mutex seen_mutex_;
  uint64_t seen_size_ = 0;
  std::string seen_sha_;

  uint64_t seen_size() {
    std::lock_guard<std::mutex> lock(seen_mutex_);
    return seen_size_;
  }
  std::string seen_sha() {
    std::lock_guard<std::mutex> lock(seen_mutex_);
    return seen_sha_;
  }
};

TEST_F(UploadTest, FileArrivesOnDiskWithItsSha256) {
  ControlServer server(upload_options());
  add_upload_route(server);
  server.start();

  auto result = ControlClient("127.0.0.1", server.port())
                    .upload_file("PUT", "/chunks", dir_ / "chunk.bin", {{"X-Expected-Sha256", chunk_sha_}});
  EXPECT_EQ(result.status, 200) << result.body;
  EXPECT_EQ(seen_sha(), chunk_sha_);
  EXPECT_EQ(seen_size(), kChunkBytes);
  EXPECT_EQ(mdi::sha256_file(accepted_dir() / "chunk.bin"), chunk_sha_);
  EXPECT_EQ(files_in(upload_dir()), 0u);
}

TEST_F(UploadTest, RejectedFileIsDeleted) {
  ControlServer server(upload_options());
  add_upload_route(server);
  server.start();

  auto result = ControlClient("127.0.0.1", server.port())
                    .upload_file("PUT", "/chunks", dir_ / "chunk.bin", {{"X-Expected-Sha256", std::string(64, '0')}});
  EXPECT_EQ(result.status, 409);
  EXPECT_EQ(seen_size(), kChunkBytes);  // the handler saw the whole file before rejecting it
  EXPECT_EQ(seen_sha(), chunk_sha_);
  EXPECT_EQ(files_in(upload_dir()), 0u);
  EXPECT_EQ(files_in(accepted_dir()), 0u);
}

TEST_F(UploadTest, RequestRefusedFromItsHeadSendsNoBody) {
  auto options = upload_options();
  options.auth_token = "s3cret";
  options.max_upload_bytes = 1 << 20;
  ControlServer server(options);
  add_upload_route(server);
  server.start();

  auto anonymous = ControlClient("127.0.0.1", server.port()).upload_file("PUT", "/chunks", dir_ / "chunk.bin");
  EXPECT_EQ(anonymous.status, 401);
  auto oversize = ControlClient("127.0.0.1", server.port(), "s3cret").upload_file("PUT", "/chunks", dir_ / "chunk.bin");
  EXPECT_EQ(oversize.status, 413);
  EXPECT_TRUE(contains(oversize.body["error"].get<std::string>(), "limit of 1048576 bytes")) << oversize.body;
  EXPECT_TRUE(seen_sha().empty());
  EXPECT_EQ(files_in(upload_dir()), 0u);
}

TEST_F(UploadTest, ConnectionLostMidBodyDeletesThePartialFile) {
  ControlServer server(upload_options());
  add_upload_route(server);
  server.start();

  RawConnection raw(server.port());
  raw.send("PUT /chunks HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n" + std::string(1000, 'x'));
  ASSERT_TRUE(mdi::test::wait_until([&] { return files_in(upload_dir()) == 1; }, 5s));
  raw.close();
  EXPECT_TRUE(mdi::test::wait_until([&] { return files_in(upload_dir()) == 0; }, 5s));
  EXPECT_TRUE(seen_sha().empty());
}

TEST_F(UploadTest, StopDuringUploadDeletesThePartialFile) {
  ControlServer server(upload_options());
  add_upload_route(server);
  server.start();

  RawConnection raw(server.port());
  raw.send("PUT /chunks HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n" + std::string(1000, 'x'));
  ASSERT_TRUE(mdi::test::wait_until([&] { return files_in(upload_dir()) == 1; }, 5s));
  server.stop();
  EXPECT_EQ(files_in(upload_dir()), 0u);
  EXPECT_TRUE(raw.closed_by_peer_within(5s));
}

TEST(ControlServer, StalledClientIsDroppedWithinReadTimeoutWhileOthersAreServed) {
  auto options = loopback_options();
  options.read_timeout = 300ms;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  RawConnection stalled(server.port());
  const auto stalled_at = Clock::now();
  stalled.send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"partial\":");
  EXPECT_EQ(ControlClient("127.0.0.1", server.port()).request("GET", "/ping").status, 200);
  EXPECT_TRUE(stalled.closed_by_peer_within(5s));
  auto waited = Clock::now() - stalled_at;
  EXPECT_GE(waited, 250ms);
  EXPECT_LT(waited, 3s);
  EXPECT_EQ(ControlClient("127.0.0.1", server.port()).request("GET", "/ping").status, 200);
}

TEST(ControlServer, ServesConcurrentClientsOnSeveralThreads) {
  auto options = loopback_options();
  options.threads = 4;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  std::vector<std::future<int>> clients;
  for (int c = 0; c < 8; ++c)
    clients.push_back(std::async(std::launch::async, [&, c] {
      ControlClient client("127.0.0.1", server.port());
      int answered = 0;
      for (int i = 0; i < 25; ++i) {
        nlohmann::json body = {{"client", c}, {"i", i}};
        auto result = client.request("POST", "/echo", &body);
        answered += result.status == 200 && result.body["got"] == body;
      }
      return answered;
    }));
  for (auto& answered : clients) EXPECT_EQ(answered.get(), 25);
}

TEST(ControlServer, BindFailureNamesTheAddress) {
  ControlServer first(loopback_options());
  first.start();
  auto options = loopback_options();
  options.port = first.port();
  ControlServer second(options);
  std::string error = error_of<mdi::ControlPlaneError>([&] { second.start(); });
  EXPECT_TRUE(contains(error, "127.0.0.1:" + std::to_string(first.port()))) << error;
}

TEST(ControlClient, ClosedPortThrowsNamingHostPortAndCause) {
  const int port = mdi::test::free_tcp_port();
  std::string error = error_of<mdi::ControlPlaneError>([&] { ControlClient("127.0.0.1", port).request("GET", "/ping"); });
  EXPECT_TRUE(contains(error, "GET 127.0.0.1:" + std::to_string(port) + "/ping")) << error;
  EXPECT_TRUE(contains(error, "refused")) << error;
}

TEST(ControlClient, SilentServerTimesOut) {
  // A listening socket that never accepts: the connection completes in the
  // kernel's backlog, but no answer ever comes.
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  ASSERT_EQ(::listen(listener, 4), 0);
  socklen_t length = sizeof address;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);

  const auto start = Clock::now();
  std::string error = error_of<mdi::ControlPlaneError>([&] { ControlClient("127.0.0.1", ntohs(address.sin_port), "", 200ms).request("GET", "/ping"); });
  auto waited = Clock::now() - start;
  ::close(listener);
  EXPECT_TRUE(contains(error, "no answer within 200 ms")) << error;
  EXPECT_LT(waited, 3s);
}

TEST(RequestWithRetry, SucceedsOnceTheServerStartsListening) {
  // A first listener accepts the first attempt and hangs up, so the test knows
  // an attempt has failed; only then does the real server start on that port.
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  int reuse = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof reuse);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  ASSERT_EQ(::listen(listener, 4), 0);
  socklen_t length = sizeof address;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);
  const uint16_t port = ntohs(address.sin_port);

  ControlClient client("127.0.0.1", port, "", 2s);
  auto retried = std::async(std::launch::async, [&] { return mdi::request_with_retry(client, "GET", "/ping", nullptr, 20s); });

  pollfd first_attempt{listener, POLLIN, 0};
  ASSERT_EQ(::poll(&first_attempt, 1, 10000), 1) << "no attempt reached the port";
  ::close(::accept(listener, nullptr, nullptr));
  ::close(listener);

  auto options = loopback_options();
  options.port = port;
  ControlServer server(options);
  add_json_routes(server);
  server.start();
  ASSERT_EQ(retried.wait_for(15s), std::future_status::ready);
  EXPECT_EQ(retried.get().status, 200);
}

TEST(RequestWithRetry, GivesUpAfterTheDeadlineWithTheLastCause) {
  const int port = mdi::test::free_tcp_port();
  ControlClient client("127.0.0.1", port);
  const auto start = Clock::now();
  std::string error = error_of<mdi::ControlPlaneError>([&] { mdi::request_with_retry(client, "GET", "/ping", nullptr, 700ms); });
  auto waited = Clock::now() - start;
  EXPECT_TRUE(contains(error, "127.0.0.1:" + std::to_string(port))) << error;
  EXPECT_TRUE(contains(error, "gave up after")) << error;
  EXPECT_TRUE(contains(error, "refused")) << error;
  EXPECT_GE(waited, 700ms);
  EXPECT_LT(waited, 3s);
}

}  // namespace

TEST(ControlServer, AcceptFailuresBackOffAndAreLoggedOnceUntilDescriptorsAreFreeAgain) {
  CapturedLog log;
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();

  std::vector<std::unique_ptr<RawConnection>> clients;
  for (int i = 0; i < 5; ++i) clients.push_back(std::make_unique<RawConnection>());
  {
    NoFreeDescriptors exhausted;
    for (auto& client : clients) client->connect(server.port());  // queued: every accept() fails with EMFILE
    ASSERT_TRUE(mdi::test::wait_until([&] { return log.lines_with("accept failed: Too many open files") > 0; }, 5s));
    // A server that retried at once would spin for the whole second.
    const auto cpu_before = process_cpu_time();
    EXPECT_FALSE(mdi::test::wait_until([&] { return process_cpu_time() - cpu_before > 300ms; }, 1s));
  }
  EXPECT_EQ(log.lines_with("accept failed"), 1u);
  EXPECT_EQ(log.lines_with("retrying in 50 ms"), 1u);
  // The longest wait is 1 s, so every queued connection is served soon after.
  const auto restored_at = Clock::now();
  for (auto& client : clients) {
    client->send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
    EXPECT_EQ(status_of(client->read_response(3s)), 200);
  }
  EXPECT_LT(Clock::now() - restored_at, 2500ms);
}

TEST(ControlServer, PastMaxSessionsANewConnectionDisplacesTheOneIdleLongest) {
  CapturedLog log;
  auto options = loopback_options();
  options.max_sessions = 2;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  RawConnection oldest(server.port()), newer(server.port());
  RawConnection latest(server.port());
  latest.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
  EXPECT_EQ(status_of(latest.read_response()), 200);
  EXPECT_TRUE(oldest.closed_by_peer_within(2s));
  EXPECT_FALSE(newer.closed_by_peer_within(200ms));
  newer.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
  EXPECT_EQ(status_of(newer.read_response()), 200);
  EXPECT_EQ(log.lines_with("2 connections open, the limit: closed the one idle longest"), 1u);
}

TEST(ControlServer, PastMaxSessionsWithEverySessionMidRequestANewConnectionGets503) {
  auto options = loopback_options();
  options.max_sessions = 2;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  // Each waits for 100 Continue, so the server is reading its body when the third comes.
  const std::string body = "{\"a\": 1}";
  std::vector<std::unique_ptr<RawConnection>> busy;
  for (int i = 0; i < 2; ++i) {
    busy.push_back(std::make_unique<RawConnection>(server.port()));
    busy.back()->send("POST /echo HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: " +
                      std::to_string(body.size()) + "\r\n\r\n");
    ASSERT_EQ(status_of(busy.back()->read_response()), 100);
  }
  RawConnection refused(server.port());
  refused.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
  const std::string answer = refused.read_response();
  EXPECT_EQ(status_of(answer), 503) << answer;
  EXPECT_TRUE(contains(answer, "too many connections (2 open); retry later")) << answer;
  EXPECT_TRUE(refused.closed_by_peer_within(2s));

  for (auto& connection : busy) {
    connection->send(body);
    EXPECT_EQ(status_of(connection->read_response()), 200);
  }
  // Both are idle again, so the next connection gets in.
  EXPECT_EQ(ControlClient("127.0.0.1", server.port()).request("GET", "/ping").status, 200);
}

TEST(ControlServer, IdleConnectionsAreClosedAfterIdleTimeoutNotReadTimeout) {
  auto options = loopback_options();
  options.idle_timeout = 300ms;
  ControlServer server(options);
  add_json_routes(server);
  server.start();

  RawConnection fresh(server.port());
  RawConnection answered(server.port());
  answered.send("GET /ping HTTP/1.1\r\nHost: test\r\n\r\n");
  ASSERT_EQ(status_of(answered.read_response()), 200);
  const auto since = Clock::now();
  EXPECT_TRUE(fresh.closed_by_peer_within(3s));
  EXPECT_TRUE(answered.closed_by_peer_within(3s));
  EXPECT_GE(Clock::now() - since, 250ms);
  EXPECT_LT(Clock::now() - since, 2s);
}

TEST(ControlServer, DroppedConnectionsAreLoggedAtMostFivePerTenSeconds) {
  CapturedLog log;
  ControlServer server(loopback_options());
  add_json_routes(server);
  server.start();

  for (int i = 0; i < 20; ++i) {
    RawConnection quitter(server.port());
    quitter.send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"partial\":");
  }
  ASSERT_TRUE(mdi::test::wait_until([&] { return log.lines_with("connection dropped") == 5; }, 5s));
  // The rest are counted, not logged: nothing more arrives while the connections end.
  EXPECT_FALSE(mdi::test::wait_until([&] { return log.lines_with("connection dropped") > 5; }, 500ms));
}
