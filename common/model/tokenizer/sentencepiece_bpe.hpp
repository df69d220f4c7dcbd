#pragma once
// SentencePiece BPE. A llama2.c tokenizer.bin and a SentencePiece
// tokenizer.model spell the same kind of vocabulary (scored pieces, a space
// for ▁, <0xNN> byte pieces); one encoder serves both. For a .bin it is
// run.c's encode(), for a .model SentencePiece's BPE encoding: the two agree
// on the Llama 2 vocabulary. Private to the tokenizers.
#include <array>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/model/tokenizer/piece_tokenizer.hpp"

namespace mdi::tokenizer_detail {

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
  std::vector<int> encode(const std::string& text, bool add_bos) const override;

 protected:
  explicit SentencePieceBpeTokenizer(fs::path path) : path_(std::move(path)) { byte_ids_.fill(-1); }

  // Once a loader has filled the members below: the lookups and the outputs.
  // Pieces that merges and characters may become are NORMAL, USER_DEFINED
  // and UNUSED ones (a .bin has no other). On a duplicate piece the first
  // wins (run.c's binary search picks either) unless `duplicates_are_errors`.
  void index(bool duplicates_are_errors);

  fs::path path_;
  std::vector<ScoredPiece> pieces_;  // indexed by id
  TextRules rules_;
  bool byte_fallback_ = true;   // a character with no piece becomes its byte pieces
  std::array<int, 256> byte_ids_;  // -1 where there is no <0xNN> piece (that byte becomes unk_id_)
  int unk_id_ = -1;             // -1: none

 private:
  bool mergeable(int id) const;
  std::string normalize(const std::string& text) const;
  // The longest user-defined piece at text[i], or -1.
  int user_defined_at(const std::string& text, size_t i) const;
  // An UNUSED piece that merging produced, back as the pair it was made of.
  void resegment(int id, const std::unordered_map<int, std::pair<int, int>>& unused_from,
                 std::vector<int>& ids) const;

  std::unordered_map<std::string, int> piece_ids_;  // mergeable pieces
  std::array<std::vector<int>, 256> user_defined_by_first_byte_;  // each longest first
};

}  // namespace mdi::tokenizer_detail
