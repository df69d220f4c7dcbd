#pragma once
// Pair merging, shared by run.c-style and Hugging Face BPE (private to the tokenizers).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <queue>
#include <vector>

namespace mdi::tokenizer_detail {

struct Merge {
  float priority;  // lower merges first
  int merged_id;
};

// Merges adjacent symbols until no pair has a merge, best priority first and
// the leftmost pair on ties: the order of both run.c (highest score) and HF
// BPE (lowest rank). A heap over a linked list makes this O(n log n) where
// rescanning every pair after each merge, as run.c does, is O(n^2).
template <typename FindMerge>  // std::optional<Merge>(int left_id, int right_id)
std::vector<int> merge_symbols(std::vector<int> ids, const FindMerge& find_merge) {
  struct Candidate {
    Merge merge;
    size_t left, right;  // positions in `ids`
    int left_id, right_id;
  };
  auto merges_later = [](const Candidate& a, const Candidate& b) {
    return a.merge.priority != b.merge.priority ? a.merge.priority > b.merge.priority : a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(merges_later)> candidates(merges_later);
  constexpr size_t kNone = SIZE_MAX;
  const size_t n = ids.size();
  std::vector<size_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = i == 0 ? kNone : i - 1;
    next[i] = i + 1 == n ? kNone : i + 1;
  }
  auto consider = [&](size_t left, size_t right) {
    if (auto merge = find_merge(ids[left], ids[right])) candidates.push({*merge, left, right, ids[left], ids[right]});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);

  while (!candidates.empty()) {
    const Candidate c = candidates.top();
    candidates.pop();
    // A merge since this candidate was queued may have consumed or grown either side.
    if (!alive[c.left] || next[c.left] != c.right || ids[c.left] != c.left_id || ids[c.right] != c.right_id) continue;
    ids[c.left] = c.merge.merged_id;
    alive[c.right] = false;
    next[c.left] = next[c.right];
    if (next[c.right] != kNone) prev[next[c.right]] = c.left;
    if (prev[c.left] != kNone) consider(prev[c.left], c.left);
    if (next[c.left] != kNone) consider(c.left, next[c.left]);
  }
  std::vector<int> merged;
  for (size_t i = 0; i < n; ++i) {
    if (alive[i]) merged.push_back(ids[i]);
  }
  return merged;
}

}  // namespace mdi::tokenizer_detail
