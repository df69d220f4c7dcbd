#pragma once
// The control plane: JSON over HTTP/1.1 between the starter and the secondary
// nodes. The starter pushes configuration and model chunks with ControlClient;
// each secondary serves them with a ControlServer on which the daemon
// registers its routes.
//
// Route handlers are plain functions from request to response, so they can
// be tested without sockets; the server only moves bytes and enforces the
// limits in ControlServerOptions before any body byte is read.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace mdi {

// The peer could not be reached or answered outside HTTP (refused, timed out,
// reset, garbled). The message names host:port, method, target and the cause.
struct ControlPlaneError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown by route handlers to answer `status` with {"error": message}.
struct HttpError : std::runtime_error {
  int status;
  HttpError(int s, std::string m);
};

struct HttpRequest {
  std::string method;  // upper case, e.g. "POST"
  std::string target;  // path and query string, e.g. "/chunks/3?layer=0"
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  std::string remote_addr;  // "ip:port" of the peer
};

// Always JSON; errors as {"error": "reason"}.
struct HttpResponse {
  int status = 200;
  nlohmann::json body;
};

using RouteHandler = std::function<HttpResponse(const HttpRequest&)>;

// Called once an upload's body is on disk in `file`. The handler decides (e.g.
// compares `sha256_hex` with an expected digest) and may move the file away.
// `head` carries everything but the body. An error status (>= 400) or an
// exception deletes the file, as does a connection that fails mid-body.
using UploadHandler = std::function<HttpResponse(const HttpRequest& head, const std::filesystem::path& file,
                                                 const std::string& sha256_hex)>;

// Judges an upload from its head, before any body byte is read or stored: a
// refusal, or the most bytes this upload may carry (a larger body gets 413). A
// reservation, if any, is held until the upload is handled or dropped, so the
// route can bound how many are under way.
struct UploadAdmission {
  std::optional<HttpResponse> refusal;
  uint64_t max_bytes = UINT64_MAX;
  std::shared_ptr<void> reservation;
};
using UploadGate = std::function<UploadAdmission(const HttpRequest& head, std::optional<uint64_t> content_length)>;

// The request body as JSON; throws HttpError 400 "malformed JSON: ..." otherwise,
// and before parsing when it nests deeper than 64 levels.
nlohmann::json parse_json_body(const HttpRequest& request);

// The percent-decoded value of `name` in the target's query string, if present.
std::optional<std::string> query_param(const HttpRequest& request, const std::string& name);

// "host:port", with IPv6 addresses in brackets, as endpoints appear in messages.
std::string format_endpoint(const std::string& host, uint16_t port);

struct ControlServerOptions {
  std::string bind_addr = "0.0.0.0";
  uint16_t port = 0;  // 0 = pick a free port (tests)
  // Non-empty: every request must carry "Authorization: Bearer <token>", else 401.
  std::string auth_token;
  size_t max_json_body_bytes = 1 << 20;  // larger bodies get 413
  uint64_t max_upload_bytes = 1ull << 40;
  // Bounds every read (and write): a stalled peer is dropped after this long.
  std::chrono::milliseconds read_timeout{30000};
  // A connection waiting for a request head (after accept, or after its last
  // answer) is closed after this long, or read_timeout if that is shorter. Such
  // a connection holds a file descriptor and does nothing, and our own client
  // opens a fresh connection per request, so this is short.
  std::chrono::milliseconds idle_timeout{5000};
  // Connections served at once; start() lowers it to half the open-file limit
  // (RLIMIT_NOFILE), leaving the other half to the rest of the process. Past the
  // limit a new connection displaces the one idle longest, or is answered 503
  // when every connection is mid-request (see Connections in server.cpp).
  size_t max_sessions = 64;
  std::filesystem::path upload_dir;  // where upload bodies land; required by upload_route
  size_t threads = 1;
};

class ControlServer {
 public:
  explicit ControlServer(ControlServerOptions options);
  ~ControlServer();  // stops and joins
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Routes are registered before start(). Handlers run on the server's
  // threads: one request at a time per connection, but concurrently across
  // connections when options.threads > 1.
  void route(const std::string& method, const std::string& path, RouteHandler handler);
  // Without a gate an upload may carry options.max_upload_bytes.
  void upload_route(const std::string& method, const std::string& path, UploadHandler handler, UploadGate gate = {});

  // Binds and listens, then serves on background threads. Throws
  // ControlPlaneError naming address:port when it cannot listen.
  void start();
  uint16_t port() const;  // the bound port, once started
  // Closes the listener and every connection; a partial upload is deleted.
  // Must not be called from a handler (it joins the threads running them).
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct HttpResult {
  int status;
  nlohmann::json body;
};

// Each call opens its own connection, so one client may be shared by threads
// and a connection that died while idle is never a failure.
class ControlClient {
 public:
  ControlClient(std::string host, uint16_t port, std::string auth_token = "",
                std::chrono::milliseconds timeout = std::chrono::seconds(30));

  // Any HTTP status is a result; throws ControlPlaneError when there is no
  // HTTP answer (connect refused, no answer within the timeout, reset, ...).
  HttpResult request(const std::string& method, const std::string& target, const nlohmann::json* body = nullptr);
  // Streams the file as the request body (application/octet-stream), logging
  // progress for big files. Sends "Expect: 100-continue", so a request the
  // server refuses from its head (auth, route, size) costs no body bytes.
  HttpResult upload_file(const std::string& method, const std::string& target, const std::filesystem::path& file,
                         const std::map<std::string, std::string>& extra_headers = {});

  const std::string& host() const { return host_; }
  uint16_t port() const { return port_; }

 private:
  std::string host_;
  uint16_t port_;
  std::string auth_token_;
  std::chrono::milliseconds timeout_;
};

// Repeats the request while it throws ControlPlaneError, backing off from
// 100 ms doubling to 2 s, until `deadline` has passed; then throws one saying
// how long it tried and the last cause. HTTP error statuses are returned.
// An attempt in flight at the deadline may overrun it by the client's timeout.
// A request that timed out may have been executed, so retry only idempotent ones.
// The first failure, and then one every 5 s, is logged as a warning naming `who`
// (e.g. "secondary 0 (127.0.0.1:8090)"; default: the server's address), so a long
// wait is never silent.
HttpResult request_with_retry(ControlClient& client, const std::string& method, const std::string& target,
                              const nlohmann::json* body, std::chrono::milliseconds deadline, const std::string& who = "");

}  // namespace mdi
