#include "common/model/kv_cache.hpp"

#include <algorithm>

namespace mdi {

namespace {
// Cache capacity grows in blocks of this many positions (or doubles, whichever
// is more), so appends rarely reallocate and short samples stay small.
constexpr int64_t kCacheBlock = 256;
}  // namespace

KvCache::KvCache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t max_len, torch::Device device,
                 torch::ScalarType dtype)
    : n_kv_heads_(n_kv_heads), head_dim_(head_dim), max_len_(max_len), device_(device), dtype_(dtype),
      k_(n_layers), v_(n_layers) {}

void KvCache::grow(int64_t needed) {
  int64_t capacity = std::min(max_len_, std::max({needed, capacity_ * 2, capacity_ + kCacheBlock}));
  auto options = torch::TensorOptions().device(device_).dtype(dtype_);
  for (size_t l = 0; l < k_.size(); ++l) {
    auto k = torch::empty({n_kv_heads_, capacity, head_dim_}, options);
    auto v = torch::empty({n_kv_heads_, capacity, head_dim_}, options);
    if (capacity_ > 0) {
      k.narrow(1, 0, capacity_).copy_(k_[l]);
      v.narrow(1, 0, capacity_).copy_(v_[l]);
    }
    k_[l] = k;
    v_[l] = v;
  }
  capacity_ = capacity;
}

void KvCache::reserve(int64_t len) {
  if (len > capacity_) grow(len);
}

void KvCache::append(int64_t layer, int64_t pos, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t T = k.size(1);
  reserve(pos + T);
  k_[layer].narrow(1, pos, T).copy_(k);
  v_[layer].narrow(1, pos, T).copy_(v);
}

torch::Tensor KvCache::keys(int64_t layer, int64_t len) const { return k_[layer].narrow(1, 0, len); }
torch::Tensor KvCache::values(int64_t layer, int64_t len) const { return v_[layer].narrow(1, 0, len); }

int64_t KvCache::bytes() const {
  return 2 * static_cast<int64_t>(k_.size()) * n_kv_heads_ * capacity_ * head_dim_ * torch::elementSize(dtype_);
}

}  // namespace mdi
