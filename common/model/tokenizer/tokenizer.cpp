#include "common/model/tokenizer/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <queue>
#include <sstream>
#include <string_view>
#include <unordered_map>

#include <nlohmann/json.hpp>

namespace mdi {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

[[noreturn]] void fail(const fs::path& path, const std::string& problem) {
  throw TokenizerError(path.string() + ": " + problem);
}

std::string read_file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// ---------------------------------------------------------------------------
// UTF-8

const char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD
const char kSentencePieceSpace[] = "\xE2\x96\x81";  // U+2581, how SentencePiece spells ' '

struct Utf8Scan {
  enum Kind { kChar, kIncomplete, kInvalid } kind;
  size_t length;  // bytes of the character, of the valid-so-far prefix, or of the invalid run
};

// Classifies the bytes at text[i]: a whole character, the valid start of one
// cut off by the end of `text`, or a maximal invalid subpart (which Unicode
// replaces by one U+FFFD).
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

// Splits text into characters; a byte that is not part of a valid character
// stands alone, so that byte-fallback vocabularies still see every byte.
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

// ---------------------------------------------------------------------------
// Pair merging, shared by run.c-style and Hugging Face BPE

struct Merge {
  float priority;  // lower merges first
  int merged_id;
};

// Merges adjacent symbols until no pair has a merge, best priority first and
// the leftmost pair on ties: the order of both run.c (highest score) and HF
// BPE (lowest rank). A heap over a linked list makes this O(n log n) where
// rescanning every pair after each merge, as run.c does, is O(n^2).
template <typename FindMerge>  // std::optional<Merge>(int left_id, int right_id)
std::vector<int> merge_symbols(std::vector<int> ids, const FindMerge& find_merge) {
  struct Candidate {
    Merge merge;
    size_t left, right;  // positions in `ids`
    int left_id, right_id;
  };
  auto merges_later = [](const Candidate& a, const Candidate& b) {
    return a.merge.priority != b.merge.priority ? a.merge.priority > b.merge.priority : a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(merges_later)> candidates(merges_later);
  constexpr size_t kNone = SIZE_MAX;
  const size_t n = ids.size();
  std::vector<size_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = i == 0 ? kNone : i - 1;
    next[i] = i + 1 == n ? kNone : i + 1;
  }
  auto consider = [&](size_t left, size_t right) {
    if (auto merge = find_merge(ids[left], ids[right])) candidates.push({*merge, left, right, ids[left], ids[right]});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);

  while (!candidates.empty()) {
    const Candidate c = candidates.top();
    candidates.pop();
    // A merge since this candidate was queued may have consumed or grown either side.
    if (!alive[c.left] || next[c.left] != c.right || ids[c.left] != c.left_id || ids[c.right] != c.right_id) continue;
    ids[c.left] = c.merge.merged_id;
    alive[c.right] = false;
    next[c.left] = next[c.right];
    if (next[c.right] != kNone) prev[next[c.right]] = c.left;
    if (prev[c.left] != kNone) consider(prev[c.left], c.left);
    if (next[c.left] != kNone) consider(c.left, next[c.left]);
  }
  std::vector<int> merged;
  for (size_t i = 0; i < n; ++i) {
    if (alive[i]) merged.push_back(ids[i]);
  }
  return merged;
}

// ---------------------------------------------------------------------------
// Output side, common to all formats once each has resolved its pieces to bytes

// "<0xNN>" as the byte it stands for.
std::optional<char> byte_fallback_value(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return std::nullopt;
  const std::string hex = piece.substr(3, 2);
  if (!std::isxdigit(static_cast<unsigned char>(hex[0])) || !std::isxdigit(static_cast<unsigned char>(hex[1]))) {
    return std::nullopt;
  }
  return static_cast<char>(std::stoi(hex, nullptr, 16));
}

// The bytes of a SentencePiece-style piece: byte tokens give their byte, ▁ is a space.
std::string sentencepiece_piece_bytes(const std::string& piece) {
  if (auto byte = byte_fallback_value(piece)) return std::string(1, *byte);
  return replace_all(piece, kSentencePieceSpace, " ");
}

class PieceTokenizer : public Tokenizer {
 public:
  std::string token_bytes(int prev_id, int id) const override { return output_bytes(prev_id, id, false); }
  int bos_id() const override { return bos_id_; }
  int eos_id() const override { return eos_id_; }
  int vocab_size() const override { return static_cast<int>(outputs_.size()); }

 protected:
  struct TokenOutput {
    std::string bytes;  // for a special token: its text, printed only by a decode that keeps specials
    bool special = false;
  };

  std::string output_bytes(int prev_id, int id, bool keep_special) const {
    if (id < 0 || id >= vocab_size()) {
      throw TokenizerError("token id " + std::to_string(id) + " is outside the vocabulary of " +
                           std::to_string(vocab_size()) + " tokens");
    }
    const TokenOutput& output = outputs_[id];
    if (output.special && !keep_special) return "";
    // The space SentencePiece put before the text ("dummy prefix") is not part of it.
    if (drop_space_after_bos_ && prev_id == bos_id_ && !output.bytes.empty() && output.bytes[0] == ' ') {
      return output.bytes.substr(1);
    }
    return output.bytes;
  }

  std::vector<TokenOutput> outputs_;  // indexed by id
  int bos_id_ = -1;
  int eos_id_ = -1;
  bool drop_space_after_bos_ = true;
};

// ---------------------------------------------------------------------------
// SentencePiece BPE. A llama2.c tokenizer.bin and a SentencePiece
// tokenizer.model spell the same kind of vocabulary (scored pieces, a space
// for ▁, <0xNN> byte pieces); one encoder serves both. For a .bin it is
// run.c's encode(), for a .model SentencePiece's BPE encoding: the two agree
// on the Llama 2 vocabulary.

// SentencePiece's ModelProto.SentencePiece.Type values.
enum class PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct ScoredPiece {
  std::string text;  // ▁ as ' ', bytes as "<0xNN>"
  float score = 0;
  PieceType type = PieceType::kNormal;
};

// What SentencePiece's normalizer with no normalization rule ("identity")
// does to the text before BPE sees it.
struct TextRules {
  bool add_dummy_prefix = true;           // a space in front of non-empty text
  bool remove_extra_whitespaces = false;  // strip leading and trailing spaces, collapse runs of them
  // SentencePiece reads the text as UTF-8: a byte outside a valid character
  // becomes U+FFFD, and U+2581 is a space (it escapes ' ' to ▁). run.c takes
  // the bytes as they come.
  bool sentencepiece_text = false;
};

class SentencePieceBpeTokenizer : public PieceTokenizer {
 public:
  std::vector<int> encode(const std::string& text, bool add_bos) const override {
    const std::string normalized = normalize(text);
    // While merging, a user-defined piece is id + frozen: it stays one symbol, as in SentencePiece.
    const int frozen = static_cast<int>(pieces_.size());
    std::vector<int> symbols;
    // BOS takes part in the pairs, as in run.c; a SentencePiece BOS is a control piece, which never merges.
    if (add_bos) symbols.push_back(bos_id_);
    for (size_t i = 0; i < normalized.size();) {
      if (const int id = user_defined_at(normalized, i); id >= 0) {
        symbols.push_back(id + frozen);
        i += pieces_[id].text.size();
        continue;
      }
      // run.c's characters: a byte and up to 3 continuation bytes after it
      // (for the valid UTF-8 SentencePiece normalizes to: its characters).
      size_t length = 1;
      while (length < 4 && i + length < normalized.size() &&
             (static_cast<uint8_t>(normalized[i + length]) & 0xC0) == 0x80) {
        ++length;
      }
      const std::string c = normalized.substr(i, length);
      i += length;
      if (const auto it = piece_ids_.find(c); it != piece_ids_.end()) {
        symbols.push_back(it->second);
      } else if (byte_fallback_) {
        for (char byte : c) {
          const int byte_id = byte_ids_[static_cast<uint8_t>(byte)];
          symbols.push_back(byte_id >= 0 ? byte_id : unk_id_);
        }
      } else if (unk_id_ >= 0) {
        symbols.push_back(unk_id_);
      } else {
        throw TokenizerError(path_.string() + ": no token for \"" + c + "\" and neither byte pieces nor <unk>");
      }
    }
    // A merge into an UNUSED piece is undone at the end, as SentencePiece
    // does: remember the pair each one was last queued from.
    std::unordered_map<int, std::pair<int, int>> unused_from;
    auto find_merge = [&](int left, int right) -> std::optional<Merge> {
      if (left >= frozen || right >= frozen || !mergeable(left) || !mergeable(right)) return std::nullopt;
      const auto it = piece_ids_.find(pieces_[left].text + pieces_[right].text);
      if (it == piece_ids_.end()) return std::nullopt;
      if (pieces_[it->second].type == PieceType::kUnused) unused_from[it->second] = {left, right};
      return Merge{-pieces_[it->second].score, it->second};
    };
    std::vector<int> ids;
    for (int id : merge_symbols(std::move(symbols), find_merge)) {
      // Without byte fallback SentencePiece gives a run of unknown characters one <unk>.
      if (id == unk_id_ && !byte_fallback_ && !ids.empty() && ids.back() == unk_id_) continue;
      resegment(id >= frozen ? id - frozen : id, unused_from, ids);
    }
    return ids;
  }

 protected:
  explicit SentencePieceBpeTokenizer(fs::path path) : path_(std::move(path)) { byte_ids_.fill(-1); }

  // Once a loader has filled the members below: the lookups and the outputs.
  // Pieces that merges and characters may become are NORMAL, USER_DEFINED
  // and UNUSED ones (a .bin has no other). On a duplicate piece the first
  // wins (run.c's binary search picks either) unless `duplicates_are_errors`.
  void index(bool duplicates_are_errors) {
    for (size_t id = 0; id < pieces_.size(); ++id) {
      const ScoredPiece& piece = pieces_[id];
      if (mergeable(static_cast<int>(id)) && !piece_ids_.emplace(piece.text, static_cast<int>(id)).second &&
          duplicates_are_errors) {
        fail(path_, "piece " + std::to_string(id) + " \"" + piece.text + "\" is defined twice");
      }
      if (piece.type == PieceType::kUserDefined) {
        user_defined_by_first_byte_[static_cast<uint8_t>(piece.text[0])].push_back(static_cast<int>(id));
      }
      const bool special = piece.type == PieceType::kControl || static_cast<int>(id) == bos_id_ ||
                           static_cast<int>(id) == eos_id_;
      outputs_.push_back({sentencepiece_piece_bytes(piece.text), special});
    }
    for (auto& bucket : user_defined_by_first_byte_) {
      std::stable_sort(bucket.begin(), bucket.end(),
                       [this](int a, int b) { return pieces_[a].text.size() > pieces_[b].text.size(); });
    }
    // SentencePiece's decoder drops the leading space under the same condition.
    drop_space_after_bos_ = rules_.add_dummy_prefix || rules_.remove_extra_whitespaces;
  }

  fs::path path_;
  std::vector<ScoredPiece> pieces_;  // indexed by id
  TextRules rules_;
  bool byte_fallback_ = true;   // a character with no piece becomes its byte pieces
  std::array<int, 256> byte_ids_;  // -1 where there is no <0xNN> piece (that byte becomes unk_id_)
  int unk_id_ = -1;             // -1: none

 private:
  bool mergeable(int id) const {
    const PieceType type = pieces_[id].type;
    return type == PieceType::kNormal || type == PieceType::kUserDefined || type == PieceType::kUnused;
  }

  std::string normalize(const std::string& text) const {
    std::string_view rest = text;
    if (rules_.remove_extra_whitespaces) {
      while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
    }
    if (rest.empty()) return "";
    std::string normalized = rules_.add_dummy_prefix ? " " : "";
    if (!rules_.sentencepiece_text) return normalized.append(rest);
    bool after_space = false;
    for (size_t i = 0; i < rest.size();) {
      const Utf8Scan scan = scan_utf8(rest, i);
      if (scan.kind != Utf8Scan::kChar) {  // SentencePiece replaces one byte at a time
        normalized += kReplacementChar;
        after_space = false;
        ++i;
        continue;
      }
      const std::string_view c = rest.substr(i, scan.length);
      i += scan.length;
      if (c == " ") {
        if (!(after_space && rules_.remove_extra_whitespaces)) normalized += ' ';
        after_space = true;
      } else {
        normalized += c == kSentencePieceSpace ? std::string_view(" ") : c;
        after_space = false;
      }
    }
    // Trailing ▁ go, whether they were ' ' or U+2581 (the dummy prefix too, if nothing else is left).
    if (rules_.remove_extra_whitespaces) {
      while (!normalized.empty() && normalized.back() == ' ') normalized.pop_back();
    }
    return normalized;
  }

  // The longest user-defined piece at text[i], or -1.
  int user_defined_at(const std::string& text, size_t i) const {
    for (int id : user_defined_by_first_byte_[static_cast<uint8_t>(text[i])]) {
      if (text.compare(i, pieces_[id].text.size(), pieces_[id].text) == 0) return id;
    }
    return -1;
  }

  void resegment(int id, const std::unordered_map<int, std::pair<int, int>>& unused_from,
                 std::vector<int>& ids) const {
    const auto it = unused_from.find(id);
    if (pieces_[id].type != PieceType::kUnused || it == unused_from.end()) {
      ids.push_back(id);
      return;
    }
    resegment(it->second.first, unused_from, ids);
    resegment(it->second.second, unused_from, ids);
  }

  std::unordered_map<std::string, int> piece_ids_;  // mergeable pieces
  std::array<std::vector<int>, 256> user_defined_by_first_byte_;  // each longest first
};

// llama2.c tokenizer.bin, encoded exactly as run.c's encode()
class Llama2cTokenizer : public SentencePieceBpeTokenizer {
 public:
  explicit Llama2cTokenizer(const fs::path& path) : SentencePieceBpeTokenizer(path) {
    const std::string data = read_file_bytes(path);
    // Layout (host byte order, as export.py wrote it): int32 max_token_length,
    // then per token float32 score, int32 length, bytes; the count is implicit.
    if (data.size() < 4) fail(path, "truncated llama2.c tokenizer (no max_token_length header)");
    for (size_t offset = 4; offset < data.size();) {
      const size_t id = pieces_.size();
      if (data.size() - offset < 8) {
        fail(path, "truncated entry for token " + std::to_string(id) + " at byte " + std::to_string(offset));
      }
      float score;
      int32_t length;
      std::memcpy(&score, data.data() + offset, 4);
      std::memcpy(&length, data.data() + offset + 4, 4);
      offset += 8;
      if (length < 0 || static_cast<size_t>(length) > data.size() - offset) {
        fail(path, "truncated entry for token " + std::to_string(id) + ": " + std::to_string(length) +
                       " bytes announced at byte " + std::to_string(offset - 4) + ", " +
                       std::to_string(data.size() - offset) + " left");
      }
      // No types in a .bin: run.c lets every piece, BOS and <0xNN> included, take part in merges.
      pieces_.push_back({data.substr(offset, length), score, PieceType::kNormal});
      offset += length;
    }
    if (pieces_.size() < size_t{kFirstByteId} + 256) {
      fail(path, "only " + std::to_string(pieces_.size()) +
                     " tokens; a llama2.c vocabulary has BOS 1, EOS 2 and byte tokens 3..258");
    }
    if (std::none_of(pieces_.begin(), pieces_.end(), [](const ScoredPiece& p) { return p.text == " "; })) {
      fail(path, "no \" \" token, which encoding prepends to every text");
    }
    bos_id_ = 1;
    eos_id_ = 2;
    for (int byte = 0; byte < 256; ++byte) byte_ids_[byte] = byte + kFirstByteId;
    index(false);
  }

 private:
  static constexpr int kFirstByteId = 3;  // <0x00>; byte b is token b + 3
};

// ---------------------------------------------------------------------------
// SentencePiece tokenizer.model: a serialized ModelProto (sentencepiece_model.proto),
// read with a small protobuf wire-format reader rather than libsentencepiece,
// whose embedded protobuf clashes with LibTorch's libprotobuf in one process.

class ProtoReader {
 public:
  enum WireType { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };
  struct Field {
    uint64_t number;
    int wire_type;
    size_t at;  // file offset of its key
  };

  // `start`: where `data` begins in the file, for error messages.
  ProtoReader(const fs::path& path, std::string_view data, size_t start) : path_(path), data_(data), start_(start) {}

  bool at_end() const { return pos_ == data_.size(); }

  Field next_field() {
    const size_t at = offset();
    const uint64_t key = varint();
    const Field field{key >> 3, static_cast<int>(key & 7), at};
    if (field.number == 0) corrupt("field number 0", at);
    if (field.wire_type == 3 || field.wire_type == 4 || field.wire_type > 5) {
      corrupt("field " + std::to_string(field.number) + " with unsupported wire type " +
                  std::to_string(field.wire_type),
              at);
    }
    return field;
  }

  uint64_t varint_field(const Field& field) {
    expect(field, kVarint);
    return varint();
  }
  int32_t int32_field(const Field& field) { return static_cast<int32_t>(varint_field(field)); }
  bool bool_field(const Field& field) { return varint_field(field) != 0; }

  float float_field(const Field& field) {
    expect(field, kFixed32);
    const std::string_view bytes = take(4, "float");
    const uint32_t bits = static_cast<uint32_t>(static_cast<uint8_t>(bytes[0])) |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[1])) << 8 |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[2])) << 16 |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[3])) << 24;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
  }

  std::string_view bytes_field(const Field& field) {
    expect(field, kLengthDelimited);
    const size_t at = offset();
    const uint64_t length = varint();
    if (length > data_.size() - pos_) {
      corrupt("field " + std::to_string(field.number) + " announces " + std::to_string(length) + " bytes, " +
                  std::to_string(data_.size() - pos_) + " left",
              at);
    }
    return take(length, "");
  }

  ProtoReader message_field(const Field& field) {
    const std::string_view bytes = bytes_field(field);
    return ProtoReader(path_, bytes, start_ + static_cast<size_t>(bytes.data() - data_.data()));
  }

  void skip(const Field& field) {
    switch (field.wire_type) {
      case kVarint: varint(); break;
      case kFixed64: take(8, "64-bit field"); break;
      case kLengthDelimited: bytes_field(field); break;
      case kFixed32: take(4, "32-bit field"); break;
    }
  }

  [[noreturn]] void corrupt(const std::string& problem, size_t at) const {
    fail(path_, "not a SentencePiece model: " + problem + " at byte " + std::to_string(at));
  }

 private:
  size_t offset() const { return start_ + pos_; }

  uint64_t varint() {
    const size_t at = offset();
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ == data_.size()) corrupt("truncated varint", at);
      const auto byte = static_cast<uint8_t>(data_[pos_++]);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return value;
    }
    corrupt("varint longer than 10 bytes", at);
  }

  std::string_view take(size_t n, const char* what) {
    if (n > data_.size() - pos_) corrupt(std::string("truncated ") + what, offset());
    const std::string_view bytes = data_.substr(pos_, n);
    pos_ += n;
    return bytes;
  }

  void expect(const Field& field, WireType wire_type) const {
    if (field.wire_type != wire_type) {
      corrupt("field " + std::to_string(field.number) + " has wire type " + std::to_string(field.wire_type) +
                  ", expected " + std::to_string(wire_type),
              field.at);
    }
  }

  const fs::path& path_;
  std::string_view data_;
  size_t start_;
  size_t pos_ = 0;
};

class SentencePieceModelTokenizer : public SentencePieceBpeTokenizer {
 public:
  explicit SentencePieceModelTokenizer(const fs::path& path) : SentencePieceBpeTokenizer(path) {
    const std::string data = read_file_bytes(path);
    ProtoReader model(path, data, 0);
    Trainer trainer;
    Normalizer normalizer;
    bool has_trainer_spec = false;
    while (!model.at_end()) {  // ModelProto
      const ProtoReader::Field field = model.next_field();
      if (field.number == 1) {
        read_piece(model.message_field(field), field.at);
      } else if (field.number == 2) {
        read_trainer(model.message_field(field), trainer);
        has_trainer_spec = true;
      } else if (field.number == 3) {
        read_normalizer(model.message_field(field), normalizer);
      } else {
        model.skip(field);
      }
    }
    if (pieces_.empty()) fail(path, "not a SentencePiece model: no pieces");
    if (!has_trainer_spec) fail(path, "not a SentencePiece model: no trainer_spec (truncated?)");

    if (trainer.model_type != kBpe) {
      const char* const names[] = {"UNIGRAM", "BPE", "WORD", "CHAR"};
      const std::string type = trainer.model_type >= 1 && trainer.model_type <= 4
                                   ? names[trainer.model_type - 1]
                                   : "model_type " + std::to_string(trainer.model_type);
      fail(path, "only BPE SentencePiece models are supported; this one is " + type);
    }
    if (trainer.treat_whitespace_as_suffix) fail(path, "unsupported treat_whitespace_as_suffix");
    if (!normalizer.precompiled_charsmap.empty()) {
      fail(path, "unsupported normalization rule \"" + normalizer.name + "\" (only identity is)");
    }
    if (!normalizer.escape_whitespaces) fail(path, "unsupported escape_whitespaces false");
    rules_ = {normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces, true};
    byte_fallback_ = trainer.byte_fallback;

    // The checks SentencePiece makes on loading.
    for (size_t id = 0; id < pieces_.size(); ++id) {
      const ScoredPiece& piece = pieces_[id];
      const std::string what = "piece " + std::to_string(id) + " \"" + piece.text + "\"";
      if (piece.type == PieceType::kUnknown) {
        if (unk_id_ >= 0) fail(path, what + ": a second unknown piece");
        unk_id_ = static_cast<int>(id);
      } else if (piece.type == PieceType::kByte) {
        const auto byte = byte_fallback_value(piece.text);
        if (!byte) fail(path, what + " is a byte piece but not <0xNN>");
        if (!byte_fallback_) fail(path, what + " is a byte piece, but byte_fallback is off");
        byte_ids_[static_cast<uint8_t>(*byte)] = static_cast<int>(id);
      }
    }
    if (unk_id_ < 0) fail(path, "no unknown piece");
    bos_id_ = special_id(trainer.bos_id, "bos_id");
    eos_id_ = special_id(trainer.eos_id, "eos_id");
    index(true);
  }

 private:
  static constexpr uint64_t kBpe = 2;

  struct Trainer {  // the TrainerSpec fields that encoding depends on, with their defaults
    uint64_t model_type = 1;  // UNIGRAM
    bool treat_whitespace_as_suffix = false;
    bool byte_fallback = false;
    int32_t bos_id = 1;
    int32_t eos_id = 2;
  };
  struct Normalizer {  // NormalizerSpec
    std::string name;
    std::string precompiled_charsmap;
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = true;
    bool escape_whitespaces = true;
  };

  void read_piece(ProtoReader message, size_t at) {
    ScoredPiece piece;
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      if (field.number == 1) {
        piece.text = replace_all(std::string(message.bytes_field(field)), kSentencePieceSpace, " ");
      } else if (field.number == 2) {
        piece.score = message.float_field(field);
      } else if (field.number == 3) {
        const uint64_t type = message.varint_field(field);
        if (type < 1 || type > 6) message.corrupt("piece type " + std::to_string(type), field.at);
        piece.type = static_cast<PieceType>(type);
      } else {
        message.skip(field);
      }
    }
    if (piece.text.empty()) message.corrupt("empty piece " + std::to_string(pieces_.size()), at);
    pieces_.push_back(std::move(piece));
  }

  static void read_trainer(ProtoReader message, Trainer& trainer) {
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      switch (field.number) {
        case 3: trainer.model_type = message.varint_field(field); break;
        case 24: trainer.treat_whitespace_as_suffix = message.bool_field(field); break;
        case 35: trainer.byte_fallback = message.bool_field(field); break;
        case 41: trainer.bos_id = message.int32_field(field); break;
        case 42: trainer.eos_id = message.int32_field(field); break;
        default: message.skip(field);
      }
    }
  }

  static void read_normalizer(ProtoReader message, Normalizer& normalizer) {
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      switch (field.number) {
        case 1: normalizer.name = message.bytes_field(field); break;
        case 2: normalizer.precompiled_charsmap = message.bytes_field(field); break;
        case 3: normalizer.add_dummy_prefix = message.bool_field(field); break;
        case 4: normalizer.remove_extra_whitespaces = message.bool_field(field); break;
        case 5: normalizer.escape_whitespaces = message.bool_field(field); break;
        default: message.skip(field);
      }
    }
  }

  int special_id(int32_t id, const char* name) const {
    if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) {
      fail(path_, std::string("trainer_spec ") + name + " " + std::to_string(id) + " is not one of the " +
                      std::to_string(pieces_.size()) + " pieces");
    }
    return id;
  }
};

// ---------------------------------------------------------------------------
// Hugging Face tokenizer.json: BPE, either byte-level (GPT-2, Llama 3) or
// SentencePiece-style with ▁ for spaces and byte fallback (Llama 2)

// GPT-2's reversible byte -> printable character mapping: bytes that are
// printable Latin-1 map to themselves, the others to U+0100 onwards in order.
const std::array<std::string, 256>& byte_level_chars() {
  static const std::array<std::string, 256> chars = [] {
    std::array<std::string, 256> table;
    int next_unprintable = 0;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
      const int codepoint = printable ? byte : 256 + next_unprintable++;
      // Every codepoint here is below U+0800: one or two UTF-8 bytes.
      table[byte] = codepoint < 0x80 ? std::string(1, static_cast<char>(codepoint))
                                     : std::string{static_cast<char>(0xC0 | (codepoint >> 6)),
                                                   static_cast<char>(0x80 | (codepoint & 0x3F))};
    }
    return table;
  }();
  return chars;
}

std::string byte_level_decode(const std::string& token) {
  static const std::unordered_map<std::string_view, char> byte_of = [] {
    std::unordered_map<std::string_view, char> table;
    for (int byte = 0; byte < 256; ++byte) table.emplace(byte_level_chars()[byte], static_cast<char>(byte));
    return table;
  }();
  std::string bytes;
  for (std::string_view c : utf8_chars(token)) {
    const auto it = byte_of.find(c);
    if (it == byte_of.end()) {
      bytes += c;  // not from the byte mapping (an added token's text): already the bytes
    } else {
      bytes += it->second;
    }
  }
  return bytes;
}

struct Pcre2CodeFree {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
using Pcre2Code = std::unique_ptr<pcre2_code, Pcre2CodeFree>;

struct Pcre2MatchDataFree {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof buffer);
  return reinterpret_cast<const char*>(buffer);
}

// One step of a normalizer: replace every `from` by `to`, or put `to` in
// front of a non-empty text.
struct TextEdit {
  enum Kind { kReplace, kPrepend } kind;
  std::string from, to;
  // Metaspace's prepending: not where the text starts with `to` already, and
  // with prepend_scheme "first" not for text that follows an added token.
  bool unless_present = false;
  bool only_at_text_start = false;
};

std::string apply_edits(std::string text, bool at_text_start, const std::vector<TextEdit>& edits) {
  for (const TextEdit& edit : edits) {
    if (edit.kind == TextEdit::kReplace) {
      text = replace_all(std::move(text), edit.from, edit.to);
      continue;
    }
    const bool present = text.compare(0, edit.to.size(), edit.to) == 0;
    if (!text.empty() && !(edit.unless_present && present) && !(edit.only_at_text_start && !at_text_start)) {
      text = edit.to + text;
    }
  }
  return text;
}

const json& member(const json& object, const char* key) {
  static const json null;
  const auto it = object.find(key);
  return it == object.end() ? null : *it;
}

std::string string_or(const json& value, const std::string& fallback) {
  return value.is_string() ? value.get<std::string>() : fallback;
}

class HfTokenizer : public PieceTokenizer {
 public:
  explicit HfTokenizer(const fs::path& path) : path_(path) {
    json root;
    try {
      root = json::parse(read_file_bytes(path));
    } catch (const json::exception& e) {
      fail(path, std::string("invalid JSON: ") + e.what());
    }
    try {
      read_normalizer(member(root, "normalizer"));
      // Before the model: whether the pre-tokenizer is byte-level decides how vocab pieces spell bytes.
      read_pre_tokenizer(member(root, "pre_tokenizer"));
      read_model(member(root, "model"));
      read_added_tokens(member(root, "added_tokens"));
      read_special_ids(path.parent_path() / "tokenizer_config.json");
    } catch (const json::exception& e) {
      fail(path, std::string("unexpected tokenizer.json content: ") + e.what());
    }
  }

  std::vector<int> encode(const std::string& text, bool add_bos) const override {
    std::vector<int> ids;
    if (add_bos) ids.push_back(bos_id_);
    // Added tokens are matched verbatim before anything else (leftmost, then longest).
    size_t segment_start = 0;
    for (size_t i = 0; i < text.size();) {
      const AddedToken* found = nullptr;
      for (const AddedToken& token : added_by_first_byte_[static_cast<uint8_t>(text[i])]) {
        if (text.compare(i, token.content.size(), token.content) == 0) {
          found = &token;
          break;
        }
      }
      if (!found) {
        ++i;
        continue;
      }
      encode_segment(std::string_view(text).substr(segment_start, i - segment_start), segment_start == 0, ids);
      ids.push_back(found->id);
      i += found->content.size();
      segment_start = i;
    }
    encode_segment(std::string_view(text).substr(segment_start), segment_start == 0, ids);
    return ids;
  }

  std::string decode(const std::vector<int>& ids) const override {
    std::string text;
    int prev_id = bos_id_;
    for (int id : ids) {
      text += output_bytes(prev_id, id, true);
      prev_id = id;
    }
    return text;
  }

 private:
  struct AddedToken {
    std::string content;
    int id;
  };

  void read_normalizer(const json& normalizer) {
    if (normalizer.is_null()) return;
    const std::string type = normalizer.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const json& step : normalizer.at("normalizers")) read_normalizer(step);
    } else if (type == "Prepend") {
      edits_.push_back({TextEdit::kPrepend, "", normalizer.at("prepend").get<std::string>()});
    } else if (type == "Replace" && member(normalizer.at("pattern"), "String").is_string()) {
      edits_.push_back({TextEdit::kReplace, normalizer.at("pattern").at("String").get<std::string>(),
                        normalizer.at("content").get<std::string>()});
    } else {
      fail(path_, "unsupported normalizer " + normalizer.dump());
    }
  }

  void read_pre_tokenizer(const json& pre_tokenizer) {
    if (pre_tokenizer.is_null()) return;
    const std::string type = pre_tokenizer.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const json& step : pre_tokenizer.at("pretokenizers")) read_pre_tokenizer(step);
    } else if (type == "Split" && !split_regex_ && member(pre_tokenizer, "behavior") == "Isolated" &&
               member(pre_tokenizer, "invert") != true) {
      const json& pattern = pre_tokenizer.at("pattern");
      const bool literal = member(pattern, "String").is_string();
      compile_split_regex(pattern.at(literal ? "String" : "Regex").get<std::string>(), literal);
    } else if (type == "ByteLevel" && member(pre_tokenizer, "add_prefix_space") != true &&
               member(pre_tokenizer, "use_regex") == false) {
      byte_level_ = true;
    } else if (type == "Metaspace" && member(pre_tokenizer, "split") == false) {
      // Unsplit Metaspace is a normalizer in disguise: spaces become ▁, and ▁ leads the text.
      const std::string replacement = string_or(member(pre_tokenizer, "replacement"), kSentencePieceSpace);
      edits_.push_back({TextEdit::kReplace, " ", replacement});
      const std::string scheme = string_or(member(pre_tokenizer, "prepend_scheme"), "always");
      if (scheme != "never") edits_.push_back({TextEdit::kPrepend, "", replacement, true, scheme == "first"});
    } else {
      fail(path_, "unsupported pre_tokenizer " + pre_tokenizer.dump());
    }
  }

  void compile_split_regex(const std::string& pattern, bool literal) {
    int error_code;
    PCRE2_SIZE error_offset;
    // UCP: \s, \p{L} and friends follow Unicode as in the Rust regex crate;
    // MATCH_INVALID_UTF: stray bytes in the input fall between matches instead of failing.
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : 0);
    split_regex_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                                     &error_code, &error_offset, nullptr));
    if (!split_regex_) {
      fail(path_, "pre_tokenizer pattern does not compile at offset " + std::to_string(error_offset) + ": " +
                      pcre2_message(error_code));
    }
    // Interpreted, the Llama 3 pattern took 1.5 s for 156 kB of text, JIT-compiled 4 ms.
    // Where JIT is unavailable pcre2_match still interprets.
    pcre2_jit_compile(split_regex_.get(), PCRE2_JIT_COMPLETE);
  }

  void read_model(const json& model) {
    if (model.is_null()) fail(path_, "no \"model\"");
    if (string_or(member(model, "type"), "BPE") != "BPE") {
      fail(path_, "unsupported model type " + model.at("type").dump());
    }
    if (!string_or(member(model, "continuing_subword_prefix"), "").empty() ||
        !string_or(member(model, "end_of_word_suffix"), "").empty()) {
      fail(path_, "unsupported BPE with continuing_subword_prefix or end_of_word_suffix");
    }
    byte_fallback_ = member(model, "byte_fallback") == true;
    ignore_merges_ = member(model, "ignore_merges") == true;

    const json& vocab = model.at("vocab");
    vocab_.reserve(vocab.size());
    int max_id = -1;
    for (const auto& [piece, id] : vocab.items()) {
      if (id.get<int>() < 0) fail(path_, "vocab id " + id.dump() + " of \"" + piece + "\" is negative");
      vocab_.emplace(piece, id.get<int>());
      max_id = std::max(max_id, id.get<int>());
    }
    outputs_.resize(max_id + 1);
    drop_space_after_bos_ = !byte_level_;
    for (const auto& [piece, id] : vocab_) {
      outputs_[id].bytes = byte_level_ ? byte_level_decode(piece) : sentencepiece_piece_bytes(piece);
    }
    if (const json& unk = member(model, "unk_token"); unk.is_string()) unk_id_ = vocab_id(unk, "unk_token");

    const json& merges = model.at("merges");
    merges_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      // Older files write a merge as "left right", newer ones as ["left", "right"].
      const json& merge = merges[rank];
      const std::string what = "merge " + std::to_string(rank) + " " + merge.dump();
      std::string left, right;
      if (merge.is_string()) {
        const std::string& text = merge.get_ref<const std::string&>();
        const size_t space = text.find(' ');
        if (space == std::string::npos) fail(path_, what + " is not a pair");
        left = text.substr(0, space);
        right = text.substr(space + 1);
      } else {
        left = merge.at(0).get<std::string>();
        right = merge.at(1).get<std::string>();
      }
      const int left_id = vocab_id(left, what);
      const int right_id = vocab_id(right, what);
      merges_.emplace(pair_key(left_id, right_id), Merge{static_cast<float>(rank), vocab_id(left + right, what)});
    }
  }

  void read_added_tokens(const json& added_tokens) {
    if (added_tokens.is_null()) return;
    for (const json& token : added_tokens) {
      const int id = token.at("id").get<int>();
      const std::string content = token.at("content").get<std::string>();
      if (content.empty()) continue;
      if (id < 0) fail(path_, "added token \"" + content + "\" has negative id " + std::to_string(id));
      if (id >= vocab_size()) outputs_.resize(id + 1);
      outputs_[id] = {content, member(token, "special") == true};
      added_by_first_byte_[static_cast<uint8_t>(content[0])].push_back({content, id});
    }
    for (auto& bucket : added_by_first_byte_) {
      std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken& a, const AddedToken& b) {
        return a.content.size() > b.content.size();
      });
    }
  }

  // tokenizer_config.json names BOS and EOS where there is one; otherwise the
  // Llama 3 and Llama 2 names.
  void read_special_ids(const fs::path& config_path) {
    json config;
    if (fs::exists(config_path)) {
      try {
        config = json::parse(read_file_bytes(config_path));
      } catch (const json::exception& e) {
        fail(config_path, std::string("invalid JSON: ") + e.what());
      }
    }
    bos_id_ = special_id(config, "bos_token", {"<|begin_of_text|>", "<s>"});
    eos_id_ = special_id(config, "eos_token", {"<|end_of_text|>", "</s>"});
    // Even where the file does not flag them special, they are not text.
    outputs_[bos_id_].special = outputs_[eos_id_].special = true;
  }

  int special_id(const json& config, const char* key, const std::vector<std::string>& fallback_names) const {
    const json& named = member(config, key);  // a string, or {"content": ...} in older files
    const json& content = named.is_object() ? member(named, "content") : named;
    if (content.is_string()) {
      if (auto id = token_id(content.get<std::string>())) return *id;
      fail(path_, std::string("tokenizer_config.json's ") + key + " " + content.dump() + " is not a token");
    }
    for (const std::string& name : fallback_names) {
      if (auto id = token_id(name)) return *id;
    }
    fail(path_, std::string("no ") + key + ": no tokenizer_config.json naming one, and no " + fallback_names[0] +
                    " or " + fallback_names[1] + " token");
  }

  std::optional<int> token_id(const std::string& content) const {
    if (content.empty()) return std::nullopt;
    if (const auto it = vocab_.find(content); it != vocab_.end()) return it->second;
    for (const AddedToken& token : added_by_first_byte_[static_cast<uint8_t>(content[0])]) {
      if (token.content == content) return token.id;
    }
    return std::nullopt;
  }

  int vocab_id(const std::string& piece, const std::string& used_by) const {
    const auto it = vocab_.find(piece);
    if (it == vocab_.end()) fail(path_, used_by + ": \"" + piece + "\" is not in the vocab");
    return it->second;
  }

  static uint64_t pair_key(int left, int right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  // Text between added tokens: normalize, split into pre-tokens, BPE each.
  void encode_segment(std::string_view segment, bool at_text_start, std::vector<int>& ids) const {
    if (segment.empty()) return;
    const std::string normalized = apply_edits(std::string(segment), at_text_start, edits_);
    for (std::string_view word : split(normalized)) {
      if (!byte_level_) {
        encode_word(std::string(word), ids);
        continue;
      }
      std::string mapped;
      for (char byte : word) mapped += byte_level_chars()[static_cast<uint8_t>(byte)];
      encode_word(mapped, ids);
    }
  }

  // The Split pre-tokenizer with behavior Isolated: matches and the text
  // between them are both pre-tokens.
  std::vector<std::string_view> split(std::string_view text) const {
    if (!split_regex_) return {text};
    std::unique_ptr<pcre2_match_data, Pcre2MatchDataFree> match(
        pcre2_match_data_create_from_pattern(split_regex_.get(), nullptr));
    std::vector<std::string_view> words;
    size_t word_start = 0;
    for (size_t offset = 0; offset < text.size();) {
      const int rc = pcre2_match(split_regex_.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), offset,
                                 0, match.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw TokenizerError(path_.string() + ": pre_tokenizer regex failed: " + pcre2_message(rc));
      const PCRE2_SIZE* bounds = pcre2_get_ovector_pointer(match.get());
      if (bounds[0] > word_start) words.push_back(text.substr(word_start, bounds[0] - word_start));
      if (bounds[1] > bounds[0]) {
        words.push_back(text.substr(bounds[0], bounds[1] - bounds[0]));
        word_start = offset = bounds[1];
      } else {
        // An empty match: search on after the character it precedes.
        if (bounds[0] == text.size()) break;
        offset = bounds[0] + utf8_chars(text.substr(bounds[0], 4)).front().size();
      }
    }
    if (word_start < text.size()) words.push_back(text.substr(word_start));
    return words;
  }

  void encode_word(const std::string& word, std::vector<int>& ids) const {
    if (ignore_merges_) {
      if (const auto it = vocab_.find(word); it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    std::vector<int> symbols;
    for (std::string_view c : utf8_chars(word)) {
      if (const auto it = vocab_.find(std::string(c)); it != vocab_.end()) {
        symbols.push_back(it->second);
      } else if (auto bytes = byte_fallback_ids(c)) {
        symbols.insert(symbols.end(), bytes->begin(), bytes->end());
      } else if (unk_id_) {
        symbols.push_back(*unk_id_);
      } else {
        throw TokenizerError(path_.string() + ": no token for \"" + std::string(c) +
                             "\" and neither byte fallback nor unk_token");
      }
    }
    auto find_merge = [this](int left, int right) -> std::optional<Merge> {
      const auto it = merges_.find(pair_key(left, right));
      if (it == merges_.end()) return std::nullopt;
      return it->second;
    };
    const std::vector<int> merged = merge_symbols(std::move(symbols), find_merge);
    ids.insert(ids.end(), merged.begin(), merged.end());
  }

  std::optional<std::vector<int>> byte_fallback_ids(std::string_view c) const {
    if (!byte_fallback_) return std::nullopt;
    std::vector<int> ids;
    for (char byte : c) {
      char name[7];
      std::snprintf(name, sizeof name, "<0x%02X>", static_cast<uint8_t>(byte));
      const auto it = vocab_.find(name);
      if (it == vocab_.end()) return std::nullopt;
      ids.push_back(it->second);
    }
    return ids;
  }

  fs::path path_;
  std::vector<TextEdit> edits_;  // normalizer steps, then an unsplit Metaspace
  Pcre2Code split_regex_;
  bool byte_level_ = false;
  std::unordered_map<std::string, int> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank and result
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;  // a word that is itself in the vocab is one token
  std::optional<int> unk_id_;
  std::array<std::vector<AddedToken>, 256> added_by_first_byte_;  // each longest first
};

}  // namespace

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  int prev_id = bos_id();
  for (int id : ids) {
    text += token_bytes(prev_id, id);
    prev_id = id;
  }
  return text;
}

std::unique_ptr<Tokenizer> load_tokenizer(const fs::path& path) {
  if (fs::is_directory(path)) {
    for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer.bin"}) {
      if (fs::exists(path / name)) return load_tokenizer(path / name);
    }
    fail(path, "directory holds no tokenizer.json, tokenizer.model or tokenizer.bin");
  }
  if (!fs::exists(path)) fail(path, "no such file");
  const fs::path extension = path.extension();
  if (extension == ".bin") return std::make_unique<Llama2cTokenizer>(path);
  if (extension == ".model") return std::make_unique<SentencePieceModelTokenizer>(path);
  if (extension == ".json") return std::make_unique<HfTokenizer>(path);
  fail(path, "unknown tokenizer format (expected a llama2.c .bin, a SentencePiece .model or a tokenizer.json)");
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
