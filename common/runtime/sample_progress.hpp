#pragma once
// A sample's life during generation, the same in standalone and distributed
// runs: its tokens so far, its own sampler, and why it stopped. Also the
// prompt list and the --out JSON, which both modes share.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/model/model_config.hpp"
#include "common/model/sampling.hpp"

namespace mdi {

class Tokenizer;

// interrupted: SIGINT or SIGTERM; failed: the run broke (a node, a link, an error) before the sample's own stop.
enum class StopReason { running, eos, length, context, non_finite_logits, interrupted, failed };
const char* stop_reason_name(StopReason reason);

class SampleProgress {
 public:
  SampleProgress(int64_t index, std::string prompt, std::vector<int64_t> prompt_tokens, int64_t max_new_tokens,
                 Sampler sampler, const ModelConfig& config);

  // Chooses the next token from the logits of the last position; returns it,
  // or nullopt where the logits hold a NaN or an infinity (the sample stops
  // with non_finite_logits). Afterwards stop_reason() says whether it goes on.
  std::optional<int64_t> advance(const float* logits, int64_t vocab);

  // The run ends before this sample's own stop: it keeps its tokens so far. A sample already stopped keeps its reason.
  void end_early(StopReason why) {
    if (running()) stop_ = why;
  }

  bool running() const { return stop_ == StopReason::running; }
  StopReason stop_reason() const { return stop_; }
  int64_t index() const { return index_; }
  const std::string& prompt() const { return prompt_; }
  const std::vector<int64_t>& prompt_tokens() const { return prompt_tokens_; }
  const std::vector<int64_t>& tokens() const { return tokens_; }
  int64_t generated() const { return static_cast<int64_t>(tokens_.size() - prompt_tokens_.size()); }
  // Tokens the next forward pass consumes, and the position of the first of them.
  std::vector<int64_t> pending_input() const;
  int64_t pending_count() const { return static_cast<int64_t>(tokens_.size()) - fed_; }
  int64_t pending_pos() const { return fed_; }
  void mark_fed() { fed_ = static_cast<int64_t>(tokens_.size()); }

 private:
  int64_t index_;
  std::string prompt_;
  std::vector<int64_t> prompt_tokens_, tokens_;
  int64_t max_new_tokens_, max_seq_len_, fed_ = 0;
  Sampler sampler_;
  const ModelConfig* config_;
  StopReason stop_ = StopReason::running;
};

// --prompt: literal text, or FILE:path holding one prompt per paragraph (blocks
// separated by blank lines, trailing newline dropped), as MDI-LLM reads it.
// Samples cycle over the prompts. Throws std::invalid_argument naming the file.
std::vector<std::string> read_prompts(const std::string& prompt_arg);

struct RunStats {
  double prefill_s = 0;  // from the start until the first token
  double decode_s = 0;   // from the first token until the last
  int64_t generated_tokens = 0;
  std::vector<double> token_times;  // seconds since the start at each generated token, in order
  double tokens_per_s() const;
  void record_token(double seconds_since_start);
};

// The time-vs-tokens CSV of MDI-LLM's plots: "tokens,seconds" per generated token.
std::string timeline_csv(const RunStats& stats);
// The same as an SVG line plot.
std::string timeline_svg(const RunStats& stats, const std::string& title);

// The full text of a sample's tokens, as it streamed (special tokens print nothing).
std::string sample_text(const Tokenizer& tokenizer, const std::vector<int64_t>& tokens);

// {"samples": [...], "stats": {...}}; `extra_stats` (e.g. per-node figures) is merged into "stats".
nlohmann::json results_json(const std::vector<SampleProgress>& samples, const Tokenizer& tokenizer, const RunStats& stats,
                            const nlohmann::json* extra_stats = nullptr);

}  // namespace mdi
