#include "common/model/tokenizer/sentencepiece_bpe.hpp"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "common/model/tokenizer/bpe.hpp"
#include "common/model/tokenizer/utf8.hpp"

namespace mdi::tokenizer_detail {

std::vector<int> SentencePieceBpeTokenizer::encode(const std::string& text, bool add_bos) const {
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

void SentencePieceBpeTokenizer::index(bool duplicates_are_errors) {
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

bool SentencePieceBpeTokenizer::mergeable(int id) const {
  const PieceType type = pieces_[id].type;
  return type == PieceType::kNormal || type == PieceType::kUserDefined || type == PieceType::kUnused;
}

std::string SentencePieceBpeTokenizer::normalize(const std::string& text) const {
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

int SentencePieceBpeTokenizer::user_defined_at(const std::string& text, size_t i) const {
  for (int id : user_defined_by_first_byte_[static_cast<uint8_t>(text[i])]) {
    if (text.compare(i, pieces_[id].text.size(), pieces_[id].text) == 0) return id;
  }
  return -1;
}

void SentencePieceBpeTokenizer::resegment(int id, const std::unordered_map<int, std::pair<int, int>>& unused_from,
                                          std::vector<int>& ids) const {
  const auto it = unused_from.find(id);
  if (pieces_[id].type != PieceType::kUnused || it == unused_from.end()) {
    ids.push_back(id);
    return;
  }
  resegment(it->second.first, unused_from, ids);
  resegment(it->second.second, unused_from, ids);
}

}  // namespace mdi::tokenizer_detail
