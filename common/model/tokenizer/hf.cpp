// Hugging Face tokenizer.json: BPE, either byte-level (GPT-2, Llama 3) or
// SentencePiece-style with ▁ for spaces and byte fallback (Llama 2)
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string_view>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "common/model/tokenizer/bpe.hpp"
#include "common/model/tokenizer/piece_tokenizer.hpp"
#include "common/model/tokenizer/utf8.hpp"

namespace mdi::tokenizer_detail {
namespace {

using nlohmann::json;

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

std::unique_ptr<Tokenizer> load_hf_tokenizer(const fs::path& path) { return std::make_unique<HfTokenizer>(path); }

}  // namespace mdi::tokenizer_detail
