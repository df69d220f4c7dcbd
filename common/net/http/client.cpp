// ControlClient on Boost.Beast. Each call is one Exchange on a fresh
// connection, driven synchronously: every step (connect, write, read) runs the
// exchange's private io_context until that step completes, and the stream's
// deadline, set before each step, bounds it.
#include "common/net/http/control_plane.hpp"

#include <algorithm>
#include <fstream>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/net/http/beast.hpp"

namespace mdi {
namespace {

using namespace beast_names;

constexpr uint64_t kMaxResponseBodyBytes = 64ull << 20;
constexpr size_t kUploadBlockBytes = 1 << 20;
constexpr uint64_t kProgressLogMinBytes = 64ull << 20;  // smaller uploads finish before progress would help

// One request and its response, on a connection of its own.
class Exchange {
 public:
  Exchange(const std::string& host, uint16_t port, const std::string& method, const std::string& target,
           const std::string& auth_token, std::chrono::milliseconds timeout)
      : where_(method + " " + format_endpoint(host, port) + target),
        host_field_(format_endpoint(host, port)),
        target_(target),
        auth_token_(auth_token),
        verb_(http::string_to_verb(method)),
        timeout_(timeout) {
    if (verb_ == http::verb::unknown) throw error("unknown HTTP method");
    beast::error_code ec;
    auto endpoints = tcp::resolver(io_).resolve(host, std::to_string(port), ec);
    if (ec) throw error("resolve: " + ec.message());
    step("connect", [&](auto&& on_done) { stream_.async_connect(endpoints, on_done); });
  }

  template <class Body>
  http::request<Body> new_request() const {
    http::request<Body> request{verb_, target_, 11};
    request.set(http::field::host, host_field_);
    if (!auth_token_.empty()) request.set(http::field::authorization, "Bearer " + auth_token_);
    return request;
  }

  template <class Message>
  void write(const Message& message) {
    step("send request", [&](auto&& on_done) { http::async_write(stream_, message, on_done); });
  }

  void write_body_bytes(const char* data, size_t bytes) {
    step("send body", [&](auto&& on_done) { net::async_write(stream_, net::buffer(data, bytes), on_done); });
  }

  // A 100 Continue counts as a response: the caller decides what follows it.
  HttpResult read_response() {
    http::response_parser<http::string_body> parser;
    parser.body_limit(kMaxResponseBodyBytes);
    step("read response", [&](auto&& on_done) { http::async_read(stream_, buffer_, parser, on_done); });
    const auto& response = parser.get();
    HttpResult result{static_cast<int>(response.result_int()), nullptr};
    if (response.body().empty()) return result;
    try {
      result.body = nlohmann::json::parse(response.body());
    } catch (const nlohmann::json::parse_error& e) {
      throw error("HTTP " + std::to_string(result.status) + " answer is not JSON: " + e.what());
    }
    return result;
  }

  ControlPlaneError error(const std::string& cause) const { return ControlPlaneError(where_ + ": " + cause); }

 private:
  template <class Start>
  void step(const std::string& name, Start&& start) {
    beast::error_code result;
    stream_.expires_after(timeout_);
    start([&](beast::error_code ec, auto&&...) { result = ec; });
    io_.restart();
    io_.run();
    if (result == beast::error::timeout)
      throw error(name + ": no answer within " + std::to_string(timeout_.count()) + " ms");
    if (result) throw error(name + ": " + result.message());
  }

  std::string where_;  // "METHOD host:port/target", how errors name the exchange
  std::string host_field_;
  std::string target_;
  std::string auth_token_;
  http::verb verb_;
  std::chrono::milliseconds timeout_;
  net::io_context io_;
  beast::tcp_stream stream_{io_};
  beast::flat_buffer buffer_;
};

}  // namespace

ControlClient::ControlClient(std::string host, uint16_t port, std::string auth_token, std::chrono::milliseconds timeout)
    : host_(std::move(host)), port_(port), auth_token_(std::move(auth_token)), timeout_(timeout) {}

HttpResult ControlClient::request(const std::string& method, const std::string& target, const nlohmann::json* body) {
  Exchange exchange(host_, port_, method, target, auth_token_, timeout_);
  auto request = exchange.new_request<http::string_body>();
  if (body) {
    request.set(http::field::content_type, "application/json");
    request.body() = body->dump();
  }
  request.prepare_payload();
  exchange.write(request);
  return exchange.read_response();
}

HttpResult ControlClient::upload_file(const std::string& method, const std::string& target,
                                      const std::filesystem::path& file,
                                      const std::map<std::string, std::string>& extra_headers) {
  std::error_code size_error;
  const uint64_t size = std::filesystem::file_size(file, size_error);
  std::ifstream in(file, std::ios::binary);
  if (size_error || !in)
    throw ControlPlaneError("cannot upload " + file.string() + ": " +
                            (size_error ? size_error.message() : std::string("cannot open it")));

  Exchange exchange(host_, port_, method, target, auth_token_, timeout_);
  auto head = exchange.new_request<http::empty_body>();
  for (const auto& [name, value] : extra_headers) head.set(name, value);
  head.set(http::field::content_type, "application/octet-stream");
  head.set(http::field::expect, "100-continue");
  head.content_length(size);
  exchange.write(head);
  HttpResult interim = exchange.read_response();
  if (interim.status != 100) return interim;  // refused from its head: no body byte was sent

  std::vector<char> block(kUploadBlockBytes);
  uint64_t sent = 0;
  uint64_t tenths_logged = 0;
  while (sent < size) {
    in.read(block.data(), static_cast<std::streamsize>(std::min<uint64_t>(block.size(), size - sent)));
    const auto bytes = static_cast<size_t>(in.gcount());
    if (bytes == 0)
      throw exchange.error("reading " + file.string() + " stopped after " + std::to_string(sent) + " of " +
                           std::to_string(size) + " bytes");
    exchange.write_body_bytes(block.data(), bytes);
    sent += bytes;
    if (size >= kProgressLogMinBytes && sent * 10 / size > tenths_logged) {
      tenths_logged = sent * 10 / size;
      spdlog::info("uploading {} to {}: {}% ({} of {} MiB)", file.filename().string(),
                   format_endpoint(host_, port_), tenths_logged * 10, sent >> 20, size >> 20);
    }
  }
  return exchange.read_response();
}

}  // namespace mdi
