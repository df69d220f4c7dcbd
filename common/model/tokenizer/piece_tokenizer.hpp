#pragma once
// What the three tokenizer formats share once each has resolved its pieces
// to bytes: the output side (PieceTokenizer), the error helper, and each
// format's loader, which load_tokenizer picks by file name. Private to the
// tokenizers.
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/model/tokenizer/tokenizer.hpp"

namespace mdi::tokenizer_detail {

namespace fs = std::filesystem;

[[noreturn]] void fail(const fs::path& path, const std::string& problem);

std::string read_file_bytes(const fs::path& path);

// "<0xNN>" as the byte it stands for.
std::optional<char> byte_fallback_value(const std::string& piece);

// The bytes of a SentencePiece-style piece: byte tokens give their byte, ▁ is a space.
std::string sentencepiece_piece_bytes(const std::string& piece);

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

  std::string output_bytes(int prev_id, int id, bool keep_special) const;

  std::vector<TokenOutput> outputs_;  // indexed by id
  int bos_id_ = -1;
  int eos_id_ = -1;
  bool drop_space_after_bos_ = true;
};

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const fs::path& path);       // tokenizer.bin
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const fs::path& path);  // tokenizer.model
std::unique_ptr<Tokenizer> load_hf_tokenizer(const fs::path& path);             // tokenizer.json

}  // namespace mdi::tokenizer_detail
