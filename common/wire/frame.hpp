#pragma once
// Ring frames: a fixed 64-byte header followed by raw tensor bytes. Encoding and
// decoding only; common/net/link moves frames over sockets. docs/PROTOCOL.md is
// the full description and must change together with this file.
//
// Header, every field little-endian, encoded field by field (never a memcpy'd struct):
//
//   offset size field           notes
//   ------ ---- --------------- ------------------------------------------------------
//      0     4  magic           0x4649444D: the bytes "MDIF" on the wire
//      4     2  version         kProtocolVersion; any other value is rejected
//      6     2  type            FrameType
//      8     2  flags           application bits, passed through (version 1 defines none)
//     10     1  dtype           WireDType of the payload
//     11     1  ndim            0 (no tensor, empty payload) .. 4
//     12     4  sample_id       which sample (sequence) the frame belongs to
//     16     4  start_pos       position of the frame's first token in that sample
//     20     4  n_tokens        tokens in this frame
//     24     4  layer           global layer index (Capture/Intervention/Gradients), else 0
//     28    16  shape[4]        uint32 each; entries at index >= ndim are 0
//     44     4  segments        ActivationBatch: entries of the segment table opening the payload; else 0
//     48     8  step            monotonic per sender, for ordering and debugging
//     56     8  payload_bytes   = product(shape[:ndim]) * dtype size
//     64        payload         payload_bytes raw bytes, row-major, little-endian elements
//
// Hello payload (64 bytes): ring_index u32 | n_nodes u32 | run_id u64 | nonce 16 B | proof 32 B
// (the proof is HMAC-SHA256 under the ring's auth_token; docs/PROTOCOL.md, "Hello").
//
// ActivationBatch payload: `segments` entries of 16 bytes (sample_id u32 | start_pos u32 |
// n_tokens u32 | zero u32), then the rows of every segment in table order as the
// tensor `shape` [rows, dim] describes; payload_bytes = 16 * segments + the tensor's bytes.
#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace mdi {

inline constexpr uint32_t kFrameMagic = 0x4649444D;  // bytes 4D 44 49 46, "MDIF", once little-endian
// 2: ActivationBatch and the segments field; 3: Hello carries a nonce and an HMAC proof
inline constexpr uint16_t kProtocolVersion = 3;
inline constexpr size_t kFrameHeaderBytes = 64;
inline constexpr size_t kMaxFrameDims = 4;
// The header `layer` of a Capture frame of the embedding output.
inline constexpr uint32_t kEmbedWireLayer = 0xFFFFFFFFu;

enum class FrameType : uint16_t {
  Hello = 1,          // first frame in each direction of a ring connection
  Activations = 2,    // hidden states travelling forward
  SampleStop = 3,     // a sample finished: free its state (no payload)
  RunStop = 4,        // the run is over; the last frame a link carries (no payload)
  Heartbeat = 5,      // sent by an idle link, consumed by the receiving link (no payload)
  Capture = 6,        // reserved: hidden states of a layer sent back to the starter (interpretability)
  Intervention = 7,   // reserved
  Gradients = 8,      // reserved: backward pass (fine-tuning), travels the ring in reverse over the same sockets
  ControlScalar = 9,  // reserved: small control values (e.g. squared grad norms)
  ActivationBatch = 10,  // hidden states of several samples (a micro-batch), one segment each
  Count
};
// Ids are on the wire: they never move.
static_assert(static_cast<uint16_t>(FrameType::Hello) == 1 && static_cast<uint16_t>(FrameType::Activations) == 2 &&
              static_cast<uint16_t>(FrameType::SampleStop) == 3 && static_cast<uint16_t>(FrameType::RunStop) == 4 &&
              static_cast<uint16_t>(FrameType::Heartbeat) == 5 && static_cast<uint16_t>(FrameType::Capture) == 6 &&
              static_cast<uint16_t>(FrameType::Intervention) == 7 && static_cast<uint16_t>(FrameType::Gradients) == 8 &&
              static_cast<uint16_t>(FrameType::ControlScalar) == 9 &&
              static_cast<uint16_t>(FrameType::ActivationBatch) == 10 && static_cast<uint16_t>(FrameType::Count) == 11);

enum class WireDType : uint8_t { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, I64 = 4, U8 = 5, Count };
static_assert(static_cast<uint8_t>(WireDType::F32) == 0 && static_cast<uint8_t>(WireDType::BF16) == 1 &&
              static_cast<uint8_t>(WireDType::F16) == 2 && static_cast<uint8_t>(WireDType::I32) == 3 &&
              static_cast<uint8_t>(WireDType::I64) == 4 && static_cast<uint8_t>(WireDType::U8) == 5 &&
              static_cast<uint8_t>(WireDType::Count) == 6);

size_t wire_dtype_size(WireDType dtype);       // throws std::invalid_argument for Count or beyond
const char* wire_dtype_name(WireDType dtype);  // "F32", ...; "unknown" out of range
const char* frame_type_name(FrameType type);   // "Activations", ...; "unknown" out of range

struct FrameHeader {
  FrameType type = FrameType::Activations;
  uint16_t flags = 0;
  uint32_t sample_id = 0;  // which sample (sequence) this belongs to
  uint32_t start_pos = 0;  // position of the first token in the sample's sequence
  uint32_t n_tokens = 0;   // tokens in this frame
  uint32_t layer = 0;      // capture/intervention/gradient: global layer index; else 0
  uint64_t step = 0;       // monotonic per sender, for ordering/debugging
  WireDType dtype = WireDType::F32;
  uint8_t ndim = 0;
  std::array<uint32_t, kMaxFrameDims> shape{};
  uint32_t segments = 0;  // ActivationBatch: entries of its segment table; else 0
  uint64_t payload_bytes = 0;
};

struct Frame {
  FrameHeader header;
  std::vector<uint8_t> payload;  // header.payload_bytes raw bytes
};

// Caps checked before a receiver allocates anything a peer asked for.
struct FrameLimits {
  uint64_t max_payload_bytes = 1ull << 30;
  uint32_t max_tokens = 1 << 20;  // longest sequence a frame may refer to: start_pos + n_tokens
  const char* payload_limit_source = "max_frame_bytes";  // what set max_payload_bytes, for the error
};

// The largest payload an inference run's frames need, so that a header claiming more is
// refused before anything is allocated: rows of `dim` elements of the widest activation
// dtype (F32), plus an ActivationBatch segment entry per row at most. A frame carries
// a micro-batch of up to `batch_rows` rows, or one longer sample (a prompt of at most
// max_seq_len tokens) alone; Capture frames carry the same rows.
uint64_t inference_payload_cap(uint64_t dim, uint64_t max_seq_len, uint64_t batch_rows);
// The same for a training run, whose frames carry one micro-batch's activations or
// gradients, `rows` = sequences per micro-batch x seq_len, in float32.
uint64_t training_payload_cap(uint64_t dim, uint64_t rows);

struct ProtocolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void encode_header(const FrameHeader& header, uint8_t out[kFrameHeaderBytes]);
// Validates every field before anyone allocates: magic, version, type, dtype, ndim,
// unused shape entries, tokens against limits.max_tokens, payload size against the
// shape (overflow-safe) and limits.max_payload_bytes, the per-type payload rules
// (no payload for SampleStop/RunStop/Heartbeat, a HelloInfo for Hello, segments only
// in an ActivationBatch). Throws ProtocolError naming the field, its value and the limit.
FrameHeader decode_header(const uint8_t in[kFrameHeaderBytes], const FrameLimits& limits);

// A frame carrying a copy of `bytes` bytes at `data`, laid out as `shape` of `dtype`
// (at most kMaxFrameDims dims). n_tokens is left 0; set it when the frame has a
// token axis. Throws std::invalid_argument when `bytes` does not match the shape.
Frame make_tensor_frame(FrameType type, uint32_t sample_id, uint32_t start_pos, WireDType dtype,
                        std::vector<uint32_t> shape, const void* data, size_t bytes);
// SampleStop, RunStop or Heartbeat: no payload. Throws std::invalid_argument for other types.
Frame make_control_frame(FrameType type, uint32_t sample_id = 0);

// One sample's rows in an ActivationBatch frame.
struct BatchSegment {
  uint32_t sample_id = 0;
  uint32_t start_pos = 0;
  uint32_t n_tokens = 0;
  bool operator==(const BatchSegment& o) const {
    return sample_id == o.sample_id && start_pos == o.start_pos && n_tokens == o.n_tokens;
  }
};
inline constexpr size_t kBatchSegmentBytes = 16;

// An ActivationBatch frame of `segments` (at least one) and their rows: `rows_bytes`
// bytes at `rows`, a [sum of n_tokens, dim] tensor of `dtype`. Throws std::invalid_argument
// when the bytes do not match.
Frame make_activation_batch_frame(const std::vector<BatchSegment>& segments, WireDType dtype, uint32_t dim, const void* rows,
                                  size_t rows_bytes);
// The segment table of an ActivationBatch frame whose header decode_header() accepted.
// Checks every entry: at least one token, positions within limits.max_tokens, the
// tokens adding up to the header's, each sample once, the zero word zero. Throws ProtocolError.
std::vector<BatchSegment> decode_batch_segments(const Frame& frame, const FrameLimits& limits);
// Where the rows start in an ActivationBatch payload.
inline size_t batch_rows_offset(const FrameHeader& header) { return kBatchSegmentBytes * header.segments; }

// What each end of a ring connection says first.
inline constexpr size_t kHelloNonceBytes = 16, kHelloProofBytes = 32;
using HelloNonce = std::array<uint8_t, kHelloNonceBytes>;
using HelloProof = std::array<uint8_t, kHelloProofBytes>;
struct HelloInfo {
  uint32_t ring_index = 0;  // the sender's position in the ring (0 = starter)
  uint32_t n_nodes = 0;
  uint64_t run_id = 0;  // chosen by the starter for one run; a stale peer's differs
  HelloNonce nonce{};   // the sender's, fresh for each connection: the other end's proof covers it
  HelloProof proof{};   // zero in a connection's first Hello, which answers no nonce yet
};
inline constexpr size_t kHelloPayloadBytes = 16 + kHelloNonceBytes + kHelloProofBytes;
Frame make_hello_frame(const HelloInfo& hello);
// Throws ProtocolError if `frame` is not a well-formed Hello.
HelloInfo decode_hello(const Frame& frame);

}  // namespace mdi
