#include "common/train/data.hpp"

#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

namespace mdi {

namespace fs = std::filesystem;

namespace {
// Fisher–Yates with our own draws: std::shuffle's order may differ between standard libraries.
void shuffle(std::vector<size_t>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}

std::vector<std::string> documents(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TrainingDataError("--data " + path.string() + ": cannot open");
  const std::string ext = path.extension().string();
  if (ext != ".jsonl" && ext != ".json") {
    std::stringstream all;
    all << in.rdbuf();
    return {all.str()};
  }
  std::vector<std::string> docs;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw TrainingDataError("--data " + path.string() + ":" + std::to_string(n) + ": not JSON (" + e.what() + ")");
    }
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      throw TrainingDataError("--data " + path.string() + ":" + std::to_string(n) + ": a JSON line needs a string field \"text\"");
    docs.push_back(j["text"].get<std::string>());
  }
  return docs;
}
}  // namespace

TrainingData TrainingData::load(const fs::path& path, const Tokenizer& tokenizer, int64_t seq_len, double validation_fraction,
                                uint64_t seed) {
  std::vector<int32_t> tokens;
  for (const std::string& doc : documents(path)) {
    for (int id : tokenizer.encode(doc, true)) tokens.push_back(id);
    tokens.push_back(tokenizer.eos_id());
  }
  return TrainingData(std::move(tokens), seq_len, validation_fraction, seed, "--data " + path.string());
}

TrainingData::TrainingData(std::vector<int32_t> tokens, int64_t seq_len, double validation_fraction, uint64_t seed,
                           const std::string& source)
    : tokens_(std::move(tokens)), seq_len_(seq_len), seed_(seed) {
  if (seq_len < 1) throw TrainingDataError("--seq-len must be at least 1");
  if (!(validation_fraction >= 0 && validation_fraction < 1))
    throw TrainingDataError("--val-fraction must be in [0, 1), got " + std::to_string(validation_fraction));
  const size_t n_sequences = tokens_.size() > 0 ? (tokens_.size() - 1) / static_cast<size_t>(seq_len) : 0;
  if (n_sequences == 0)
    throw TrainingDataError(source + " holds " + std::to_string(tokens_.size()) + " tokens; one sequence of --seq-len " +
                            std::to_string(seq_len) + " needs " + std::to_string(seq_len + 1) + ": give more text or a smaller --seq-len");
  std::vector<size_t> order(n_sequences);
  std::iota(order.begin(), order.end(), 0);
  shuffle(order, seed);
  const auto n_validation = static_cast<size_t>(validation_fraction * static_cast<double>(n_sequences));
  if (n_validation >= n_sequences)
    throw TrainingDataError(source + " gives " + std::to_string(n_sequences) + " sequences: --val-fraction " +
                            std::to_string(validation_fraction) + " leaves none to train on");
  validation_.assign(order.end() - static_cast<std::ptrdiff_t>(n_validation), order.end());
  train_.assign(order.begin(), order.end() - static_cast<std::ptrdiff_t>(n_validation));
}

std::vector<int32_t> TrainingData::sequence(size_t i) const {
  const auto begin = tokens_.begin() + static_cast<std::ptrdiff_t>(i * static_cast<size_t>(seq_len_));
  return {begin, begin + seq_len_ + 1};
}

std::vector<size_t> TrainingData::epoch_order(uint64_t epoch) const {
  std::vector<size_t> order = train_;
  shuffle(order, seed_ ^ (0x9E3779B97F4A7C15ull * (epoch + 1)));
  return order;
}

std::vector<std::vector<int32_t>> TrainingData::batch(int64_t step, int64_t batch_size) const {
  std::vector<std::vector<int32_t>> out;
  const uint64_t first = static_cast<uint64_t>(step - 1) * static_cast<uint64_t>(batch_size);
  uint64_t epoch = first / train_.size();
  std::vector<size_t> order = epoch_order(epoch);
  for (uint64_t g = first; g < first + static_cast<uint64_t>(batch_size); ++g) {
    if (g / train_.size() != epoch) order = epoch_order(epoch = g / train_.size());
    out.push_back(sequence(order[g % train_.size()]));
  }
  return out;
}

std::vector<std::vector<int32_t>> TrainingData::validation() const {
  std::vector<std::vector<int32_t>> out;
  for (size_t i : validation_) out.push_back(sequence(i));
  return out;
}

}  // namespace mdi
