#pragma once
#include <torch/torch.h>

#include <vector>

namespace mdi {

// The keys and values one sample has produced in the layers a node holds.
// Grows with the sample's real length, in place: capacity grows in blocks, so
// a step appends without copying the whole cache.
class KvCache {
 public:
  KvCache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t max_len, torch::Device, torch::ScalarType);
  // Writes k, v: (n_kv_heads, T, head_dim) at positions [pos, pos + T) of `layer` (local index).
  void append(int64_t layer, int64_t pos, const torch::Tensor& k, const torch::Tensor& v);
  // Keys and values of positions [0, len): (n_kv_heads, len, head_dim).
  torch::Tensor keys(int64_t layer, int64_t len) const;
  torch::Tensor values(int64_t layer, int64_t len) const;
  int64_t capacity() const { return capacity_; }
  int64_t bytes() const;
  // Makes room for positions [0, len), growing every layer at once.
  void reserve(int64_t len);
  // The whole buffers of `layer`, (n_kv_heads, capacity, head_dim), for kernels that
  // write and read positions in place (after reserve()).
  const torch::Tensor& key_buffer(int64_t layer) const { return k_[layer]; }
  const torch::Tensor& value_buffer(int64_t layer) const { return v_[layer]; }

 private:
  void grow(int64_t needed);
  int64_t n_kv_heads_, head_dim_, max_len_, capacity_ = 0;
  torch::Device device_;
  torch::ScalarType dtype_;
  std::vector<torch::Tensor> k_, v_;  // per layer: (n_kv_heads, capacity, head_dim)
};

}  // namespace mdi
