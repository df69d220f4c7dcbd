// libFuzzer target: the ring frame decoder (common/wire/frame.cpp), driven as a receiver
// drives it (common/net/link.cpp read_frame): the first 64 input bytes are the
// header, the rest is what arrived after it. Checks that the decoder throws only
// ProtocolError, that whatever it accepts obeys every documented rule (so no
// allocation can be sized from an unchecked field), that an accepted header
// re-encodes to the same bytes, the Hello payload rules, and the ActivationBatch
// segment table (decode_batch_segments) on whatever follows a batch header.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "common/wire/frame.hpp"

namespace {

// Tight caps: an accepted header can ask for at most this much memory.
constexpr mdi::FrameLimits kTight{/*max_payload_bytes=*/1024, /*max_tokens=*/2048};

[[noreturn]] void bug(const char* what) {
  std::fprintf(stderr, "fuzz_frame_decoder: %s\n", what);
  std::abort();
}
void check(bool ok, const char* what) {
  if (!ok) bug(what);
}

bool is_control(mdi::FrameType t) {
  return t == mdi::FrameType::SampleStop || t == mdi::FrameType::RunStop || t == mdi::FrameType::Heartbeat;
}

// Every rule frame.hpp documents for an accepted header, recomputed independently.
void check_accepted(const mdi::FrameHeader& h, const uint8_t* raw, const mdi::FrameLimits& limits) {
  const auto type = static_cast<uint16_t>(h.type);
  check(type >= 1 && type < static_cast<uint16_t>(mdi::FrameType::Count), "accepted an unknown type");
  check(static_cast<uint8_t>(h.dtype) < static_cast<uint8_t>(mdi::WireDType::Count), "accepted an unknown dtype");
  check(h.ndim <= mdi::kMaxFrameDims, "accepted ndim > 4");
  check(h.n_tokens <= limits.max_tokens, "accepted n_tokens over the limit");
  check(uint64_t{h.start_pos} + h.n_tokens <= limits.max_tokens, "accepted start_pos + n_tokens over the limit");
  check(h.payload_bytes <= limits.max_payload_bytes, "accepted payload_bytes over the limit");
  // The tensor size in 128 bits, saturated past 2^64 (each step stays below 2^97).
  unsigned __int128 bytes = h.ndim == 0 ? 0 : mdi::wire_dtype_size(h.dtype);
  for (size_t d = 0; d < mdi::kMaxFrameDims; ++d) {
    if (d < h.ndim)
      bytes = std::min<unsigned __int128>(bytes * h.shape[d], static_cast<unsigned __int128>(UINT64_MAX) + 1);
    else
      check(h.shape[d] == 0, "accepted a non-zero unused shape entry");
  }
  const bool batch = h.type == mdi::FrameType::ActivationBatch;
  check(batch || h.segments == 0, "accepted segments outside an ActivationBatch");
  if (batch)
    check(h.ndim == 2 && h.segments >= 1 && h.segments <= h.n_tokens && h.shape[0] == h.n_tokens,
          "accepted an ActivationBatch whose segments or shape break the rules");
  bytes += uint64_t{mdi::kBatchSegmentBytes} * h.segments;
  check(bytes == h.payload_bytes, "accepted payload_bytes that do not match the segment table and the shape");
  if (is_control(h.type)) check(h.ndim == 0, "accepted a control frame with a payload");
  if (h.type == mdi::FrameType::Hello)
    check(h.dtype == mdi::WireDType::U8 && h.payload_bytes == mdi::kHelloPayloadBytes, "accepted a malformed Hello");
  uint8_t again[mdi::kFrameHeaderBytes];
  mdi::encode_header(h, again);
  check(std::memcmp(again, raw, mdi::kFrameHeaderBytes) == 0, "an accepted header does not re-encode to its bytes");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A receiver only decodes a complete header; a shorter input is a truncated frame.
  if (size < mdi::kFrameHeaderBytes) return 0;
  const uint8_t* const rest = data + mdi::kFrameHeaderBytes;
  const size_t rest_size = size - mdi::kFrameHeaderBytes;

  // decode_hello on whatever follows, labelled Hello: it must check the size itself.
  {
    mdi::Frame probe;
    probe.header.type = mdi::FrameType::Hello;
    probe.payload.assign(rest, rest + rest_size);
    try {
      mdi::decode_hello(probe);
      check(rest_size == mdi::kHelloPayloadBytes, "decode_hello accepted a payload of the wrong size");
    } catch (const mdi::ProtocolError&) {
      check(rest_size != mdi::kHelloPayloadBytes, "decode_hello rejected a Hello payload of the right size");
    }
  }

  mdi::Frame frame;
  bool accepted_tight = false;
  try {
    frame.header = mdi::decode_header(data, kTight);
    accepted_tight = true;
  } catch (const mdi::ProtocolError&) {
  }
  // The default caps are looser than kTight: they accept at least as much. Decode only, allocate nothing.
  const mdi::FrameLimits loose{};
  try {
    const mdi::FrameHeader h = mdi::decode_header(data, loose);
    check_accepted(h, data, loose);
  } catch (const mdi::ProtocolError&) {
    check(!accepted_tight, "a header accepted under tight limits is rejected under the default ones");
  }
  if (!accepted_tight) return 0;
  const mdi::FrameHeader& h = frame.header;
  check_accepted(h, data, kTight);

  // What read_frame does next: allocate payload_bytes (checked above) and read them.
  if (rest_size < h.payload_bytes) return 0;  // truncated payload: the receiver's read times out
  frame.payload.resize(h.payload_bytes);
  if (h.payload_bytes != 0) std::memcpy(frame.payload.data(), rest, h.payload_bytes);

  if (h.type == mdi::FrameType::ActivationBatch) {
    try {
      const auto segments = mdi::decode_batch_segments(frame, kTight);
      uint64_t rows = 0;
      for (const auto& s : segments) {
        check(s.n_tokens >= 1 && uint64_t{s.start_pos} + s.n_tokens <= kTight.max_tokens, "accepted a segment out of limits");
        rows += s.n_tokens;
        check(std::count_if(segments.begin(), segments.end(), [&](const auto& o) { return o.sample_id == s.sample_id; }) == 1,
              "accepted a sample twice in one batch");
      }
      check(rows == h.n_tokens && segments.size() == h.segments, "accepted segments that do not add up to the header");
      const size_t offset = mdi::batch_rows_offset(h);
      const mdi::Frame again = mdi::make_activation_batch_frame(segments, h.dtype, h.shape[1], frame.payload.data() + offset,
                                                                frame.payload.size() - offset);
      check(again.payload == frame.payload, "a decoded ActivationBatch does not re-encode to its payload");
    } catch (const mdi::ProtocolError&) {
    }
  }

  if (h.type == mdi::FrameType::Hello) {
    mdi::HelloInfo hello;
    try {
      hello = mdi::decode_hello(frame);
    } catch (const mdi::ProtocolError&) {
      bug("decode_hello rejected a Hello frame that decode_header accepted");
    }
    const mdi::Frame again = mdi::make_hello_frame(hello);
    check(again.payload == frame.payload, "a decoded Hello does not re-encode to its payload");
  } else {
    try {
      mdi::decode_hello(frame);
      bug("decode_hello accepted a frame that is not a Hello");
    } catch (const mdi::ProtocolError&) {
    }
  }
  return 0;
}
