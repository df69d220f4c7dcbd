#include "common/wire/frame.hpp"

#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/support.hpp"

namespace mdi {
namespace {

using ::testing::HasSubstr;

FrameHeader activations_header() {
  const float values[2 * 3] = {1, 2, 3, 4, 5, 6};
  FrameHeader h =
      make_tensor_frame(FrameType::Activations, 7, 40, WireDType::F32, {2, 3}, values, sizeof values).header;
  h.n_tokens = 2;
  h.step = 123456789012ull;
  return h;
}

void expect_same(const FrameHeader& a, const FrameHeader& b) {
  EXPECT_EQ(a.type, b.type);
  EXPECT_EQ(a.flags, b.flags);
  EXPECT_EQ(a.sample_id, b.sample_id);
  EXPECT_EQ(a.start_pos, b.start_pos);
  EXPECT_EQ(a.n_tokens, b.n_tokens);
  EXPECT_EQ(a.layer, b.layer);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.ndim, b.ndim);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.segments, b.segments);
  EXPECT_EQ(a.payload_bytes, b.payload_bytes);
}

TEST(Frame, EveryTypeRoundTrips) {
  for (uint16_t id = 1; id < static_cast<uint16_t>(FrameType::Count); ++id) {
    const auto type = static_cast<FrameType>(id);
    SCOPED_TRACE(frame_type_name(type));
    Frame frame;
    if (type == FrameType::SampleStop || type == FrameType::RunStop || type == FrameType::Heartbeat) {
      frame = make_control_frame(type, 42);
    } else if (type == FrameType::Hello) {
      frame = make_hello_frame({2, 3, 99});
    } else if (type == FrameType::ActivationBatch) {
      const float rows[3 * 2] = {1, 2, 3, 4, 5, 6};
      frame = make_activation_batch_frame({{4, 0, 2}, {9, 17, 1}}, WireDType::F32, 2, rows, sizeof rows);
    } else {
      const int64_t values[3] = {-1, 0, 1};
      frame = make_tensor_frame(type, 5, 9, WireDType::I64, {1, 3}, values, sizeof values);
      frame.header.layer = 11;
    }
    frame.header.flags = 0xBEEF;
    uint8_t bytes[kFrameHeaderBytes];
    encode_header(frame.header, bytes);
    expect_same(decode_header(bytes, {}), frame.header);
  }
}

TEST(Frame, HeaderIsLittleEndianFieldByField) {
  uint8_t bytes[kFrameHeaderBytes];
  encode_header(activations_header(), bytes);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(bytes), 4), "MDIF");
  EXPECT_EQ(bytes[4], 3);    // version
  EXPECT_EQ(bytes[6], 2);    // type Activations
  EXPECT_EQ(bytes[11], 2);   // ndim
  EXPECT_EQ(bytes[12], 7);   // sample_id
  EXPECT_EQ(bytes[16], 40);  // start_pos
  EXPECT_EQ(bytes[28], 2);   // shape[0]
  EXPECT_EQ(bytes[32], 3);   // shape[1]
  EXPECT_EQ(bytes[56], 24);  // payload_bytes
  EXPECT_EQ(bytes[48], 123456789012ull & 0xFF);
}

TEST(Frame, DTypeSizes) {
  EXPECT_EQ(wire_dtype_size(WireDType::F32), 4u);
  EXPECT_EQ(wire_dtype_size(WireDType::BF16), 2u);
  EXPECT_EQ(wire_dtype_size(WireDType::F16), 2u);
  EXPECT_EQ(wire_dtype_size(WireDType::I32), 4u);
  EXPECT_EQ(wire_dtype_size(WireDType::I64), 8u);
  EXPECT_EQ(wire_dtype_size(WireDType::U8), 1u);
  EXPECT_THROW(wire_dtype_size(WireDType::Count), std::invalid_argument);
}

TEST(Frame, HelloRoundTrips) {
  HelloInfo hello{2, 3, 0x0123456789ABCDEFull, {}, {}};
  for (size_t i = 0; i < hello.nonce.size(); ++i) hello.nonce[i] = static_cast<uint8_t>(i + 1);
  for (size_t i = 0; i < hello.proof.size(); ++i) hello.proof[i] = static_cast<uint8_t>(0xF0 - i);
  Frame frame = make_hello_frame(hello);
  EXPECT_EQ(frame.payload.size(), 64u);
  uint8_t bytes[kFrameHeaderBytes];
  encode_header(frame.header, bytes);
  frame.header = decode_header(bytes, {});
  const HelloInfo back = decode_hello(frame);
  EXPECT_EQ(back.ring_index, 2u);
  EXPECT_EQ(back.n_nodes, 3u);
  EXPECT_EQ(back.run_id, hello.run_id);
  EXPECT_EQ(back.nonce, hello.nonce);
  EXPECT_EQ(back.proof, hello.proof);
  EXPECT_THROW(decode_hello(make_control_frame(FrameType::RunStop)), ProtocolError);
}

TEST(Frame, HelpersRejectInconsistentInput) {
  const float value = 1;
  EXPECT_THROW(make_tensor_frame(FrameType::Activations, 0, 0, WireDType::F32, {2}, &value, sizeof value),
               std::invalid_argument);
  EXPECT_THROW(make_tensor_frame(FrameType::Activations, 0, 0, WireDType::F32, {1, 1, 1, 1, 1}, &value, sizeof value),
               std::invalid_argument);
  EXPECT_THROW(make_control_frame(FrameType::Activations), std::invalid_argument);
}

// Encodes activations_header(), lets `corrupt` damage the bytes, and returns the
// decoder's complaint ("" if it accepted them).
std::string decode_error(const std::function<void(uint8_t*)>& corrupt, FrameLimits limits = {}) {
  uint8_t bytes[kFrameHeaderBytes];
  encode_header(activations_header(), bytes);
  corrupt(bytes);
  try {
    decode_header(bytes, limits);
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "";
}

void put32(uint8_t* at, uint32_t value) {
  for (int i = 0; i < 4; ++i) at[i] = static_cast<uint8_t>(value >> (8 * i));
}

void put64(uint8_t* at, uint64_t value) {
  for (int i = 0; i < 8; ++i) at[i] = static_cast<uint8_t>(value >> (8 * i));
}

TEST(FrameValidation, AcceptsTheUndamagedHeader) {
  EXPECT_EQ(decode_error([](uint8_t*) {}), "");
}

TEST(FrameValidation, WrongMagic) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[0] = 'X'; }), HasSubstr("magic"));
}

TEST(FrameValidation, NewerVersionNamesBothVersions) {
  const std::string error = decode_error([](uint8_t* b) { b[4] = 4; });
  EXPECT_THAT(error, HasSubstr("version is 4"));
  EXPECT_THAT(error, HasSubstr("protocol version 3"));
}

TEST(FrameValidation, UnknownType) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[6] = 11; }), HasSubstr("type 11 is unknown"));
  EXPECT_THAT(decode_error([](uint8_t* b) { b[6] = 0; }), HasSubstr("type 0 is unknown"));
}

TEST(FrameValidation, UnknownDType) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[10] = 6; }), HasSubstr("dtype 6 is unknown"));
}

TEST(FrameValidation, FiveDims) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[11] = 5; }), HasSubstr("ndim 5 exceeds the limit 4"));
}

TEST(FrameValidation, UnusedDimMustBeZero) {
  EXPECT_THAT(decode_error([](uint8_t* b) { put32(b + 28 + 4 * 3, 8); }), HasSubstr("shape[3]"));
}

TEST(FrameValidation, ShapeDoesNotMatchPayload) {
  const std::string error = decode_error([](uint8_t* b) { put64(b + 56, 25); });
  EXPECT_THAT(error, HasSubstr("payload_bytes 25"));
  EXPECT_THAT(error, HasSubstr("24 bytes"));
}

TEST(FrameValidation, PayloadOverLimit) {
  FrameLimits limits;
  limits.max_payload_bytes = 16;
  EXPECT_THAT(decode_error([](uint8_t*) {}, limits), HasSubstr("payload_bytes 24 exceeds the limit 16"));
}

TEST(FrameValidation, OverflowingShapeProduct) {
  const std::string error = decode_error([](uint8_t* b) {
    b[11] = 4;
    for (int d = 0; d < 4; ++d) put32(b + 28 + 4 * d, 0xFFFFFFFFu);
  });
  EXPECT_THAT(error, HasSubstr("shape"));
  EXPECT_THAT(error, HasSubstr("overflows"));
}

TEST(FrameValidation, SegmentsOnlyInActivationBatches) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[45] = 1; }), HasSubstr("only ActivationBatch frames have segments"));
}

TEST(FrameValidation, TokensOverLimit) {
  FrameLimits limits;
  limits.max_tokens = 1;
  EXPECT_THAT(decode_error([](uint8_t*) {}, limits), HasSubstr("n_tokens 2 exceeds the limit 1"));
  limits.max_tokens = 41;
  EXPECT_THAT(decode_error([](uint8_t*) {}, limits), HasSubstr("start_pos 40"));
}

TEST(FrameValidation, ControlFramesCarryNoPayload) {
  const std::string error = decode_error([](uint8_t* b) { b[6] = static_cast<uint8_t>(FrameType::RunStop); });
  EXPECT_THAT(error, HasSubstr("ndim 2 must be 0 for a RunStop frame"));
  const std::string no_tensor_error = decode_error([](uint8_t* b) {
    b[11] = 0;  // ndim
    put32(b + 28, 0);
    put32(b + 32, 0);
  });
  EXPECT_THAT(no_tensor_error, HasSubstr("payload_bytes 24 must be 0"));
}

// An ActivationBatch of two samples (3 and 1 tokens, dim 2), encoded and decoded as a
// receiver sees it, after `damage` to its header bytes and `damage_payload` to its payload.
std::string batch_error(const std::function<void(uint8_t*)>& damage, const std::function<void(std::vector<uint8_t>&)>& damage_payload,
                        FrameLimits limits = {}) {
  const float rows[4 * 2] = {1, 2, 3, 4, 5, 6, 7, 8};
  Frame frame = make_activation_batch_frame({{4, 0, 3}, {9, 17, 1}}, WireDType::F32, 2, rows, sizeof rows);
  uint8_t bytes[kFrameHeaderBytes];
  encode_header(frame.header, bytes);
  damage(bytes);
  damage_payload(frame.payload);
  try {
    frame.header = decode_header(bytes, limits);
    decode_batch_segments(frame, limits);
    return "";
  } catch (const ProtocolError& e) {
    return e.what();
  }
}
void untouched(uint8_t*) {}
void untouched_payload(std::vector<uint8_t>&) {}

TEST(ActivationBatch, SegmentsAndRowsRoundTrip) {
  const float rows[4 * 2] = {1, 2, 3, 4, 5, 6, 7, 8};
  Frame frame = make_activation_batch_frame({{4, 0, 3}, {9, 17, 1}}, WireDType::F32, 2, rows, sizeof rows);
  uint8_t bytes[kFrameHeaderBytes];
  encode_header(frame.header, bytes);
  const FrameHeader h = decode_header(bytes, {});
  EXPECT_EQ(h.segments, 2u);
  EXPECT_EQ(h.n_tokens, 4u);
  EXPECT_EQ(h.payload_bytes, 2 * kBatchSegmentBytes + sizeof rows);
  EXPECT_EQ(decode_batch_segments(frame, {}), (std::vector<BatchSegment>{{4, 0, 3}, {9, 17, 1}}));
  EXPECT_EQ(std::memcmp(frame.payload.data() + batch_rows_offset(h), rows, sizeof rows), 0);
  EXPECT_EQ(batch_error(untouched, untouched_payload), "");
}

TEST(ActivationBatch, HeaderChecks) {
  // more segments than tokens; a segment table that does not fit the payload size; not 2-D
  EXPECT_THAT(batch_error([](uint8_t* b) { put32(b + 44, 5); }, untouched_payload), HasSubstr("1..n_tokens segments"));
  EXPECT_THAT(batch_error([](uint8_t* b) { put32(b + 44, 3); }, untouched_payload), HasSubstr("segment table"));
  EXPECT_THAT(batch_error([](uint8_t* b) { b[11] = 1, put32(b + 32, 0); }, untouched_payload), HasSubstr("n_tokens segments"));
  EXPECT_THAT(batch_error([](uint8_t* b) { put32(b + 44, 0); }, untouched_payload), HasSubstr("segments 0"));
}

TEST(ActivationBatch, SegmentTableChecks) {
  auto entry = [](std::vector<uint8_t>& p, size_t i, size_t field, uint32_t value) { put32(p.data() + 16 * i + 4 * field, value); };
  EXPECT_THAT(batch_error(untouched, [&](auto& p) { entry(p, 1, 0, 4); }), HasSubstr("two segments of sample 4"));
  EXPECT_THAT(batch_error(untouched, [&](auto& p) { entry(p, 1, 2, 0); }), HasSubstr("1 or more positions"));
  EXPECT_THAT(batch_error(untouched, [&](auto& p) { entry(p, 1, 2, 2); }), HasSubstr("hold 5 tokens, the header says 4"));
  EXPECT_THAT(batch_error(untouched, [&](auto& p) { entry(p, 0, 3, 1); }), HasSubstr("bytes 12..15 must be zero"));
  FrameLimits limits;
  limits.max_tokens = 17;  // sample 9 sits at position 17
  EXPECT_THAT(batch_error(untouched, untouched_payload, limits), HasSubstr("start_pos 17 and n_tokens 1"));
  EXPECT_THAT(batch_error(untouched, [&](auto& p) { entry(p, 1, 1, 0xFFFFFFFFu); }), HasSubstr("start_pos 4294967295"));
}

TEST(FrameValidation, HelloMustHoldAHelloInfo) {
  EXPECT_THAT(decode_error([](uint8_t* b) { b[6] = static_cast<uint8_t>(FrameType::Hello); }),
              HasSubstr("does not hold a Hello"));
}

}  // namespace
}  // namespace mdi
