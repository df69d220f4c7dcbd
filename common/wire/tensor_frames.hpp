#pragma once
// Tensors as ring frames and back: hidden states (Activations, ActivationBatch) and
// captured rows (Capture), as raw bytes of the tensor's own dtype. Every frame is
// checked against the model (hidden size, dtype, context length) before its bytes
// are viewed as a tensor. common/wire/frame.hpp is the byte layout.
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "common/model/layers.hpp"
#include "common/wire/frame.hpp"

namespace mdi {

// The wire dtype of a tensor's dtype; std::invalid_argument for a dtype frames do not carry.
WireDType wire_dtype(torch::ScalarType dtype);

// Hidden states as a frame payload (raw bytes of the tensor's own dtype), and back.
Frame activations_frame(uint32_t sample_id, uint32_t start_pos, const torch::Tensor& hidden);
// Checks the frame against the model (dim, dtype) before viewing its bytes.
torch::Tensor activations_tensor(const Frame& frame, int64_t dim, torch::ScalarType dtype);

// A micro-batch's hidden states (rows, dim), the segments in row order: an Activations
// frame when there is one segment, else an ActivationBatch.
Frame activations_frame(const std::vector<BatchSegment>& segments, const torch::Tensor& rows);
struct ActivationRows {
  std::vector<BatchSegment> segments;
  torch::Tensor rows;  // (tokens, dim), viewing the frame's payload
};
// Either kind of frame, checked against the model: dim, dtype, and positions below max_seq_len.
ActivationRows activation_rows(const Frame& frame, int64_t dim, torch::ScalarType dtype, int64_t max_seq_len);

// Captured rows (rows, dim) as a Capture frame: header layer = global layer
// (kEmbedWireLayer for the embedding), start_pos = position of the first row,
// n_tokens = rows. And back, checked against the model (dim, dtype).
Frame capture_frame(uint32_t sample_id, int64_t layer, int64_t start_pos, const torch::Tensor& rows);
struct CapturedRows {
  uint32_t sample_id;
  int64_t layer;  // global, or kEmbedLayer
  int64_t start_pos;
  torch::Tensor rows;  // (rows, dim), viewing the frame's payload
};
CapturedRows captured_rows(const Frame& frame, int64_t dim, torch::ScalarType dtype);

}  // namespace mdi
