#pragma once
// Error messages quote the offending value, but a request may carry a huge
// one: quoting it whole would echo the attacker's bytes back and bloat logs.
#include <string>

#include <nlohmann/json.hpp>

namespace mdi {

constexpr size_t kJsonExcerptChars = 80;

// `value` as compact JSON, cut to kJsonExcerptChars with "..." when longer.
inline std::string json_excerpt(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > kJsonExcerptChars) text = text.substr(0, kJsonExcerptChars) + "...";
  return text;
}

}  // namespace mdi
