#include "common/store/safetensors.hpp"

#include <cstring>
#include <fstream>

#include "tests/support.hpp"

namespace {
using mdi::test::error_of;

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

std::string with_header(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = char(n >> (8 * i));
  return out + json + data;
}

TEST(Safetensors, WrittenFileReadsBackWithShapesDtypesBytesAndMetadata) {
  mdi::test::ScratchDir dir;
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> b = {0x3f80, 0x4000};  // bf16 1.0, 2.0
  {
    mdi::SafetensorsWriter w(dir / "t.safetensors", {{"a", "F32", {2, 3}}, {"b", "BF16", {2}}}, {{"format", "pt"}});
    w.write("a", a.data(), a.size() * 4);
    w.write("b", b.data(), b.size() * 2);
    EXPECT_EQ(w.commit().size(), 64u);
  }
  mdi::SafetensorsFile f(dir / "t.safetensors");
  ASSERT_EQ(f.tensors().size(), 2u);
  const auto& ta = f.at("a");
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ta.dtype, "F32");
  EXPECT_EQ(std::memcmp(f.data(ta), a.data(), 24), 0);
  EXPECT_EQ(std::memcmp(f.data(f.at("b")), b.data(), 4), 0);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.find("missing"), nullptr);
  EXPECT_NE(error_of<mdi::CheckpointError>([&] { f.at("missing"); }).find("missing"), std::string::npos);
}

TEST(Safetensors, UncommittedWriterLeavesNoFile) {
  mdi::test::ScratchDir dir;
  {
    mdi::SafetensorsWriter w(dir / "t.safetensors", {{"a", "F32", {2}}});
    float x[2] = {1, 2};
    w.write("a", x, 8);
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(Safetensors, CorruptAndTruncatedFilesAreRefusedWithThePathAndProblem) {
  mdi::test::ScratchDir dir;
  auto path = dir / "bad.safetensors";
  struct Case {
    std::string bytes, expect;
  } cases[] = {
      {"abc", "truncated"},
      {with_header("{not json", ""), "corrupt safetensors header"},
      {std::string("\xff\xff\xff\xff\xff\xff\x00\x00", 8) + "{}", "header length"},
      {with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, '\0')), "truncated"},
      {with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", std::string(16, '\0')), "shape and dtype need 12"},
      {with_header(R"({"a":{"dtype":"Q4","shape":[3],"data_offsets":[0,12]}})", std::string(12, '\0')), "unsupported dtype"},
      {with_header(R"({"a":{"dtype":"F32","shape":[3]}})", std::string(12, '\0')), "lacks"},
  };
  for (auto& c : cases) {
    write_bytes(path, c.bytes);
    auto msg = error_of<mdi::CheckpointError>([&] { mdi::SafetensorsFile f(path); });
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
    // A refused file leaves no mapping behind (one leaked per refusal before MappedFile).
    EXPECT_EQ(mdi::test::read_file("/proc/self/maps").find(path.string()), std::string::npos) << c.expect;
  }
}

TEST(Safetensors, WritingOutOfOrderOrWithWrongSizeIsRefused) {
  mdi::test::ScratchDir dir;
  mdi::SafetensorsWriter w(dir / "t.safetensors", {{"a", "F32", {2}}, {"b", "F32", {1}}});
  float x[2] = {1, 2};
  EXPECT_THROW(w.write("b", x, 4), mdi::CheckpointError);
  EXPECT_THROW(w.write("a", x, 4), mdi::CheckpointError);
  EXPECT_THROW(w.commit(), mdi::CheckpointError);
}

}  // namespace
