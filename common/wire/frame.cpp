#include "common/wire/frame.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

namespace mdi {
namespace {

// Header field offsets; the table in frame.hpp is the reference.
constexpr size_t kOffMagic = 0, kOffVersion = 4, kOffType = 6, kOffFlags = 8, kOffDType = 10, kOffNDim = 11,
                 kOffSampleId = 12, kOffStartPos = 16, kOffNTokens = 20, kOffLayer = 24, kOffShape = 28,
                 kOffSegments = 44, kOffStep = 48, kOffPayloadBytes = 56;
static_assert(kOffShape + 4 * kMaxFrameDims == kOffSegments && kOffPayloadBytes + 8 == kFrameHeaderBytes);

template <class T>
void put_le(uint8_t* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * i));
}

template <class T>
T get_le(const uint8_t* in) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<uint64_t>(in[i]) << (8 * i);
  return static_cast<T>(value);
}

std::string hex(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08X", static_cast<unsigned>(value));
  return text;
}

[[noreturn]] void reject(const std::string& field, const std::string& problem) {
  throw ProtocolError("frame " + field + " " + problem);
}

bool is_control_type(FrameType type) {
  return type == FrameType::SampleStop || type == FrameType::RunStop || type == FrameType::Heartbeat;
}

// Bytes of a `dtype` tensor of `shape`, or false when the product overflows 64 bits.
bool tensor_bytes(WireDType dtype, const uint32_t* shape, size_t ndim, uint64_t& bytes) {
  bytes = wire_dtype_size(dtype);
  for (size_t d = 0; d < ndim; ++d) {
    if (shape[d] != 0 && bytes > std::numeric_limits<uint64_t>::max() / shape[d]) return false;
    bytes *= shape[d];
  }
  return true;
}

}  // namespace

size_t wire_dtype_size(WireDType dtype) {
  switch (dtype) {
    case WireDType::F32: return 4;
    case WireDType::BF16: return 2;
    case WireDType::F16: return 2;
    case WireDType::I32: return 4;
    case WireDType::I64: return 8;
    case WireDType::U8: return 1;
    case WireDType::Count: break;
  }
  throw std::invalid_argument("unknown wire dtype " + std::to_string(static_cast<int>(dtype)));
}

const char* wire_dtype_name(WireDType dtype) {
  switch (dtype) {
    case WireDType::F32: return "F32";
    case WireDType::BF16: return "BF16";
    case WireDType::F16: return "F16";
    case WireDType::I32: return "I32";
    case WireDType::I64: return "I64";
    case WireDType::U8: return "U8";
    case WireDType::Count: break;
  }
  return "unknown";
}

const char* frame_type_name(FrameType type) {
  switch (type) {
    case FrameType::Hello: return "Hello";
    case FrameType::Activations: return "Activations";
    case FrameType::SampleStop: return "SampleStop";
    case FrameType::RunStop: return "RunStop";
    case FrameType::Heartbeat: return "Heartbeat";
    case FrameType::Capture: return "Capture";
    case FrameType::Intervention: return "Intervention";
    case FrameType::Gradients: return "Gradients";
    case FrameType::ControlScalar: return "ControlScalar";
    case FrameType::ActivationBatch: return "ActivationBatch";
    case FrameType::Count: break;
  }
  return "unknown";
}

void encode_header(const FrameHeader& h, uint8_t out[kFrameHeaderBytes]) {
  std::memset(out, 0, kFrameHeaderBytes);
  put_le<uint32_t>(out + kOffMagic, kFrameMagic);
  put_le<uint16_t>(out + kOffVersion, kProtocolVersion);
  put_le<uint16_t>(out + kOffType, static_cast<uint16_t>(h.type));
  put_le<uint16_t>(out + kOffFlags, h.flags);
  put_le<uint8_t>(out + kOffDType, static_cast<uint8_t>(h.dtype));
  put_le<uint8_t>(out + kOffNDim, h.ndim);
  put_le<uint32_t>(out + kOffSampleId, h.sample_id);
  put_le<uint32_t>(out + kOffStartPos, h.start_pos);
  put_le<uint32_t>(out + kOffNTokens, h.n_tokens);
  put_le<uint32_t>(out + kOffLayer, h.layer);
  for (size_t d = 0; d < kMaxFrameDims; ++d) put_le<uint32_t>(out + kOffShape + 4 * d, h.shape[d]);
  put_le<uint32_t>(out + kOffSegments, h.segments);
  put_le<uint64_t>(out + kOffStep, h.step);
  put_le<uint64_t>(out + kOffPayloadBytes, h.payload_bytes);
}

FrameHeader decode_header(const uint8_t in[kFrameHeaderBytes], const FrameLimits& limits) {
  const uint32_t magic = get_le<uint32_t>(in + kOffMagic);
  if (magic != kFrameMagic)
    reject("magic", hex(magic) + " is not " + hex(kFrameMagic) + " (\"MDIF\"): not an MDI frame");
  const uint16_t version = get_le<uint16_t>(in + kOffVersion);
  if (version != kProtocolVersion)
    reject("version", "is " + std::to_string(version) + " but this build speaks protocol version " +
                          std::to_string(kProtocolVersion) + "; run the same release on every node");

  FrameHeader h;
  const uint16_t type = get_le<uint16_t>(in + kOffType);
  if (type == 0 || type >= static_cast<uint16_t>(FrameType::Count))
    reject("type", std::to_string(type) + " is unknown (known: 1.." +
                       std::to_string(static_cast<uint16_t>(FrameType::Count) - 1) + ")");
  h.type = static_cast<FrameType>(type);
  h.flags = get_le<uint16_t>(in + kOffFlags);
  const uint8_t dtype = in[kOffDType];
  if (dtype >= static_cast<uint8_t>(WireDType::Count))
    reject("dtype", std::to_string(dtype) + " is unknown (known: 0.." +
                        std::to_string(static_cast<uint8_t>(WireDType::Count) - 1) + ")");
  h.dtype = static_cast<WireDType>(dtype);
  h.ndim = in[kOffNDim];
  if (h.ndim > kMaxFrameDims)
    reject("ndim", std::to_string(h.ndim) + " exceeds the limit " + std::to_string(kMaxFrameDims));
  h.sample_id = get_le<uint32_t>(in + kOffSampleId);
  h.start_pos = get_le<uint32_t>(in + kOffStartPos);
  h.n_tokens = get_le<uint32_t>(in + kOffNTokens);
  h.layer = get_le<uint32_t>(in + kOffLayer);
  for (size_t d = 0; d < kMaxFrameDims; ++d) {
    h.shape[d] = get_le<uint32_t>(in + kOffShape + 4 * d);
    if (d >= h.ndim && h.shape[d] != 0)
      reject("shape[" + std::to_string(d) + "]",
             "is " + std::to_string(h.shape[d]) + " but ndim is " + std::to_string(h.ndim) + "; unused dims must be 0");
  }
  h.segments = get_le<uint32_t>(in + kOffSegments);
  const bool batch = h.type == FrameType::ActivationBatch;
  if (!batch && h.segments != 0)
    reject("segments", "is " + std::to_string(h.segments) + " in a " + frame_type_name(h.type) +
                           " frame; only ActivationBatch frames have segments");
  if (batch && (h.ndim != 2 || h.segments == 0 || h.segments > h.n_tokens || h.shape[0] != h.n_tokens))
    reject("segments", std::to_string(h.segments) + " with ndim " + std::to_string(h.ndim) + ", shape[0] " +
                           std::to_string(h.shape[0]) + " and n_tokens " + std::to_string(h.n_tokens) +
                           ": an ActivationBatch holds 1..n_tokens segments and a [n_tokens, dim] tensor");
  h.step = get_le<uint64_t>(in + kOffStep);
  h.payload_bytes = get_le<uint64_t>(in + kOffPayloadBytes);

  if (h.n_tokens > limits.max_tokens)
    reject("n_tokens", std::to_string(h.n_tokens) + " exceeds the limit " + std::to_string(limits.max_tokens));
  if (h.start_pos > limits.max_tokens - h.n_tokens)
    reject("start_pos", std::to_string(h.start_pos) + " + n_tokens " + std::to_string(h.n_tokens) +
                            " exceeds the sequence limit " + std::to_string(limits.max_tokens));
  if (h.payload_bytes > limits.max_payload_bytes)
    reject("payload_bytes", std::to_string(h.payload_bytes) + " exceeds the limit " +
                                std::to_string(limits.max_payload_bytes) + " (" + limits.payload_limit_source + ")");
  if (h.ndim == 0) {
    if (h.payload_bytes != 0)
      reject("payload_bytes", std::to_string(h.payload_bytes) + " must be 0 when ndim is 0 (no tensor)");
  } else {
    uint64_t expected = 0;
    if (!tensor_bytes(h.dtype, h.shape.data(), h.ndim, expected) ||
        expected > std::numeric_limits<uint64_t>::max() - batch_rows_offset(h))
      reject("shape", "product times the " + std::string(wire_dtype_name(h.dtype)) + " size overflows 64 bits");
    expected += batch_rows_offset(h);  // segments are at most n_tokens, itself capped above
    if (expected != h.payload_bytes)
      reject("payload_bytes", std::to_string(h.payload_bytes) + " does not match " + (batch ? "the segment table + " : "") +
                                  "shape x " + wire_dtype_name(h.dtype) + " = " + std::to_string(expected) + " bytes");
  }
  if (is_control_type(h.type) && h.ndim != 0)
    reject("ndim", std::to_string(h.ndim) + " must be 0 for a " + frame_type_name(h.type) + " frame (no payload)");
  if (h.type == FrameType::Hello && (h.dtype != WireDType::U8 || h.payload_bytes != kHelloPayloadBytes))
    reject("payload_bytes", std::to_string(h.payload_bytes) + " " + wire_dtype_name(h.dtype) +
                                " does not hold a Hello (" + std::to_string(kHelloPayloadBytes) + " U8 bytes)");
  return h;
}

uint64_t inference_payload_cap(uint64_t dim, uint64_t max_seq_len, uint64_t batch_rows) {
  const uint64_t rows = std::max(max_seq_len, batch_rows);
  return rows * (dim * wire_dtype_size(WireDType::F32) + kBatchSegmentBytes);
}

uint64_t training_payload_cap(uint64_t dim, uint64_t rows) { return rows * dim * wire_dtype_size(WireDType::F32); }

Frame make_tensor_frame(FrameType type, uint32_t sample_id, uint32_t start_pos, WireDType dtype,
                        std::vector<uint32_t> shape, const void* data, size_t bytes) {
  if (shape.empty() || shape.size() > kMaxFrameDims)
    throw std::invalid_argument("make_tensor_frame: a tensor needs 1.." + std::to_string(kMaxFrameDims) +
                                " dims, got " + std::to_string(shape.size()));
  uint64_t expected = 0;
  if (!tensor_bytes(dtype, shape.data(), shape.size(), expected) || expected != bytes)
    throw std::invalid_argument("make_tensor_frame: " + std::to_string(bytes) + " bytes do not hold the " +
                                wire_dtype_name(dtype) + " shape given");
  Frame frame;
  frame.header.type = type;
  frame.header.sample_id = sample_id;
  frame.header.start_pos = start_pos;
  frame.header.dtype = dtype;
  frame.header.ndim = static_cast<uint8_t>(shape.size());
  std::copy(shape.begin(), shape.end(), frame.header.shape.begin());
  frame.header.payload_bytes = bytes;
  const auto* first = static_cast<const uint8_t*>(data);
  frame.payload.assign(first, first + bytes);
  return frame;
}

Frame make_activation_batch_frame(const std::vector<BatchSegment>& segments, WireDType dtype, uint32_t dim, const void* rows,
                                  size_t rows_bytes) {
  uint64_t n_rows = 0;
  for (const BatchSegment& s : segments) n_rows += s.n_tokens;
  if (segments.empty() || n_rows > std::numeric_limits<uint32_t>::max() ||
      rows_bytes != n_rows * dim * wire_dtype_size(dtype))
    throw std::invalid_argument("make_activation_batch_frame: " + std::to_string(rows_bytes) + " bytes do not hold " +
                                std::to_string(n_rows) + " rows of " + std::to_string(dim) + " " + wire_dtype_name(dtype) +
                                " in " + std::to_string(segments.size()) + " segments");
  Frame frame;
  FrameHeader& h = frame.header;
  h.type = FrameType::ActivationBatch;
  h.dtype = dtype;
  h.ndim = 2;
  h.shape = {static_cast<uint32_t>(n_rows), dim, 0, 0};
  h.n_tokens = static_cast<uint32_t>(n_rows);
  h.segments = static_cast<uint32_t>(segments.size());
  h.payload_bytes = batch_rows_offset(h) + rows_bytes;
  frame.payload.resize(h.payload_bytes);
  uint8_t* entry = frame.payload.data();
  for (const BatchSegment& s : segments) {
    put_le<uint32_t>(entry + 0, s.sample_id);
    put_le<uint32_t>(entry + 4, s.start_pos);
    put_le<uint32_t>(entry + 8, s.n_tokens);
    put_le<uint32_t>(entry + 12, 0);
    entry += kBatchSegmentBytes;
  }
  std::memcpy(entry, rows, rows_bytes);
  return frame;
}

std::vector<BatchSegment> decode_batch_segments(const Frame& frame, const FrameLimits& limits) {
  const FrameHeader& h = frame.header;
  if (h.type != FrameType::ActivationBatch || frame.payload.size() < batch_rows_offset(h))
    throw ProtocolError(std::string("expected an ActivationBatch frame with its segment table, got ") + frame_type_name(h.type));
  std::vector<BatchSegment> segments(h.segments);
  uint64_t rows = 0;
  for (uint32_t i = 0; i < h.segments; ++i) {
    const uint8_t* entry = frame.payload.data() + i * kBatchSegmentBytes;
    BatchSegment& s = segments[i];
    s = {get_le<uint32_t>(entry), get_le<uint32_t>(entry + 4), get_le<uint32_t>(entry + 8)};
    const std::string what = "ActivationBatch segment " + std::to_string(i) + " (sample " + std::to_string(s.sample_id) + ")";
    if (get_le<uint32_t>(entry + 12) != 0) throw ProtocolError(what + ": its bytes 12..15 must be zero");
    if (s.n_tokens == 0 || s.n_tokens > limits.max_tokens || s.start_pos > limits.max_tokens - s.n_tokens)
      throw ProtocolError(what + ": start_pos " + std::to_string(s.start_pos) + " and n_tokens " + std::to_string(s.n_tokens) +
                          " must name 1 or more positions below " + std::to_string(limits.max_tokens));
    rows += s.n_tokens;
  }
  std::vector<uint32_t> ids;
  for (const BatchSegment& s : segments) ids.push_back(s.sample_id);
  std::sort(ids.begin(), ids.end());
  if (auto twice = std::adjacent_find(ids.begin(), ids.end()); twice != ids.end())
    throw ProtocolError("ActivationBatch has two segments of sample " + std::to_string(*twice));
  if (rows != h.n_tokens)
    throw ProtocolError("ActivationBatch segments hold " + std::to_string(rows) + " tokens, the header says " +
                        std::to_string(h.n_tokens));
  return segments;
}

Frame make_control_frame(FrameType type, uint32_t sample_id) {
  if (!is_control_type(type))
    throw std::invalid_argument(std::string("make_control_frame: ") + frame_type_name(type) +
                                " is not a control frame (SampleStop, RunStop, Heartbeat)");
  Frame frame;
  frame.header.type = type;
  frame.header.sample_id = sample_id;
  return frame;
}

Frame make_hello_frame(const HelloInfo& hello) {
  uint8_t payload[kHelloPayloadBytes];
  put_le<uint32_t>(payload + 0, hello.ring_index);
  put_le<uint32_t>(payload + 4, hello.n_nodes);
  put_le<uint64_t>(payload + 8, hello.run_id);
  std::copy(hello.nonce.begin(), hello.nonce.end(), payload + 16);
  std::copy(hello.proof.begin(), hello.proof.end(), payload + 16 + kHelloNonceBytes);
  return make_tensor_frame(FrameType::Hello, 0, 0, WireDType::U8, {static_cast<uint32_t>(kHelloPayloadBytes)}, payload,
                           sizeof payload);
}

HelloInfo decode_hello(const Frame& frame) {
  if (frame.header.type != FrameType::Hello)
    throw ProtocolError(std::string("expected a Hello frame, got ") + frame_type_name(frame.header.type));
  if (frame.payload.size() != kHelloPayloadBytes)
    throw ProtocolError("Hello payload is " + std::to_string(frame.payload.size()) + " bytes, expected " +
                        std::to_string(kHelloPayloadBytes));
  HelloInfo hello;
  hello.ring_index = get_le<uint32_t>(frame.payload.data() + 0);
  hello.n_nodes = get_le<uint32_t>(frame.payload.data() + 4);
  hello.run_id = get_le<uint64_t>(frame.payload.data() + 8);
  std::copy_n(frame.payload.data() + 16, kHelloNonceBytes, hello.nonce.begin());
  std::copy_n(frame.payload.data() + 16 + kHelloNonceBytes, kHelloProofBytes, hello.proof.begin());
  return hello;
}

}  // namespace mdi
