#include "common/wire/tensor_frames.hpp"

#include <string>

#include "common/interp/interventions.hpp"

namespace mdi {

WireDType wire_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return WireDType::F32;
    case torch::kBFloat16: return WireDType::BF16;
    case torch::kFloat16: return WireDType::F16;
    default: throw std::invalid_argument(std::string("no wire dtype for ") + c10::toString(dtype));
  }
}

Frame activations_frame(uint32_t sample_id, uint32_t start_pos, const torch::Tensor& hidden) {
  auto cpu = hidden.contiguous().to(torch::kCPU);
  Frame frame = make_tensor_frame(FrameType::Activations, sample_id, start_pos, wire_dtype(cpu.scalar_type()),
                                  {static_cast<uint32_t>(cpu.size(0)), static_cast<uint32_t>(cpu.size(1))}, cpu.data_ptr(),
                                  static_cast<size_t>(cpu.numel()) * cpu.element_size());
  frame.header.n_tokens = static_cast<uint32_t>(cpu.size(0));
  return frame;
}

torch::Tensor activations_tensor(const Frame& frame, int64_t dim, torch::ScalarType dtype) {
  const auto& h = frame.header;
  if (h.ndim != 2 || h.shape[1] != dim || h.shape[0] != h.n_tokens || h.n_tokens == 0)
    throw ProtocolError("Activations frame of sample " + std::to_string(h.sample_id) + " has shape [" + std::to_string(h.shape[0]) +
                        ", " + std::to_string(h.shape[1]) + "] for " + std::to_string(h.n_tokens) + " tokens; expected [n_tokens, " +
                        std::to_string(dim) + "]");
  if (h.dtype != wire_dtype(dtype))
    throw ProtocolError(std::string("Activations frame carries ") + wire_dtype_name(h.dtype) + ", this node runs " + wire_dtype_name(wire_dtype(dtype)));
  // The frame outlives this view: the caller keeps it until the forward pass has read it.
  return torch::from_blob(const_cast<uint8_t*>(frame.payload.data()), {static_cast<int64_t>(h.n_tokens), dim}, dtype);
}

Frame activations_frame(const std::vector<BatchSegment>& segments, const torch::Tensor& rows) {
  if (segments.size() == 1) return activations_frame(segments[0].sample_id, segments[0].start_pos, rows);
  auto cpu = rows.contiguous().to(torch::kCPU);
  return make_activation_batch_frame(segments, wire_dtype(cpu.scalar_type()), static_cast<uint32_t>(cpu.size(1)), cpu.data_ptr(),
                                     static_cast<size_t>(cpu.numel()) * cpu.element_size());
}

ActivationRows activation_rows(const Frame& frame, int64_t dim, torch::ScalarType dtype, int64_t max_seq_len) {
  const auto& h = frame.header;
  if (h.type == FrameType::Activations) {
    if (h.start_pos + static_cast<int64_t>(h.n_tokens) > max_seq_len)
      throw ProtocolError("Activations frame of sample " + std::to_string(h.sample_id) + " reaches position " +
                          std::to_string(h.start_pos + h.n_tokens) + ", past the run's context length " + std::to_string(max_seq_len));
    return {{{h.sample_id, h.start_pos, h.n_tokens}}, activations_tensor(frame, dim, dtype)};
  }
  FrameLimits limits;
  limits.max_tokens = static_cast<uint32_t>(max_seq_len);
  auto segments = decode_batch_segments(frame, limits);
  if (h.shape[1] != dim)
    throw ProtocolError("ActivationBatch rows have " + std::to_string(h.shape[1]) + " columns; this model's hidden size is " +
                        std::to_string(dim));
  if (h.dtype != wire_dtype(dtype))
    throw ProtocolError(std::string("ActivationBatch frame carries ") + wire_dtype_name(h.dtype) + ", this node runs " +
                        wire_dtype_name(wire_dtype(dtype)));
  auto* rows = const_cast<uint8_t*>(frame.payload.data()) + batch_rows_offset(h);
  return {std::move(segments), torch::from_blob(rows, {static_cast<int64_t>(h.n_tokens), dim}, dtype)};
}

Frame capture_frame(uint32_t sample_id, int64_t layer, int64_t start_pos, const torch::Tensor& rows) {
  Frame frame = activations_frame(sample_id, static_cast<uint32_t>(start_pos), rows);
  frame.header.type = FrameType::Capture;
  frame.header.layer = layer == kEmbedLayer ? kEmbedWireLayer : static_cast<uint32_t>(layer);
  return frame;
}

CapturedRows captured_rows(const Frame& frame, int64_t dim, torch::ScalarType dtype) {
  const auto& h = frame.header;
  const int64_t layer = h.layer == kEmbedWireLayer ? kEmbedLayer : static_cast<int64_t>(h.layer);
  const std::string what = "Capture frame of sample " + std::to_string(h.sample_id) + " " + layer_label(layer);
  if (h.type != FrameType::Capture) throw ProtocolError(std::string("expected a Capture frame, got ") + frame_type_name(h.type));
  if (h.ndim != 2 || h.shape[1] != dim || h.shape[0] != h.n_tokens || h.n_tokens == 0)
    throw ProtocolError(what + " has shape [" + std::to_string(h.shape[0]) + ", " + std::to_string(h.shape[1]) + "] for " +
                        std::to_string(h.n_tokens) + " rows; expected [n_tokens, " + std::to_string(dim) + "]");
  if (h.dtype != wire_dtype(dtype))
    throw ProtocolError(what + " carries " + wire_dtype_name(h.dtype) + ", the run's dtype is " + wire_dtype_name(wire_dtype(dtype)));
  return {h.sample_id, layer, h.start_pos,
          torch::from_blob(const_cast<uint8_t*>(frame.payload.data()), {static_cast<int64_t>(h.n_tokens), dim}, dtype)};
}

}  // namespace mdi
