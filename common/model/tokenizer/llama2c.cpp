// llama2.c tokenizer.bin, encoded exactly as run.c's encode()
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/model/tokenizer/sentencepiece_bpe.hpp"

namespace mdi::tokenizer_detail {
namespace {

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

}  // namespace

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const fs::path& path) {
  return std::make_unique<Llama2cTokenizer>(path);
}

}  // namespace mdi::tokenizer_detail
