// ControlServer on Boost.Beast: one Session per connection, on its own strand,
// kept alive only by its pending operation. Everything a request is judged on
// (auth, route, declared size) is decided from its head, before a body byte is
// read. A request refused then is answered at once, and its connection closed
// if a body was on its way.
//
//   do_read_header ─► on_read_header ──refused──────────────────────┐
//         ▲                │ admitted                               │
//         │                ├─"Expect: 100-continue"─► do_send_continue
//         │                ▼                             │          │
//         │           do_read_body ◄─────────────────────┘          │
//         │           on_read_body ─(more)─► do_read_body           │
//         │                │ done: call the handler                 ▼
//         └─keep-alive─ on_write ◄──────────────────────────── do_write
//                          │ close
//                          ▼
//                      do_linger: stop sending, read and discard until the peer
//                      closes, so it reads the answer rather than a reset
//
// Connections (below) caps how many sessions are open at once, and the
// acceptor backs off when accept() fails, so a flood of connections costs
// bounded file descriptors and log lines, and the starter still gets in.
#include "common/net/http/control_plane.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <limits>
#include <list>
#include <mutex>
#include <optional>
#include <thread>
#include <variant>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include "common/net/http/beast.hpp"
#include "common/store/sha256.hpp"
#include "common/wire/json_excerpt.hpp"

namespace mdi {
namespace {

using namespace beast_names;
namespace fs = std::filesystem;

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr uint32_t kMaxHeaderBytes = 16 * 1024;
constexpr size_t kLingerBufferBytes = 16 * 1024;
constexpr milliseconds kFirstAcceptRetryDelay{50};
constexpr milliseconds kMaxAcceptRetryDelay{1000};
// Connections past the limit that are being answered 503 at once; any more are
// closed unanswered, so a flood cannot turn refusals into a descriptor leak.
constexpr size_t kMaxRefusedSessions = 4;
// How long a refused connection may take to read its 503: a peer that never closes
// must not hold one of the kMaxRefusedSessions places for the whole read timeout.
constexpr milliseconds kRefusedLingerTimeout{1000};

// At most `burst` lines per interval for one kind of event; the first line
// after that says how many were left out. A peer that can make the server
// log per connection or per request must not be able to fill the disk.
class LogThrottle {
 public:
  explicit LogThrottle(size_t burst, std::chrono::seconds interval = std::chrono::seconds(10))
      : burst_(burst), interval_(interval) {}

  // nullopt: do not log this one. Otherwise a suffix for the line: empty, or
  // the count of lines left out since the last one logged.
  std::optional<std::string> admit() {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    if (now - window_start_ >= interval_) {
      window_start_ = now;
      logged_in_window_ = 0;
    }
    if (logged_in_window_ == burst_) {
      ++left_out_;
      return std::nullopt;
    }
    ++logged_in_window_;
    std::string note;
    if (left_out_ > 0)
      note = " (" + std::to_string(left_out_) + " more like it not logged since the last one)";
    left_out_ = 0;
    return note;
  }

 private:
  const size_t burst_;
  const Clock::duration interval_;
  std::mutex mutex_;
  Clock::time_point window_start_{};
  size_t logged_in_window_ = 0;
  uint64_t left_out_ = 0;
};

struct LogThrottles {
  LogThrottle accept_failures{1};
  LogThrottle turned_away{1};  // connections displaced, refused or closed at the limit
  LogThrottle dropped{5};       // connections that failed mid-request
  LogThrottle error_answers{20};
};

HttpResponse error_response(int status, std::string reason) { return {status, {{"error", std::move(reason)}}}; }

// What a handler throws becomes the response it stands for, so one bad
// request costs one error answer and never the daemon.
template <class Call>
HttpResponse respond(Call&& call) {
  HttpResponse response;
  try {
    response = call();
  } catch (const HttpError& e) {
    response = error_response(e.status, e.what());
  } catch (const std::exception& e) {
    response = error_response(500, e.what());
  }
  if (response.status < 200 || response.status > 599)
    return error_response(500, "handler answered with HTTP status " + std::to_string(response.status));
  return response;
}

// A request body type that writes to a file and hashes on the way, so an
// upload of any size costs one network buffer of memory.
struct HashingFileBody {
  struct value_type {
    beast::file file;  // opened by the session before the body is read
    Sha256 hash;
  };

  class reader {
   public:
    template <bool isRequest, class Fields>
    reader(http::header<isRequest, Fields>&, value_type& body) : body_(body) {}

    void init(const boost::optional<uint64_t>&, beast::error_code& ec) { ec = {}; }

    template <class ConstBufferSequence>
    size_t put(const ConstBufferSequence& buffers, beast::error_code& ec) {
      size_t written = 0;
      for (auto it = net::buffer_sequence_begin(buffers); it != net::buffer_sequence_end(buffers); ++it) {
        net::const_buffer buffer = *it;
        body_.hash.update(buffer.data(), buffer.size());
        written += body_.file.write(buffer.data(), buffer.size(), ec);
        if (ec) return written;
      }
      ec = {};
      return written;
    }

    void finish(beast::error_code& ec) { ec = {}; }

   private:
    value_type& body_;
  };
};

struct UploadRoute {
  UploadHandler handle;
  UploadGate gate;
};
using Handler = std::variant<RouteHandler, UploadRoute>;

struct Admission {
  const Handler* handler = nullptr;  // null: refused with `refusal`
  HttpResponse refusal;
  uint64_t body_limit = 0;
  std::shared_ptr<void> upload_reservation;
};

Admission refused(HttpResponse refusal) {
  Admission admission;
  admission.refusal = std::move(refusal);
  return admission;
}

// The routes and limits, shared read-only by all sessions while serving.
struct Router {
  ControlServerOptions options;
  std::map<std::string, std::map<std::string, Handler>> routes;  // path → method → handler
  mutable std::atomic<uint64_t> uploads_started{0};

  void add(const std::string& method, const std::string& path, Handler handler) {
    if (http::string_to_verb(method) == http::verb::unknown)
      throw std::invalid_argument("control server: unknown HTTP method \"" + method + "\"");
    if (path.empty() || path.front() != '/')
      throw std::invalid_argument("control server: route path \"" + path + "\" must start with '/'");
    if (!routes[path].emplace(method, std::move(handler)).second)
      throw std::invalid_argument("control server: " + method + " " + path + " is already routed");
  }

  bool authorized(const HttpRequest& head) const {
    if (options.auth_token.empty()) return true;
    auto it = head.headers.find("authorization");
    if (it == head.headers.end()) return false;
    // The scheme is case-insensitive (RFC 7235): "bearer" and "BEARER" are as good as "Bearer".
    const std::string scheme = "bearer ";
    const std::string& value = it->second;
    if (value.size() != scheme.size() + options.auth_token.size() ||
        !std::equal(scheme.begin(), scheme.end(), value.begin(),
                    [](char a, char b) { return a == std::tolower(static_cast<unsigned char>(b)); }))
      return false;
    // Constant time, so the token cannot be guessed byte by byte from response timing.
    return CRYPTO_memcmp(value.data() + scheme.size(), options.auth_token.data(), options.auth_token.size()) == 0;
  }

  Admission admit(const HttpRequest& head, const boost::optional<uint64_t>& content_length) const {
    if (!authorized(head))
      return refused(error_response(401, head.headers.count("authorization") ? "wrong bearer token"
                                                                               : "missing \"Authorization: Bearer\" header"));
    if (head.target.empty() || head.target.front() != '/')
      return refused(error_response(400, "request target must be an absolute path"));
    const std::string path = head.target.substr(0, head.target.find('?'));
    auto by_path = routes.find(path);
    if (by_path == routes.end()) return refused(error_response(404, "no route for " + json_excerpt(path)));
    auto by_method = by_path->second.find(head.method);
    if (by_method == by_path->second.end()) {
      std::string allowed;
      for (const auto& [method, handler] : by_path->second) allowed += (allowed.empty() ? "" : ", ") + method;
      return refused(error_response(405, json_excerpt(head.method) + " is not allowed on " + path + " (allowed: " + allowed + ")"));
    }
    const Handler& handler = by_method->second;
    Admission admitted{&handler, {}, options.max_json_body_bytes, nullptr};
    if (const auto* upload = std::get_if<UploadRoute>(&handler)) {
      admitted.body_limit = options.max_upload_bytes;
      if (upload->gate) {
        UploadAdmission judged = upload->gate(head, content_length ? std::optional<uint64_t>(*content_length) : std::nullopt);
        if (judged.refusal) return refused(std::move(*judged.refusal));
        admitted.body_limit = std::min(admitted.body_limit, judged.max_bytes);
        admitted.upload_reservation = std::move(judged.reservation);
      }
    }
    if (content_length && *content_length > admitted.body_limit)
      return refused(error_response(413, "request body of " + std::to_string(*content_length) +
                                               " bytes exceeds the limit of " + std::to_string(admitted.body_limit) + " bytes"));
    return admitted;
  }

  fs::path new_upload_path() const {
    return options.upload_dir / ("upload-" + std::to_string(::getpid()) + "-" + std::to_string(++uploads_started) + ".partial");
  }
};

class Session;

// The open sessions, against the limit. Above it, a new connection displaces
// the session idle longest (waiting for a request head, a partial one
// included), because idle keep-alive connections (a careless client's, or a
// slow-loris one's) must not lock the starter out, and a client that finds its
// idle connection closed opens another, as HTTP/1.1 clients must. Only when
// every session is mid-request is the newcomer answered 503 "retry later":
// those sessions are doing work and end on their own.
class Connections {
 public:
  enum class Verdict { admitted, refused, closed };
  struct Placement {
    Verdict verdict;
    std::shared_ptr<Session> displaced;  // admitted in its place: close it (outside this lock)
    std::string displaced_peer;
    milliseconds displaced_idle{0};
  };

  void set_limit(size_t limit) { limit_ = limit; }
  size_t limit() const { return limit_; }

  Placement place(const std::shared_ptr<Session>& session);
  // A session is idle from its admission, or the end of its last answer, until
  // a request head has arrived.
  void set_idle(const Session* session, bool idle);
  void forget(const Session* session);

 private:
  struct Entry {
    const Session* key;  // still valid while its session is destructing, when `session` has expired
    std::weak_ptr<Session> session;
    std::optional<Clock::time_point> idle_since;
  };
  std::mutex mutex_;
  size_t limit_ = 1;
  std::list<Entry> admitted_;  // in order of admission
  std::list<const Session*> refused_;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, const Router& router, Connections& connections, LogThrottles& logs)
      : stream_(std::move(socket)), router_(router), connections_(connections), logs_(logs) {
    beast::error_code ec;
    tcp::endpoint peer = stream_.socket().remote_endpoint(ec);
    peer_ = ec ? "(unknown peer)" : format_endpoint(peer.address().to_string(), peer.port());
  }

  // Whatever ended the session, a body that no handler took must not stay on disk.
  ~Session() {
    discard_upload();
    connections_.forget(this);
  }

  const std::string& peer() const { return peer_; }

  // Both start on the session's strand, so no handler of this connection runs concurrently.
  void run() { net::dispatch(stream_.get_executor(), beast::bind_front_handler(&Session::do_read_header, shared_from_this())); }

  void refuse(size_t open) {
    net::dispatch(stream_.get_executor(), [self = shared_from_this(), open] {
      self->refused_ = true;
      self->keep_alive_ = false;
      self->do_write(error_response(503, "too many connections (" + std::to_string(open) + " open); retry later"));
    });
  }

  // Closes the connection to make room for a newer one; Connections has already forgotten it.
  void displace() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      self->displaced_ = true;
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
      self->stream_.close();
    });
  }

 private:
  void arm_deadline(milliseconds timeout) {
    deadline_ = timeout;
    stream_.expires_after(timeout);
  }

  void do_read_header() {
    connections_.set_idle(this, true);
    head_parser_.emplace();
    head_parser_->header_limit(kMaxHeaderBytes);
    // The route's limit is applied by admit(), once the route is known. Not
    // boost::none: Beast 1.74 compares a Content-Length against none as if it were 0.
    head_parser_->body_limit(std::numeric_limits<uint64_t>::max());
    json_parser_.reset();
    upload_parser_.reset();
    request_ = HttpRequest{};
    arm_deadline(std::min(router_.options.idle_timeout, router_.options.read_timeout));
    http::async_read_header(stream_, buffer_, *head_parser_,
                            beast::bind_front_handler(&Session::on_read_header, shared_from_this()));
  }

  void on_read_header(beast::error_code ec, size_t) {
    connections_.set_idle(this, false);
    if (displaced_) return;
    if (ec == http::error::end_of_stream) return;  // the peer is done with this connection
    if (ec == beast::error::timeout && !head_parser_->got_some())
      return spdlog::debug("{}: idle connection closed after {} ms", peer_, deadline_.count());
    if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
      keep_alive_ = false;
      return do_write(error_response(400, "malformed HTTP request: " + ec.message()));
    }
    if (ec) return drop(ec, "reading a request head");

    const auto& head = head_parser_->get();
    request_.method = std::string(head.method_string());
    request_.target = std::string(head.target());
    for (const auto& field : head) {
      std::string name(field.name_string());
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string& value = request_.headers[name];
      value += (value.empty() ? "" : ", ") + std::string(field.value());
    }
    request_.remote_addr = peer_;
    keep_alive_ = head.keep_alive();

    Admission admission = router_.admit(request_, head_parser_->content_length());
    if (!admission.handler) {
      // An unread body would be taken for the next request: close instead.
      keep_alive_ = keep_alive_ && head_parser_->is_done();
      return do_write(std::move(admission.refusal));
    }
    handler_ = admission.handler;
    body_limit_ = admission.body_limit;
    upload_reservation_ = std::move(admission.upload_reservation);
    start_body();
  }

  void start_body() {
    const bool expects_continue = beast::iequals(head_parser_->get()[http::field::expect], "100-continue");
    if (std::holds_alternative<UploadRoute>(*handler_)) {
      upload_parser_.emplace(std::move(*head_parser_));
      upload_parser_->body_limit(body_limit_);  // for chunked bodies, which declare no length
      upload_path_ = router_.new_upload_path();
      beast::error_code ec;
      upload_parser_->get().body().file.open(upload_path_.c_str(), beast::file_mode::write_new, ec);
      if (ec) {
        upload_path_.clear();
        keep_alive_ = false;
        return do_write(error_response(500, "cannot create upload file: " + ec.message()));
      }
    } else {
      json_parser_.emplace(std::move(*head_parser_));
      json_parser_->body_limit(body_limit_);
    }
    if (body_done()) return on_body_done();
    if (expects_continue) return do_send_continue();
    do_read_body();
  }

  void do_send_continue() {
    continue_response_ = {http::status::continue_, 11};
    arm_deadline(router_.options.read_timeout);
    http::async_write(stream_, continue_response_, beast::bind_front_handler(&Session::on_send_continue, shared_from_this()));
  }

  void on_send_continue(beast::error_code ec, size_t) {
    if (ec) return drop(ec, "sending 100 Continue");
    do_read_body();
  }

  // One read at a time, each with its own deadline: a large upload may take
  // long, but a peer that stops sending is dropped after read_timeout.
  void do_read_body() {
    arm_deadline(router_.options.read_timeout);
    auto on_read = beast::bind_front_handler(&Session::on_read_body, shared_from_this());
    if (upload_parser_) return http::async_read_some(stream_, buffer_, *upload_parser_, std::move(on_read));
    http::async_read_some(stream_, buffer_, *json_parser_, std::move(on_read));
  }

  void on_read_body(beast::error_code ec, size_t) {
    if (ec == http::error::body_limit) {
      keep_alive_ = false;
      return do_write(error_response(413, "request body exceeds the limit of " + std::to_string(body_limit_) + " bytes"));
    }
    if (ec) return drop(ec, "reading the request body");
    if (!body_done()) return do_read_body();
    on_body_done();
  }

  bool body_done() const { return upload_parser_ ? upload_parser_->is_done() : json_parser_->is_done(); }

  void on_body_done() {
    if (upload_parser_) return do_write(finish_upload());
    request_.body = json_parser_->release().body();
    do_write(respond([&] { return std::get<RouteHandler>(*handler_)(request_); }));
  }

  HttpResponse finish_upload() {
    auto& body = upload_parser_->get().body();
    beast::error_code ec;
    body.file.close(ec);
    if (ec) {
      discard_upload();
      return error_response(500, "cannot write upload file: " + ec.message());
    }
    HttpResponse response =
        respond([&] { return std::get<UploadRoute>(*handler_).handle(request_, upload_path_, body.hash.hex_digest()); });
    upload_reservation_.reset();
    if (response.status >= 400)
      discard_upload();
    else
      upload_path_.clear();  // the handler has taken the file
    return response;
  }

  void discard_upload() {
    upload_reservation_.reset();
    if (upload_path_.empty()) return;
    std::error_code ec;
    fs::remove(upload_path_, ec);
    upload_path_.clear();
  }

  void do_write(HttpResponse response) {
    // Replacing invalid UTF-8 (say, echoed from a garbled target) keeps dump() from throwing.
    std::string body = response.body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (response.status < 400 || refused_)  // a refusal was logged when the connection came
      spdlog::debug("{} {} -> {}", peer_, request_line(), response.status);
    else if (auto note = logs_.error_answers.admit())
      spdlog::warn("{} {} -> {} {}{}", peer_, request_line(), response.status, body, *note);
    response_ = {};
    response_.version(11);
    response_.result(static_cast<unsigned>(response.status));
    response_.set(http::field::content_type, "application/json");
    response_.keep_alive(keep_alive_);
    response_.body() = std::move(body);
    response_.prepare_payload();
    arm_deadline(router_.options.read_timeout);
    http::async_write(stream_, response_, beast::bind_front_handler(&Session::on_write, shared_from_this()));
  }

  void on_write(beast::error_code ec, size_t) {
    if (ec) return drop(ec, "writing the response");
    if (!keep_alive_) return do_linger();
    do_read_header();
  }

  // The peer may still be sending a body we refused; closing now would reset
  // the connection and could destroy our answer before the peer reads it.
  void do_linger() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    arm_deadline(refused_ ? kRefusedLingerTimeout : router_.options.read_timeout);  // once: lingering is bounded in total
    read_and_discard();
  }

  void on_linger(beast::error_code ec, size_t) {
    if (ec) return;  // closed by the peer, or the deadline: the session ends
    read_and_discard();
  }

  void read_and_discard() {
    stream_.async_read_some(net::buffer(linger_buffer_), beast::bind_front_handler(&Session::on_linger, shared_from_this()));
  }

  void drop(beast::error_code ec, const char* during) {
    if (displaced_) return;  // logged when it was displaced
    std::string cause = ec == beast::error::timeout ? "nothing received for " + std::to_string(deadline_.count()) + " ms"
                                                    : ec.message();
    if (auto note = logs_.dropped.admit())
      spdlog::warn("{} {}: connection dropped while {}: {}{}", peer_, request_line(), during, cause, *note);
  }

  std::string request_line() const {
    return request_.method.empty() ? "(no request line)" : request_.method + " " + request_.target;
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  const Router& router_;
  Connections& connections_;
  LogThrottles& logs_;
  std::string peer_;
  milliseconds deadline_{0};  // of the operation in flight, for messages
  bool refused_ = false;      // answered 503 at the limit, never admitted
  bool displaced_ = false;    // closed to admit a newer connection
  std::optional<http::request_parser<http::empty_body>> head_parser_;
  // Once the head is admitted, its parser moves into the one for the route's body type.
  std::optional<http::request_parser<http::string_body>> json_parser_;
  std::optional<http::request_parser<HashingFileBody>> upload_parser_;
  HttpRequest request_;
  const Handler* handler_ = nullptr;
  uint64_t body_limit_ = 0;  // of the admitted request
  std::shared_ptr<void> upload_reservation_;
  bool keep_alive_ = false;
  fs::path upload_path_;  // non-empty while the file belongs to this session
  http::response<http::empty_body> continue_response_;
  http::response<http::string_body> response_;
  std::array<char, kLingerBufferBytes> linger_buffer_;
};

Connections::Placement Connections::place(const std::shared_ptr<Session>& session) {
  std::lock_guard lock(mutex_);
  Placement placement{Verdict::admitted, nullptr, {}, {}};
  if (admitted_.size() >= limit_) {
    auto idle_longest = admitted_.end();
    for (auto it = admitted_.begin(); it != admitted_.end(); ++it)
      if (it->idle_since && (idle_longest == admitted_.end() || *it->idle_since < *idle_longest->idle_since))
        idle_longest = it;
    if (idle_longest == admitted_.end()) {
      if (refused_.size() >= kMaxRefusedSessions) return {Verdict::closed, nullptr, {}, {}};
      refused_.push_back(session.get());
      return {Verdict::refused, nullptr, {}, {}};
    }
    // A session whose last owner is letting go cannot be locked; it is closing anyway.
    placement.displaced = idle_longest->session.lock();
    if (placement.displaced) {
      placement.displaced_peer = placement.displaced->peer();
      placement.displaced_idle = std::chrono::duration_cast<milliseconds>(Clock::now() - *idle_longest->idle_since);
    }
    admitted_.erase(idle_longest);
  }
  admitted_.push_back({session.get(), session, Clock::now()});
  return placement;
}

void Connections::set_idle(const Session* session, bool idle) {
  std::lock_guard lock(mutex_);
  for (auto& entry : admitted_)
    if (entry.key == session) {
      if (!idle)
        entry.idle_since.reset();
      else if (!entry.idle_since)
        entry.idle_since = Clock::now();
      return;
    }
}

void Connections::forget(const Session* session) {
  std::lock_guard lock(mutex_);
  admitted_.remove_if([&](const Entry& entry) { return entry.key == session; });
  refused_.remove(session);
}

}  // namespace

struct ControlServer::Impl {
  Router router;
  Connections connections;
  LogThrottles logs;
  // Created by start() and destroyed by stop(): destroying the io_context
  // destroys the sessions its pending operations hold.
  std::unique_ptr<net::io_context> io;
  std::optional<tcp::acceptor> acceptor;
  std::optional<net::steady_timer> accept_retry;
  milliseconds accept_retry_delay = kFirstAcceptRetryDelay;
  std::vector<std::thread> threads;
  uint16_t port = 0;

  void do_accept() {
    acceptor->async_accept(net::make_strand(*io), beast::bind_front_handler(&Impl::on_accept, this));
  }

  void on_accept(beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted) return;  // stopped
    if (ec) return retry_accept_later(ec);
    accept_retry_delay = kFirstAcceptRetryDelay;
    auto session = std::make_shared<Session>(std::move(socket), router, connections, logs);
    auto placement = connections.place(session);
    switch (placement.verdict) {
      case Connections::Verdict::admitted:
        if (placement.displaced) {
          placement.displaced->displace();
          if (auto note = logs.turned_away.admit())
            spdlog::warn("control server on port {}: {} connections open, the limit: closed the one idle longest ({}, idle "
                         "{} ms) to admit {}{}",
                         port, connections.limit(), placement.displaced_peer, placement.displaced_idle.count(),
                         session->peer(), *note);
        }
        session->run();
        break;
      case Connections::Verdict::refused:
        if (auto note = logs.turned_away.admit())
          spdlog::warn("control server on port {}: {} connections open, all mid-request: answering {} 503{}", port,
                       connections.limit(), session->peer(), *note);
        session->refuse(connections.limit());
        break;
      case Connections::Verdict::closed:
        if (auto note = logs.turned_away.admit())
          spdlog::warn("control server on port {}: {} connections open, all mid-request, and {} being refused: closed {} "
                       "unanswered{}",
                       port, connections.limit(), kMaxRefusedSessions, session->peer(), *note);
        break;  // the socket closes with `session`
    }
    do_accept();
  }

  // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), accepting
  // again at once fails again at once: wait, longer each time, for sessions to
  // end. Any other error is waited on too, since one that repeats would spin.
  void retry_accept_later(beast::error_code ec) {
    if (auto note = logs.accept_failures.admit())
      spdlog::warn("control server on port {}: accept failed: {}; retrying in {} ms{}", port, ec.message(),
                   accept_retry_delay.count(), *note);
    accept_retry->expires_after(accept_retry_delay);
    accept_retry->async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec) do_accept();
    });
    accept_retry_delay = std::min(2 * accept_retry_delay, kMaxAcceptRetryDelay);
  }

  void serve() {
    // A handler's exceptions become responses; this only catches what escapes
    // the server itself, which must not end the thread that serves everyone.
    for (;;) {
      try {
        io->run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("control server on port {}: {}", port, e.what());
      }
    }
  }
};

namespace {

// max_sessions, or half the open-file limit if that is lower: each session holds
// a socket (and an upload its file), and the process needs descriptors for its
// chunk files and ring sockets too.
size_t session_limit(size_t max_sessions) {
  size_t limit = std::max<size_t>(1, max_sessions);
  rlimit files{};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY && files.rlim_cur / 2 < limit) {
    limit = std::max<size_t>(1, files.rlim_cur / 2);
    spdlog::info("control server: at most {} connections at once (half the open-file limit of {}; raise it with ulimit -n)",
                 limit, files.rlim_cur);
  }
  return limit;
}

}  // namespace

ControlServer::ControlServer(ControlServerOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->router.options = std::move(options);
}

ControlServer::~ControlServer() { stop(); }

void ControlServer::route(const std::string& method, const std::string& path, RouteHandler handler) {
  if (impl_->io) throw std::logic_error("control server: routes must be registered before start()");
  impl_->router.add(method, path, std::move(handler));
}

void ControlServer::upload_route(const std::string& method, const std::string& path, UploadHandler handler, UploadGate gate) {
  if (impl_->io) throw std::logic_error("control server: routes must be registered before start()");
  if (impl_->router.options.upload_dir.empty())
    throw std::invalid_argument("control server: upload route " + method + " " + path + " needs options.upload_dir");
  impl_->router.add(method, path, UploadRoute{std::move(handler), std::move(gate)});
}

void ControlServer::start() {
  if (impl_->io) throw std::logic_error("control server: already started");
  const ControlServerOptions& options = impl_->router.options;
  const std::string where = format_endpoint(options.bind_addr, options.port);
  if (!options.upload_dir.empty()) fs::create_directories(options.upload_dir);

  auto io = std::make_unique<net::io_context>(static_cast<int>(std::max<size_t>(1, options.threads)));
  tcp::acceptor acceptor(*io);
  beast::error_code ec;
  auto fail = [&](const char* step) { throw ControlPlaneError("control server cannot listen on " + where + ": " + step + ": " + ec.message()); };
  tcp::endpoint endpoint(net::ip::make_address(options.bind_addr, ec), options.port);
  if (ec) fail("bad address");
  if (acceptor.open(endpoint.protocol(), ec); ec) fail("open");
  if (acceptor.set_option(net::socket_base::reuse_address(true), ec); ec) fail("set SO_REUSEADDR");
  if (acceptor.bind(endpoint, ec); ec) fail("bind");
  if (acceptor.listen(net::socket_base::max_listen_connections, ec); ec) fail("listen");

  impl_->port = acceptor.local_endpoint().port();
  impl_->io = std::move(io);
  impl_->acceptor.emplace(std::move(acceptor));
  impl_->accept_retry.emplace(*impl_->io);
  impl_->accept_retry_delay = kFirstAcceptRetryDelay;
  impl_->connections.set_limit(session_limit(options.max_sessions));
  impl_->do_accept();
  for (size_t i = 0; i < std::max<size_t>(1, options.threads); ++i) impl_->threads.emplace_back([this] { impl_->serve(); });
  spdlog::info("control server listening on {}", format_endpoint(options.bind_addr, impl_->port));
}

uint16_t ControlServer::port() const { return impl_->port; }

void ControlServer::stop() {
  if (!impl_->io) return;
  if (impl_->io->get_executor().running_in_this_thread())
    throw std::logic_error("control server: stop() called from a handler would join its own thread");
  impl_->io->stop();
  for (auto& thread : impl_->threads) thread.join();
  impl_->threads.clear();
  impl_->acceptor.reset();
  impl_->accept_retry.reset();
  impl_->io.reset();
}

}  // namespace mdi
