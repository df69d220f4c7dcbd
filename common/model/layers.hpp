#pragma once
// Which layers a node holds, without tensors: the interventions spec, the layer
// split and the /init body name layers with these, and need no LibTorch for it.
#include <cstdint>

namespace mdi {

// Layers are numbered globally, 0 .. n_layers-1, whichever node holds them. The
// output of the token embedding is layer kEmbedLayer ("embed").
inline constexpr int64_t kEmbedLayer = -1;

// Half-open range [begin, end) of global layer indices.
struct LayerRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool contains(int64_t layer) const { return layer >= begin && layer < end; }
  bool operator==(const LayerRange& o) const { return begin == o.begin && end == o.end; }
};

// What one node holds.
struct ChunkSpec {
  LayerRange layers;
  bool embedding = false;  // token ids in
  bool head = false;       // final norm + LM head: logits out
};

}  // namespace mdi
