#pragma once
// Text <-> token ids for the three tokenizer formats the models come with:
// llama2.c tokenizer.bin, SentencePiece tokenizer.model and Hugging Face
// tokenizer.json. All of them encode to exactly the ids their reference
// implementation gives (run.c, SentencePiece, HF tokenizers).
//
// tokenizer.model is read by our own protobuf reader, not libsentencepiece:
// Debian's libsentencepiece embeds and exports its own protobuf, which clashes
// with LibTorch's libprotobuf in one process (a crash at start-up). Only BPE
// models with the identity normalizer (as Llama 2's) are supported;
// others (UNIGRAM, nmt_nfkc, ...) are refused with a TokenizerError.
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model/tokenizer/utf8.hpp"  // Utf8Stream, for printing token_bytes

namespace mdi {

struct TokenizerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text to ids. add_bos prepends bos_id().
  virtual std::vector<int> encode(const std::string& text, bool add_bos) const = 0;

  // The raw bytes that token `id` stands for when it follows `prev_id` in a
  // generated stream: SentencePiece-style vocabularies drop the leading space
  // of the first piece after BOS, byte-fallback tokens <0xNN> give that one
  // byte, special tokens (BOS, EOS, ...) give "". A multi-byte character may
  // span tokens: print through Utf8Stream. Throws TokenizerError for an id
  // outside the vocabulary.
  virtual std::string token_bytes(int prev_id, int id) const = 0;

  // Whole-sequence decode, as if the first id followed BOS. SentencePiece and
  // llama2.c vocabularies render BOS/EOS as ""; Hugging Face tokenizers render
  // every added token as its text (like HF's decode), so that
  // decode(encode(t, false)) == t holds also for text that spells one.
  virtual std::string decode(const std::vector<int>& ids) const;

  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  virtual int vocab_size() const = 0;
};

// Chooses by file: *.bin -> llama2.c tokenizer, *.model -> SentencePiece BPE,
// *.json -> Hugging Face tokenizer.json; a directory -> the first of
// tokenizer.json, tokenizer.model, tokenizer.bin it holds. Throws
// TokenizerError naming the path and the problem.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path);

}  // namespace mdi
