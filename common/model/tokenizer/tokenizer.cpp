#include "common/model/tokenizer/tokenizer.hpp"

#include "common/model/tokenizer/piece_tokenizer.hpp"

namespace mdi {

namespace fs = std::filesystem;
using tokenizer_detail::fail;

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
  if (extension == ".bin") return tokenizer_detail::load_llama2c_tokenizer(path);
  if (extension == ".model") return tokenizer_detail::load_sentencepiece_tokenizer(path);
  if (extension == ".json") return tokenizer_detail::load_hf_tokenizer(path);
  fail(path, "unknown tokenizer format (expected a llama2.c .bin, a SentencePiece .model or a tokenizer.json)");
}

}  // namespace mdi
