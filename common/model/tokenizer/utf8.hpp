#pragma once
// UTF-8 as the tokenizers and the text outputs need it: which bytes form a
// character, and how bytes that never will are shown (one U+FFFD for each
// maximal invalid subpart, as Unicode recommends).
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace mdi {

inline constexpr char kReplacementChar[] = "\xEF\xBF\xBD";     // U+FFFD
inline constexpr char kSentencePieceSpace[] = "\xE2\x96\x81";  // U+2581, how SentencePiece spells ' '

struct Utf8Scan {
  enum Kind { kChar, kIncomplete, kInvalid } kind;
  size_t length;  // bytes of the character, of the valid-so-far prefix, or of the invalid run
};

// Classifies the bytes at text[i]: a whole character, the valid start of one
// cut off by the end of `text`, or a maximal invalid subpart (which Unicode
// replaces by one U+FFFD).
Utf8Scan scan_utf8(std::string_view text, size_t i);

// Splits text into characters; a byte that is not part of a valid character
// stands alone, so that byte-fallback vocabularies still see every byte.
std::vector<std::string_view> utf8_chars(std::string_view text);

// `bytes` as valid UTF-8 for a JSON string: each invalid or cut-off sequence
// becomes U+FFFD (a prompt with a stray byte, a byte-level token stream cut
// mid-character), the rest unchanged.
std::string valid_utf8(std::string_view bytes);

std::string replace_all(std::string text, const std::string& from, const std::string& to);

// Streaming-safe text output: feed token bytes as they come, get back only
// complete UTF-8 characters; an incomplete multi-byte sequence waits for the
// next push. Bytes that can never form a character become U+FFFD.
class Utf8Stream {
 public:
  std::string push(const std::string& bytes);
  // What is left: an unfinished sequence becomes U+FFFD.
  std::string finish();

 private:
  std::string pending_;  // the start of a character still missing bytes
};

}  // namespace mdi
