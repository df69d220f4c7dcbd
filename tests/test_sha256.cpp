#include "common/store/sha256.hpp"

#include <fstream>
#include <random>

#include "tests/support.hpp"

namespace {

constexpr char kEmptyDigest[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr char kAbcDigest[] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

TEST(Sha256, MatchesKnownVectors) {
  mdi::Sha256 hash;
  EXPECT_EQ(hash.hex_digest(), kEmptyDigest);
  hash.update("abc", 3);
  EXPECT_EQ(hash.hex_digest(), kAbcDigest);
}

TEST(Sha256, SplitUpdatesEqualOneUpdate) {
  mdi::Sha256 hash;
  hash.update("a", 1);
  hash.update("", 0);
  hash.update("bc", 2);
  EXPECT_EQ(hash.hex_digest(), kAbcDigest);
}

TEST(Sha256, FileDigestEqualsInMemoryDigestAcrossBlockBoundaries) {
  mdi::test::ScratchDir dir;
  std::string bytes((3 << 20) + 12345, '\0');  // spans several 1 MiB blocks and a partial one
  std::mt19937 random(7);
  for (char& c : bytes) c = static_cast<char>(random());
  std::ofstream(dir / "blob", std::ios::binary) << bytes;

  mdi::Sha256 hash;
  hash.update(bytes.data(), bytes.size());
  EXPECT_EQ(mdi::sha256_file(dir / "blob"), hash.hex_digest());

  std::ofstream(dir / "empty", std::ios::binary).close();
  EXPECT_EQ(mdi::sha256_file(dir / "empty"), kEmptyDigest);
}

TEST(Sha256, MissingFileThrowsNamingThePath) {
  mdi::test::ScratchDir dir;
  try {
    mdi::sha256_file(dir / "absent");
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("absent"), std::string::npos) << e.what();
  }
}

}  // namespace
