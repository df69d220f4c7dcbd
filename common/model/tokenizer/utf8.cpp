#include "common/model/tokenizer/utf8.hpp"

#include <cstdint>

namespace mdi {

Utf8Scan scan_utf8(std::string_view text, size_t i) {
  const auto lead = static_cast<uint8_t>(text[i]);
  if (lead < 0x80) return {Utf8Scan::kChar, 1};
  size_t length;
  uint8_t low = 0x80, high = 0xBF;  // allowed range of the second byte (no overlongs, surrogates, > U+10FFFF)
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return {Utf8Scan::kInvalid, 1};
  }
  for (size_t k = 1; k < length; ++k) {
    if (i + k == text.size()) return {Utf8Scan::kIncomplete, k};
    const auto byte = static_cast<uint8_t>(text[i + k]);
    if (byte < low || byte > high) return {Utf8Scan::kInvalid, k};
    low = 0x80;
    high = 0xBF;
  }
  return {Utf8Scan::kChar, length};
}

std::vector<std::string_view> utf8_chars(std::string_view text) {
  std::vector<std::string_view> chars;
  for (size_t i = 0; i < text.size();) {
    const Utf8Scan scan = scan_utf8(text, i);
    const size_t length = scan.kind == Utf8Scan::kChar ? scan.length : 1;
    chars.push_back(text.substr(i, length));
    i += length;
  }
  return chars;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

std::string valid_utf8(std::string_view bytes) {
  Utf8Stream stream;
  return stream.push(std::string(bytes)) + stream.finish();
}

std::string Utf8Stream::push(const std::string& bytes) {
  pending_ += bytes;
  std::string complete;
  size_t i = 0;
  while (i < pending_.size()) {
    const Utf8Scan scan = scan_utf8(pending_, i);
    if (scan.kind == Utf8Scan::kIncomplete) break;
    if (scan.kind == Utf8Scan::kChar) {
      complete.append(pending_, i, scan.length);
    } else {
      complete += kReplacementChar;
    }
    i += scan.length;
  }
  pending_.erase(0, i);
  return complete;
}

std::string Utf8Stream::finish() {
  const bool unfinished = !pending_.empty();
  pending_.clear();
  return unfinished ? kReplacementChar : "";
}

}  // namespace mdi
