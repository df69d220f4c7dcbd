#include "common/runtime/sample_progress.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "common/model/tokenizer/tokenizer.hpp"
#include "common/model/tokenizer/utf8.hpp"

namespace mdi {

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::running: return "running";
    case StopReason::eos: return "eos";
    case StopReason::length: return "length";
    case StopReason::context: return "context";
    case StopReason::non_finite_logits: return "non_finite_logits";
    case StopReason::interrupted: return "interrupted";
    case StopReason::failed: return "failed";
  }
  return "?";
}

SampleProgress::SampleProgress(int64_t index, std::string prompt, std::vector<int64_t> prompt_tokens, int64_t max_new_tokens,
                               Sampler sampler, const ModelConfig& config)
    : index_(index), prompt_(std::move(prompt)), prompt_tokens_(std::move(prompt_tokens)), tokens_(prompt_tokens_),
      max_new_tokens_(max_new_tokens), max_seq_len_(config.max_seq_len), sampler_(std::move(sampler)), config_(&config) {
  if (prompt_tokens_.empty()) throw std::invalid_argument("sample " + std::to_string(index) + ": empty prompt (no tokens, not even BOS)");
  if (static_cast<int64_t>(prompt_tokens_.size()) > max_seq_len_)
    throw std::invalid_argument("sample " + std::to_string(index) + ": prompt has " + std::to_string(prompt_tokens_.size()) +
                                " tokens, more than the model's context length " + std::to_string(max_seq_len_));
  if (max_new_tokens <= 0) stop_ = StopReason::length;
}

std::optional<int64_t> SampleProgress::advance(const float* logits, int64_t vocab) {
  const std::optional<int64_t> chosen = sampler_.sample(logits, vocab);
  if (!chosen) {
    stop_ = StopReason::non_finite_logits;
    return std::nullopt;
  }
  const int64_t token = *chosen;
  tokens_.push_back(token);
  if (config_->is_stop_token(token))
    stop_ = StopReason::eos;
  else if (generated() >= max_new_tokens_)
    stop_ = StopReason::length;
  else if (static_cast<int64_t>(tokens_.size()) > max_seq_len_)
    stop_ = StopReason::context;  // chosen from the last position's logits: kept, but it has no position to be fed at
  return token;
}

std::vector<int64_t> SampleProgress::pending_input() const { return {tokens_.begin() + fed_, tokens_.end()}; }

std::vector<std::string> read_prompts(const std::string& prompt_arg) {
  const std::string prefix = "FILE:";
  if (prompt_arg.rfind(prefix, 0) != 0) return {prompt_arg};
  const std::string path = prompt_arg.substr(prefix.size());
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("--prompt " + prompt_arg + ": cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  while (!text.empty() && text.back() == '\n') text.pop_back();
  std::vector<std::string> prompts;
  size_t start = 0;
  while (start <= text.size()) {
    size_t blank = text.find("\n\n", start);
    std::string block = text.substr(start, blank == std::string::npos ? std::string::npos : blank - start);
    // Extra blank lines between paragraphs do not make empty prompts.
    while (!block.empty() && block.front() == '\n') block.erase(block.begin());
    if (!block.empty()) prompts.push_back(block);
    if (blank == std::string::npos) break;
    start = blank + 2;
  }
  if (prompts.empty()) throw std::invalid_argument("--prompt " + prompt_arg + ": " + path + " holds no prompt");
  return prompts;
}

void RunStats::record_token(double seconds) {
  if (token_times.empty()) prefill_s = seconds;
  decode_s = seconds - prefill_s;
  token_times.push_back(seconds);
  ++generated_tokens;
}

std::string timeline_csv(const RunStats& stats) {
  std::ostringstream out;
  out << "tokens,seconds\n";
  for (size_t i = 0; i < stats.token_times.size(); ++i) out << (i + 1) << "," << stats.token_times[i] << "\n";
  return out.str();
}

std::string timeline_svg(const RunStats& stats, const std::string& title) {
  const double w = 640, h = 400, left = 60, bottom = 50, top = 40, right = 20;
  const double max_t = stats.token_times.empty() ? 1.0 : std::max(stats.token_times.back(), 1e-9);
  const double max_n = std::max<double>(1.0, static_cast<double>(stats.token_times.size()));
  auto x = [&](double n) { return left + (w - left - right) * n / max_n; };
  auto y = [&](double t) { return h - bottom - (h - bottom - top) * t / max_t; };
  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << w / 2 << "\" y=\"20\" text-anchor=\"middle\">" << title << "</text>\n"
      << "<line x1=\"" << left << "\" y1=\"" << h - bottom << "\" x2=\"" << w - right << "\" y2=\"" << h - bottom << "\" stroke=\"black\"/>\n"
      << "<line x1=\"" << left << "\" y1=\"" << top << "\" x2=\"" << left << "\" y2=\"" << h - bottom << "\" stroke=\"black\"/>\n"
      << "<text x=\"" << w / 2 << "\" y=\"" << h - 10 << "\" text-anchor=\"middle\">generated tokens (" << stats.token_times.size() << ")</text>\n"
      << "<text x=\"15\" y=\"" << h / 2 << "\" transform=\"rotate(-90 15 " << h / 2 << ")\" text-anchor=\"middle\">time (s), max "
      << max_t << "</text>\n<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"" << x(0) << "," << y(0);
  for (size_t i = 0; i < stats.token_times.size(); ++i) out << " " << x(double(i + 1)) << "," << y(stats.token_times[i]);
  out << "\"/>\n</svg>\n";
  return out.str();
}

double RunStats::tokens_per_s() const {
  const double total = prefill_s + decode_s;
  return total > 0 ? static_cast<double>(generated_tokens) / total : 0.0;
}

std::string sample_text(const Tokenizer& tokenizer, const std::vector<int64_t>& tokens) {
  // token by token, as it streamed: special tokens (BOS, stop) print nothing
  std::string text;
  int prev = tokenizer.bos_id();
  for (int64_t id : tokens) {
    text += tokenizer.token_bytes(prev, static_cast<int>(id));
    prev = static_cast<int>(id);
  }
  return text;
}

nlohmann::json results_json(const std::vector<SampleProgress>& samples, const Tokenizer& tokenizer, const RunStats& stats,
                            const nlohmann::json* extra_stats) {
  nlohmann::json out;
  out["samples"] = nlohmann::json::array();
  for (auto& s : samples)
    out["samples"].push_back({{"prompt", valid_utf8(s.prompt())},
                              {"prompt_tokens", s.prompt_tokens()},
                              {"tokens", s.tokens()},
                              {"text", valid_utf8(sample_text(tokenizer, s.tokens()))},
                              {"stop_reason", stop_reason_name(s.stop_reason())}});
  out["stats"] = {{"prefill_s", stats.prefill_s},
                  {"decode_s", stats.decode_s},
                  {"generated_tokens", stats.generated_tokens},
                  {"tokens_per_s", stats.tokens_per_s()},
                  {"token_times", stats.token_times}};
  if (extra_stats)
    for (auto& [k, v] : extra_stats->items()) out["stats"][k] = v;
  return out;
}

}  // namespace mdi
