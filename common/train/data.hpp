#pragma once
// Fine-tuning data: a plain-text file (one document) or JSON lines with a
// "text" field (one document each), tokenized with the model's tokenizer, BOS
// before and EOS after every document, packed into one stream cut into
// sequences of seq_len + 1 tokens (inputs and their next tokens). A seeded
// shuffle holds a fraction out for validation and orders each epoch.
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "common/model/tokenizer/tokenizer.hpp"

namespace mdi {

struct TrainingDataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class TrainingData {
 public:
  // Throws TrainingDataError naming the file: unreadable, a JSON line without
  // "text", or fewer tokens than one sequence needs.
  static TrainingData load(const std::filesystem::path& path, const Tokenizer& tokenizer, int64_t seq_len, double validation_fraction,
                           uint64_t seed);
  // The same from a token stream (tests).
  TrainingData(std::vector<int32_t> tokens, int64_t seq_len, double validation_fraction, uint64_t seed, const std::string& source);

  int64_t seq_len() const { return seq_len_; }
  size_t n_tokens() const { return tokens_.size(); }
  size_t n_train() const { return train_.size(); }
  size_t n_validation() const { return validation_.size(); }

  // Sequence i of the stream: seq_len + 1 tokens.
  std::vector<int32_t> sequence(size_t i) const;
  // The batch_size training sequences of step `step` (1-based), drawn in the
  // shuffled order of their epoch; the same for the same seed on every run.
  std::vector<std::vector<int32_t>> batch(int64_t step, int64_t batch_size) const;
  std::vector<std::vector<int32_t>> validation() const;

 private:
  std::vector<size_t> epoch_order(uint64_t epoch) const;

  std::vector<int32_t> tokens_;
  int64_t seq_len_;
  uint64_t seed_;
  std::vector<size_t> train_, validation_;  // sequence indices
};

}  // namespace mdi
