// The socket-free half of the control plane: helpers for handlers and the
// retry loop. The Beast code lives in control_server.cpp and control_client.cpp.
#include "common/net/http/control_plane.hpp"

#include <algorithm>
#include <thread>

#include <spdlog/spdlog.h>

namespace mdi {
namespace {

constexpr std::chrono::milliseconds kFirstRetryDelay{100};
constexpr std::chrono::milliseconds kMaxRetryDelay{2000};
constexpr std::chrono::seconds kRetryReportEvery{5};
// Far above any real body (an /init nests about 6 deep); parsing and freeing a
// JSON value recurses once per level, so an unbounded depth crashes the node.
constexpr size_t kMaxJsonDepth = 64;
constexpr size_t kParseErrorChars = 200;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// '+' means a space in query strings; a malformed %-escape is kept as written.
std::string percent_decode(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '+') {
      out += ' ';
    } else if (text[i] == '%' && i + 2 < text.size() && hex_value(text[i + 1]) >= 0 && hex_value(text[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2]));
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

// Where brackets outside strings first nest deeper than kMaxJsonDepth, if
// anywhere. Malformed text is left for the parser to name.
std::optional<size_t> too_deep_at(const std::string& text) {
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return i;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return std::nullopt;
}

}  // namespace

HttpError::HttpError(int s, std::string m) : std::runtime_error(std::move(m)), status(s) {}

nlohmann::json parse_json_body(const HttpRequest& request) {
  if (auto at = too_deep_at(request.body))
    throw HttpError(400, "JSON body nests deeper than " + std::to_string(kMaxJsonDepth) + " levels (at byte " +
                             std::to_string(*at) + "); send a flatter document");
  try {
    return nlohmann::json::parse(request.body);
  } catch (const nlohmann::json::parse_error& e) {
    // The parser's message quotes the last token read, which may be huge.
    std::string reason = e.what();
    if (reason.size() > kParseErrorChars) reason = reason.substr(0, kParseErrorChars) + "...";
    throw HttpError(400, "malformed JSON: " + reason);
  }
}

std::optional<std::string> query_param(const HttpRequest& request, const std::string& name) {
  size_t question = request.target.find('?');
  if (question == std::string::npos) return std::nullopt;
  size_t begin = question + 1;
  while (begin <= request.target.size()) {
    size_t end = std::min(request.target.find('&', begin), request.target.size());
    std::string pair = request.target.substr(begin, end - begin);
    size_t equals = pair.find('=');
    if (percent_decode(pair.substr(0, equals)) == name)
      return equals == std::string::npos ? std::string() : percent_decode(pair.substr(equals + 1));
    begin = end + 1;
  }
  return std::nullopt;
}

std::string format_endpoint(const std::string& host, uint16_t port) {
  bool ipv6 = host.find(':') != std::string::npos;
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

HttpResult request_with_retry(ControlClient& client, const std::string& method, const std::string& target,
                              const nlohmann::json* body, std::chrono::milliseconds deadline, const std::string& who) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto give_up_at = start + deadline;
  auto delay = kFirstRetryDelay;
  std::optional<Clock::time_point> reported_at;
  for (int attempt = 1;; ++attempt) {
    try {
      return client.request(method, target, body);
    } catch (const ControlPlaneError& e) {
      auto now = Clock::now();
      if (now >= give_up_at) {
        auto tried_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - start).count();
        throw ControlPlaneError(method + " " + format_endpoint(client.host(), client.port()) + target +
                                ": gave up after " + std::to_string(tried_ms) + " ms and " +
                                std::to_string(attempt) + " attempts; last error: " + e.what());
      }
      if (!reported_at || now - *reported_at >= kRetryReportEvery) {
        reported_at = now;
        const auto left_s = std::chrono::duration_cast<std::chrono::seconds>(give_up_at - now).count();
        spdlog::warn("{}: {}; retrying for up to {} s more: is it running, at that address?",
                     who.empty() ? format_endpoint(client.host(), client.port()) : who, e.what(), left_s);
      }
      spdlog::debug("attempt {} failed, retrying in {} ms: {}", attempt, delay.count(), e.what());
      std::this_thread::sleep_for(std::min<Clock::duration>(delay, give_up_at - now));
      delay = std::min(2 * delay, kMaxRetryDelay);
    }
  }
}

}  // namespace mdi
