#include "common/model/tokenizer/piece_tokenizer.hpp"

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/model/tokenizer/utf8.hpp"

namespace mdi::tokenizer_detail {

void fail(const fs::path& path, const std::string& problem) {
  throw TokenizerError(path.string() + ": " + problem);
}

std::string read_file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

std::optional<char> byte_fallback_value(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return std::nullopt;
  const std::string hex = piece.substr(3, 2);
  if (!std::isxdigit(static_cast<unsigned char>(hex[0])) || !std::isxdigit(static_cast<unsigned char>(hex[1]))) {
    return std::nullopt;
  }
  return static_cast<char>(std::stoi(hex, nullptr, 16));
}

std::string sentencepiece_piece_bytes(const std::string& piece) {
  if (auto byte = byte_fallback_value(piece)) return std::string(1, *byte);
  return replace_all(piece, kSentencePieceSpace, " ");
}

std::string PieceTokenizer::output_bytes(int prev_id, int id, bool keep_special) const {
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

}  // namespace mdi::tokenizer_detail
