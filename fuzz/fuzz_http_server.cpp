// libFuzzer target: the control plane's HTTP server (common/net/http/server.cpp), which every
// secondary serves on its communication port to whoever reaches it. One ControlServer, with
// routes shaped like the secondary's (GET /status, POST /init through parse_json_body and
// InitRequest::parse, PUT /stop and POST /reset reading query_param, the POST /chunk upload),
// listens on a loopback port. Each input is written raw to a fresh connection whose sending
// side is then shut, and the answer is read until the server closes. Short timeouts keep
// stalls cheap.
//
// Crashes, UB and leaks in the server's threads end the process, so libFuzzer sees them. The
// target also aborts when the server has not closed the connection 2 s after reading its end
// (every path to the end of a session is bounded well below that), when what comes back is not
// HTTP/1.1, or when an upload's file is left on disk after its connection has ended.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "common/net/http/control_plane.hpp"
#include "common/store/sha256.hpp"
#include "common/wire/init_request.hpp"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr auto kServerDeadline = std::chrono::seconds(2);

[[noreturn]] void bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_http_server: %s\n", what.c_str());
  std::abort();
}

struct FuzzServer {
  fs::path upload_dir;
  std::unique_ptr<mdi::ControlServer> server;

  FuzzServer() {
    upload_dir = fs::temp_directory_path() / ("fuzz_http_server-" + std::to_string(::getpid()));
    fs::remove_all(upload_dir);
    mdi::ControlServerOptions options;
    options.bind_addr = "127.0.0.1";
    options.read_timeout = std::chrono::milliseconds(200);
    options.idle_timeout = std::chrono::milliseconds(200);
    // Small limits, so that inputs of a few KiB reach the 413 paths too.
    options.max_json_body_bytes = 2048;
    options.max_upload_bytes = 1024;
    options.upload_dir = upload_dir;
    options.threads = 2;  // as the secondary runs it
    server = std::make_unique<mdi::ControlServer>(options);

    server->route("GET", "/status", [](const mdi::HttpRequest&) { return mdi::HttpResponse{200, {{"state", "idle"}}}; });
    server->route("POST", "/init", [](const mdi::HttpRequest& request) {
      try {
        const auto init = mdi::InitRequest::parse(mdi::parse_json_body(request));
        return mdi::HttpResponse{200, {{"run_id", init.run_id}}};
      } catch (const mdi::InitRequestError& e) {
        throw mdi::HttpError(400, e.what());
      }
    });
    server->route("PUT", "/stop", [](const mdi::HttpRequest& request) {
      const auto reset = mdi::query_param(request, "reset");
      return mdi::HttpResponse{200, {{"state", reset && *reset != "0" ? "idle" : "stopping"}}};
    });
    server->route("POST", "/reset", [](const mdi::HttpRequest&) { return mdi::HttpResponse{200, {{"state", "idle"}}}; });
    server->upload_route("POST", "/chunk", [](const mdi::HttpRequest& head, const fs::path& file, const std::string& sha256) {
      const auto expected = mdi::query_param(head, "sha256");
      if (!expected) return mdi::HttpResponse{400, {{"error", "POST /chunk needs ?sha256="}}};
      if (*expected != sha256) return mdi::HttpResponse{400, {{"error", "sha256 " + sha256 + " is not " + *expected}}};
      fs::remove(file);  // accepted: the file is the handler's to keep, and this one keeps none
      return mdi::HttpResponse{200, {{"sha256", sha256}}};
    });
    server->start();
  }
};

FuzzServer& fuzz_server() {
  static FuzzServer instance;
  return instance;
}

int connect_to(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) bug("socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) return fd;
  // Interrupted (libFuzzer's alarm, see exchange()), the connection goes on being made: wait for it.
  int error = errno;
  if (error == EINTR) {
    pollfd writable{fd, POLLOUT, 0};
    while (::poll(&writable, 1, 2000) < 0 && errno == EINTR) {
    }
    socklen_t length = sizeof error;
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) error = errno;
    if (error == 0 && (writable.revents & POLLOUT)) return fd;
  }
  bug(std::string("cannot connect to the server: ") + std::strerror(error));
}

// Sends all of `data` while reading what comes back, since the server may answer (and
// close) before the input is through; then reads until the server closes.
std::string exchange(int fd, const uint8_t* data, size_t size) {
  std::string answer;
  size_t sent = 0;
  bool send_open = true;
  const auto give_up_at = Clock::now() + kServerDeadline;
  char buffer[16384];
  for (;;) {
    if (send_open && sent == size) {
      ::shutdown(fd, SHUT_WR);
      send_open = false;
    }
    pollfd events{fd, static_cast<short>(POLLIN | (send_open ? POLLOUT : 0)), 0};
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(give_up_at - Clock::now()).count();
    if (left <= 0) bug("the server neither answered nor closed within 2 s; answer so far: " + answer.substr(0, 200));
    // libFuzzer's timeout alarm (SIGALRM, every -timeout/2+1 s) interrupts whatever
    // this thread is blocked in; poll() is never restarted after a signal.
    const int ready = ::poll(&events, 1, static_cast<int>(left));
    if (ready < 0 && errno != EINTR) bug(std::string("poll() failed: ") + std::strerror(errno));
    if (ready != 1) continue;  // interrupted, or timed out (reported above, on the next turn)
    if (events.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return answer;  // closed (or reset after a refusal): the session is over
      answer.append(buffer, static_cast<size_t>(n));
    } else if (events.revents & POLLOUT) {
      const ssize_t n = ::send(fd, data + sent, size - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) send_open = false;  // the server closed first; its answer is still to be read
      else sent += static_cast<size_t>(n);
    }
  }
}

// A session removes its upload file as it ends, which may be just after the client sees
// the connection close.
void expect_no_upload_left(const fs::path& dir) {
  const auto give_up_at = Clock::now() + kServerDeadline;
  while (!fs::is_empty(dir)) {
    if (Clock::now() > give_up_at) bug("an upload file outlived its connection: " + fs::directory_iterator(dir)->path().string());
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

// The server's warnings stay on: they quote what the peer sent, and the server throttles them.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // OpenSSL's exit-time cleanup must run after the server's threads are joined (exit
  // handlers run last-registered first), or it orphans their per-thread state: a leak.
  mdi::Sha256 initialises_openssl;
  fuzz_server();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzServer& fuzz = fuzz_server();
  const int fd = connect_to(fuzz.server->port());
  const std::string answer = exchange(fd, data, size);
  ::close(fd);
  if (!answer.empty() && answer.rfind("HTTP/1.1 ", 0) != 0) bug("the answer is not HTTP/1.1: " + answer.substr(0, 200));
  expect_no_upload_left(fuzz.upload_dir);
  return 0;
}
