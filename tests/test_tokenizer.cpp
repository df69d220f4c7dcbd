#include "common/model/tokenizer/tokenizer.hpp"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>

#include <gmock/gmock.h>
#include <nlohmann/json.hpp>

#include "tests/support.hpp"

namespace {
using mdi::test::error_of;

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using nlohmann::json;

json read_json(const std::filesystem::path& path) { return json::parse(mdi::test::read_file(path)); }

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// Loading the 9 MB Llama 3 tokenizer.json takes a moment: each file once per run.
const mdi::Tokenizer& tokenizer_at(const std::filesystem::path& path) {
  static std::map<std::filesystem::path, std::unique_ptr<mdi::Tokenizer>> loaded;
  auto& tokenizer = loaded[path];
  if (!tokenizer) tokenizer = mdi::load_tokenizer(path);
  return *tokenizer;
}

// What run.c prints for a generated stream: every token's bytes after the first.
std::string streamed_text(const mdi::Tokenizer& tokenizer, const std::vector<int>& ids) {
  std::string text;
  for (size_t i = 1; i < ids.size(); ++i) text += tokenizer.token_bytes(ids[i - 1], ids[i]);
  return text;
}

// ---------------------------------------------------------------------------
// Reference ids

TEST(Llama2cTokenizer, PromptsEncodeAndGeneratedStreamsPrintAsRunC) {
  MDI_REQUIRE_SHARED(shared);
  const json cases = read_json(shared / "reference/llama2c_greedy.json");
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    const auto& tokenizer = tokenizer_at(shared / c["tokenizer"].get<std::string>());
    const std::string prompt = c["prompt"];
    SCOPED_TRACE("prompt \"" + prompt + "\" with " + c["tokenizer"].get<std::string>());
    EXPECT_EQ(tokenizer.vocab_size(), 512);
    EXPECT_EQ(tokenizer.encode(prompt, true), c["prompt_tokens"].get<std::vector<int>>());
    // `text` is what run.c printed: the prompt too, since it prints every position after BOS.
    EXPECT_EQ(streamed_text(tokenizer, c["tokens"].get<std::vector<int>>()), c["text"].get<std::string>());
  }
}

class HfReference : public ::testing::TestWithParam<const char*> {};

TEST_P(HfReference, EveryCaseEncodesToTheReferenceIdsAndDecodesBack) {
  MDI_REQUIRE_SHARED(shared);
  const json reference = read_json(shared / "reference/tokenizers.json")[GetParam()];
  const auto& tokenizer = tokenizer_at(shared / reference["tokenizer"].get<std::string>());
  ASSERT_FALSE(reference["cases"].empty());
  for (const json& c : reference["cases"]) {
    const std::string text = c["text"];
    const auto ids = c["ids"].get<std::vector<int>>();
    SCOPED_TRACE(text);
    EXPECT_EQ(tokenizer.encode(text, false), ids);
    EXPECT_EQ(tokenizer.decode(ids), text);
    auto with_bos = tokenizer.encode(text, true);
    ASSERT_FALSE(with_bos.empty());
    EXPECT_EQ(with_bos.front(), tokenizer.bos_id());
    EXPECT_EQ(std::vector<int>(with_bos.begin() + 1, with_bos.end()), ids);
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, HfReference, ::testing::Values("llama3", "llama2"));

TEST(Llama2cTokenizer, Llama2VocabularyInRunCFormatMatchesSentencePiece) {
  MDI_REQUIRE_SHARED(shared);
  const json reference = read_json(shared / "reference/tokenizers.json")["llama2"];
  const auto& tokenizer = tokenizer_at(shared / "tokenizers/llama2/tokenizer.bin");
  EXPECT_EQ(tokenizer.vocab_size(), 32000);
  for (const json& c : reference["cases"]) {
    const std::string text = c["text"];
    const auto ids = c["ids"].get<std::vector<int>>();
    SCOPED_TRACE(text);
    EXPECT_EQ(tokenizer.encode(text, false), ids);
    EXPECT_EQ(tokenizer.decode(ids), text);
  }
}

TEST(SentencePieceModel, SameIdsAndBytesAsTheLlama2cFileOfTheSameVocabulary) {
  MDI_REQUIRE_SHARED(shared);
  const json reference = read_json(shared / "reference/tokenizers.json")["llama2"];
  const auto& model = tokenizer_at(shared / "tokenizers/llama2/tokenizer.model");
  const auto& bin = tokenizer_at(shared / "tokenizers/llama2/tokenizer.bin");
  ASSERT_EQ(model.vocab_size(), bin.vocab_size());
  for (const json& c : reference["cases"]) {
    const std::string text = c["text"];
    SCOPED_TRACE(text);
    EXPECT_EQ(model.encode(text, false), bin.encode(text, false));
    EXPECT_EQ(model.encode(text, true), bin.encode(text, true));
  }
  for (int id = 0; id < model.vocab_size(); ++id) {
    ASSERT_EQ(model.token_bytes(29892, id), bin.token_bytes(29892, id)) << "token " << id;
    ASSERT_EQ(model.token_bytes(1, id), bin.token_bytes(1, id)) << "token " << id;
  }
}

// Where SentencePiece's normalizer and run.c part ways: SentencePiece reads
// U+2581 as a space and each byte outside valid UTF-8 as U+FFFD (30140).
// The ids are libsentencepiece 0.1.97's.
TEST(SentencePieceModel, NormalizesTextAsSentencePieceDoes) {
  MDI_REQUIRE_SHARED(shared);
  const auto& model = tokenizer_at(shared / "tokenizers/llama2/tokenizer.model");
  EXPECT_THAT(model.encode("x\u2581y", false), ElementsAre(921, 343));
  EXPECT_THAT(model.encode("\u2581start", false), ElementsAre(29871, 1369));
  EXPECT_THAT(model.encode("caf\xC3", false), ElementsAre(274, 2142, 30140));
  EXPECT_THAT(model.encode("a\xFF" "b", false), ElementsAre(263, 30140, 29890));
  EXPECT_THAT(model.encode("\xED\xA0\x80", false), ElementsAre(29871, 26308, 30140));
  // Control and byte pieces are not text: "<s>" and "<0x41>" are spelled out.
  EXPECT_THAT(model.encode("<s>hi</s>", false), ElementsAre(529, 29879, 29958, 2918, 829, 29879, 29958));
  EXPECT_THAT(model.encode("<0x41>", false), ElementsAre(529, 29900, 29916, 29946, 29896, 29958));
  EXPECT_THAT(model.encode("", true), ElementsAre(1));
}

// ---------------------------------------------------------------------------
// Hand-built tokenizer.model files: a protobuf writer just big enough for a ModelProto

std::string varint(uint64_t value) {
  std::string bytes;
  for (; value >= 0x80; value >>= 7) bytes += static_cast<char>((value & 0x7F) | 0x80);
  return bytes + static_cast<char>(value);
}
std::string varint_field(int number, uint64_t value) { return varint(number << 3) + varint(value); }
std::string bytes_field(int number, const std::string& bytes) {
  return varint(number << 3 | 2) + varint(bytes.size()) + bytes;
}
std::string float_field(int number, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  std::string bytes = varint(number << 3 | 5);
  for (int shift = 0; shift < 32; shift += 8) bytes += static_cast<char>(bits >> shift & 0xFF);
  return bytes;
}

enum PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4 };

std::string piece(const std::string& text, float score, PieceType type = kNormal) {
  return bytes_field(1, bytes_field(1, text) + float_field(2, score) + varint_field(3, type));
}

// 0 <unk>, 1 <s>, 2 </s>, 3 ▁, 4 h, 5 i, 6 hi, 7 ▁h, 8 ▁hi, 9 ih (user-defined); no byte pieces.
// "hi" merges before "▁h", so "▁hi" is built as ▁ + hi. `trainer` and
// `normalizer` are the TrainerSpec and NormalizerSpec fields.
std::string small_model(const std::string& trainer, const std::string& normalizer) {
  return piece("<unk>", 0, kUnknown) + piece("<s>", 0, kControl) + piece("</s>", 0, kControl) + piece("▁", 0) +
         piece("h", 0) + piece("i", 0) + piece("hi", -1) + piece("▁h", -2) + piece("▁hi", -3) +
         piece("ih", 0, kUserDefined) + bytes_field(2, trainer) + bytes_field(3, normalizer);
}
const std::string kBpe = varint_field(3, 2);  // TrainerSpec.model_type

std::unique_ptr<mdi::Tokenizer> load_model(const mdi::test::ScratchDir& dir, const std::string& bytes) {
  write_bytes(dir / "tokenizer.model", bytes);
  return mdi::load_tokenizer(dir / "tokenizer.model");
}

TEST(SentencePieceModel, HandBuiltBpeModelWithTheDefaultNormalizer) {
  mdi::test::ScratchDir dir;
  // NormalizerSpec: name "identity", the rest default: dummy prefix, remove extra whitespaces.
  const auto tokenizer = load_model(dir, small_model(kBpe, bytes_field(1, "identity")));
  EXPECT_EQ(tokenizer->vocab_size(), 10);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_THAT(tokenizer->encode("hi", true), ElementsAre(1, 8));
  // Leading and trailing spaces go, runs of them become one.
  EXPECT_THAT(tokenizer->encode("  hi   hi ", false), ElementsAre(8, 8));
  EXPECT_THAT(tokenizer->encode("   ", true), ElementsAre(1));
  // No byte pieces: a run of unknown characters is one <unk>.
  EXPECT_THAT(tokenizer->encode("h\u00e9\u20aci", false), ElementsAre(7, 0, 5));
  // A user-defined piece is matched first and never merged.
  EXPECT_THAT(tokenizer->encode("hih", false), ElementsAre(7, 9));
  EXPECT_EQ(tokenizer->decode({8, 8}), "hi hi");
  EXPECT_EQ(tokenizer->token_bytes(1, 8), "hi");
  EXPECT_EQ(tokenizer->token_bytes(1, 1), "");
}

TEST(SentencePieceModel, TrainerAndNormalizerSpecsAreHonoured) {
  mdi::test::ScratchDir dir;
  // remove_extra_whitespaces off, add_dummy_prefix off; BOS 2 and EOS 1.
  const std::string normalizer = varint_field(3, 0) + varint_field(4, 0);
  const auto tokenizer = load_model(dir, small_model(kBpe + varint_field(41, 2) + varint_field(42, 1), normalizer));
  EXPECT_EQ(tokenizer->bos_id(), 2);
  EXPECT_EQ(tokenizer->eos_id(), 1);
  EXPECT_THAT(tokenizer->encode(" hi  hi", true), ElementsAre(2, 8, 3, 8));
  EXPECT_THAT(tokenizer->encode("hi", false), ElementsAre(6));
  // No dummy prefix, so no space to drop after BOS either.
  EXPECT_EQ(tokenizer->decode({8, 6}), " hihi");
}

TEST(SentencePieceModel, UnsupportedModelsAreRejected) {
  mdi::test::ScratchDir dir;
  const auto path = (dir / "tokenizer.model").string();
  auto error = [&](const std::string& bytes) { return error_of<mdi::TokenizerError>([&] { load_model(dir, bytes); }); };
  // model_type unset is UNIGRAM.
  EXPECT_THAT(error(small_model("", "")), HasSubstr(path + ": only BPE SentencePiece models are supported; this one is UNIGRAM"));
  EXPECT_THAT(error(small_model(kBpe, bytes_field(1, "nmt_nfkc") + bytes_field(2, "charsmap"))),
              HasSubstr(path + ": unsupported normalization rule \"nmt_nfkc\""));
  EXPECT_THAT(error(small_model(kBpe + varint_field(41, 10), "")), HasSubstr("bos_id 10 is not one of the 10 pieces"));
  EXPECT_THAT(error(small_model(kBpe, "") + piece("hi", 0)), HasSubstr("piece 10 \"hi\" is defined twice"));
  EXPECT_THAT(error(small_model(kBpe, "") + piece("<0x41>", 0, PieceType(6))),
              HasSubstr("is a byte piece, but byte_fallback is off"));
}

TEST(SentencePieceModel, CorruptFilesNameThePathAndTheByte) {
  mdi::test::ScratchDir dir;
  const auto path = (dir / "tokenizer.model").string();
  auto error = [&](const std::string& bytes) { return error_of<mdi::TokenizerError>([&] { load_model(dir, bytes); }); };
  const std::string model = small_model(kBpe, "");
  // Cut anywhere: a truncated field, or (cut between pieces) no trainer_spec.
  // Not the (empty, optional) normalizer_spec at the end: without it the model is whole.
  for (size_t size = 0; size < model.size() - bytes_field(3, "").size(); ++size) {
    SCOPED_TRACE(size);
    EXPECT_THAT(error(model.substr(0, size)), HasSubstr(path + ": not a SentencePiece model: "));
  }
  EXPECT_THAT(error(model.substr(0, 1)), HasSubstr(path + ": not a SentencePiece model: truncated varint at byte 1"));
  // Piece 0 announcing 2^32 - 1 bytes.
  EXPECT_THAT(error("\x0A\xFF\xFF\xFF\xFF\x0F" + model),
              HasSubstr(path + ": not a SentencePiece model: field 1 announces 4294967295 bytes, " +
                        std::to_string(model.size()) + " left at byte 1"));
  // A piece whose text is a varint: the offset is within the file, not within the piece.
  EXPECT_THAT(error(piece("<unk>", 0, kUnknown) + bytes_field(1, varint_field(1, 7))),
              HasSubstr("field 1 has wire type 0, expected 2 at byte " +
                        std::to_string(piece("<unk>", 0, kUnknown).size() + 2)));
  EXPECT_THAT(error(model + "\x0F"), HasSubstr("unsupported wire type 7 at byte " + std::to_string(model.size())));
}

TEST(SentencePieceModel, TruncatedLlama2ModelNamesThePathAndTheByte) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const std::string model = mdi::test::read_file(shared / "tokenizers/llama2/tokenizer.model");
  for (size_t size : {size_t{1}, size_t{2}, size_t{100}, model.size() / 3, model.size() - 1}) {
    SCOPED_TRACE(size);
    write_bytes(dir / "tokenizer.model", model.substr(0, size));
    const std::string error = error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "tokenizer.model"); });
    EXPECT_THAT(error, HasSubstr((dir / "tokenizer.model").string() + ": not a SentencePiece model: "));
    EXPECT_THAT(error, HasSubstr(" at byte "));
  }
}

// ---------------------------------------------------------------------------
// Special ids, pieces and loading

TEST(Tokenizers, SpecialIdsAndSizes) {
  MDI_REQUIRE_SHARED(shared);
  const auto& llama3 = tokenizer_at(shared / "tokenizers/llama3/tokenizer.json");
  EXPECT_EQ(llama3.bos_id(), 128000);
  EXPECT_EQ(llama3.eos_id(), 128001);
  EXPECT_EQ(llama3.vocab_size(), 128256);
  for (const char* file : {"tokenizers/llama2/tokenizer.model", "tokenizers/llama2/tokenizer.bin"}) {
    const auto& llama2 = tokenizer_at(shared / file);
    EXPECT_EQ(llama2.bos_id(), 1) << file;
    EXPECT_EQ(llama2.eos_id(), 2) << file;
    EXPECT_EQ(llama2.vocab_size(), 32000) << file;
  }
}


TEST(Tokenizers, SentencePieceFirstPieceAfterBosLosesItsSpace) {
  MDI_REQUIRE_SHARED(shared);
  for (const char* file : {"tokenizers/llama2/tokenizer.model", "tokenizers/llama2/tokenizer.bin"}) {
    SCOPED_TRACE(file);
    const auto& tokenizer = tokenizer_at(shared / file);
    const int hello = 15043;  // "▁Hello"
    EXPECT_EQ(tokenizer.token_bytes(1, hello), "Hello");
    EXPECT_EQ(tokenizer.token_bytes(29892, hello), " Hello");
    EXPECT_EQ(tokenizer.token_bytes(29892, 1), "");
    EXPECT_EQ(tokenizer.token_bytes(29892, 2), "");
    EXPECT_EQ(tokenizer.decode({1, hello, 29892, 2}), "Hello,");
  }
}

TEST(Tokenizers, ByteFallbackTokensGiveTheirByte) {
  MDI_REQUIRE_SHARED(shared);
  // 🚀 is not in the Llama 2 vocabulary: it encodes as <0xF0> <0x9F> <0x9A> <0x80>.
  const std::vector<int> rocket = {243, 162, 157, 131};
  for (const char* file : {"tokenizers/llama2/tokenizer.model", "tokenizers/llama2/tokenizer.bin"}) {
    SCOPED_TRACE(file);
    const auto& tokenizer = tokenizer_at(shared / file);
    EXPECT_EQ(tokenizer.token_bytes(29892, 243), "\xF0");
    EXPECT_EQ(tokenizer.token_bytes(1, 13), "\n");  // <0x0A>
    EXPECT_EQ(tokenizer.decode(rocket), "\xF0\x9F\x9A\x80");
    mdi::Utf8Stream stream;
    std::vector<std::string> printed;
    int prev = 29892;
    for (int id : rocket) {
      printed.push_back(stream.push(tokenizer.token_bytes(prev, id)));
      prev = id;
    }
    EXPECT_THAT(printed, ElementsAre("", "", "", "\xF0\x9F\x9A\x80"));
  }
}

TEST(Tokenizers, Llama3SpecialTokensStayOutOfTheStreamButNotOutOfDecode) {
  MDI_REQUIRE_SHARED(shared);
  const auto& tokenizer = tokenizer_at(shared / "tokenizers/llama3/tokenizer.json");
  EXPECT_EQ(tokenizer.token_bytes(9906, 128000), "");
  EXPECT_EQ(tokenizer.token_bytes(9906, 128009), "");  // <|eot_id|>
  EXPECT_EQ(tokenizer.token_bytes(128000, 9906), "Hello");
  EXPECT_EQ(tokenizer.token_bytes(9906, 11), ",");
  EXPECT_EQ(tokenizer.token_bytes(11, 856), " my");  // byte-level: no space is ever dropped
  EXPECT_EQ(tokenizer.decode({128006, 882, 128007}), "<|start_header_id|>user<|end_header_id|>");
  // "The first number in this list [34, 56, 78] is: " is 18 tokens, 19 with BOS (see shared/README).
  EXPECT_EQ(tokenizer.encode("The first number in this list [34, 56, 78] is: ", true).size(), 19u);
}

TEST(Tokenizers, IdOutsideTheVocabularyIsAnError) {
  MDI_REQUIRE_SHARED(shared);
  const auto& tokenizer = tokenizer_at(shared / "models/stories260K/tok512.bin");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { tokenizer.token_bytes(1, 512); }), HasSubstr("512"));
  EXPECT_THROW(tokenizer.decode({-1}), mdi::TokenizerError);
}

// ---------------------------------------------------------------------------
// Errors

TEST(LoadTokenizer, MissingFileNamesThePath) {
  mdi::test::ScratchDir dir;
  const auto missing = dir / "nope.bin";
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(missing); }), HasSubstr(missing.string() + ": no such file"));
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir.path()); }),
              HasSubstr(dir.path().string() + ": directory holds no tokenizer"));
}

TEST(LoadTokenizer, TruncatedLlama2cFileNamesThePathAndEntry) {
  mdi::test::ScratchDir dir;
  const auto path = dir / "tokenizer.bin";
  // max_token_length 5, then token 0 announcing 5 bytes but holding 3.
  std::string bytes(4, '\0');
  bytes[0] = 5;
  bytes += std::string(4, '\0') + std::string("\x05\0\0\0", 4) + "<un";
  write_bytes(path, bytes);
  const std::string error = error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(path); });
  EXPECT_THAT(error, HasSubstr(path.string()));
  EXPECT_THAT(error, HasSubstr("truncated entry for token 0"));

  write_bytes(path, "\x05");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(path); }), HasSubstr(path.string() + ": truncated"));
}

TEST(LoadTokenizer, TruncatedRealTokenizerFilesNameThePath) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const std::string bin = mdi::test::read_file(shared / "models/stories260K/tok512.bin");
  write_bytes(dir / "tok512.bin", bin.substr(0, bin.size() - 2));
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "tok512.bin"); }),
              HasSubstr((dir / "tok512.bin").string() + ": truncated entry for token 511"));

  const std::string model = mdi::test::read_file(shared / "tokenizers/llama2/tokenizer.model");
  write_bytes(dir / "tokenizer.model", model.substr(0, model.size() / 2));
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "tokenizer.model"); }),
              HasSubstr((dir / "tokenizer.model").string() + ": not a SentencePiece model"));
}

TEST(LoadTokenizer, UnknownFormatsAreRejected) {
  mdi::test::ScratchDir dir;
  write_bytes(dir / "vocab.txt", "hello");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "vocab.txt"); }),
              HasSubstr((dir / "vocab.txt").string() + ": unknown tokenizer format"));
  write_bytes(dir / "tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "tokenizer.json"); }),
              HasSubstr("unsupported model type \"WordPiece\""));
  write_bytes(dir / "tokenizer.json", R"({"model": )");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir / "tokenizer.json"); }),
              HasSubstr((dir / "tokenizer.json").string() + ": invalid JSON"));
}

// ---------------------------------------------------------------------------
// A hand-built Llama 2 flavour tokenizer.json: BPE over ▁-for-space text with byte fallback

// Vocabulary: 0 <unk>, 1 <s>, 2 </s>, 3 <0xC3>, 4 <0xA9>, 5 ▁, 6 h, 7 i, 8 hi, 9 ▁h, 10 ▁hi.
// "h i" ranks before "▁ h", so "▁hi" is built as ▁ + hi, not ▁h + i.
json sentencepiece_style_tokenizer(json normalizer, json pre_tokenizer) {
  return {
      {"added_tokens",
       {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
        {{"id", 1}, {"content", "<s>"}, {"special", true}},
        {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
      {"normalizer", normalizer},
      {"pre_tokenizer", pre_tokenizer},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"byte_fallback", true},
        {"vocab",
         {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"<0xC3>", 3}, {"<0xA9>", 4}, {"▁", 5}, {"h", 6}, {"i", 7},
          {"hi", 8}, {"▁h", 9}, {"▁hi", 10}}},
        {"merges", {"h i", "▁ h", "▁ hi"}}}},
  };
}

std::unique_ptr<mdi::Tokenizer> load_json(const mdi::test::ScratchDir& dir, const json& tokenizer) {
  write_bytes(dir / "tokenizer.json", tokenizer.dump());
  return mdi::load_tokenizer(dir.path());
}

const json kLlama2Normalizer = {
    {"type", "Sequence"},
    {"normalizers",
     {{{"type", "Prepend"}, {"prepend", "▁"}},
      {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}};
const json kMetaspaceFirst = {
    {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};

TEST(HfSentencePieceStyle, MergesByRankAndFallsBackToBytes) {
  mdi::test::ScratchDir dir;
  const auto tokenizer = load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr));
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->vocab_size(), 11);
  // "▁hi▁hé": ▁ h i ▁ h <0xC3> <0xA9>; "h i" merges first, then "▁ h", then "▁ hi".
  EXPECT_THAT(tokenizer->encode("hi hé", true), ElementsAre(1, 10, 9, 3, 4));
  EXPECT_EQ(tokenizer->decode({10, 9, 3, 4}), "hi hé");
  EXPECT_EQ(tokenizer->token_bytes(1, 10), "hi");
  EXPECT_EQ(tokenizer->token_bytes(10, 10), " hi");
  EXPECT_EQ(tokenizer->token_bytes(9, 3), "\xC3");
  // No token and no byte token for "x": unk.
  EXPECT_THAT(tokenizer->encode("x", false), ElementsAre(5, 0));
  // Normalizers see each piece between added tokens on its own, so "hi" gets its ▁ too.
  EXPECT_THAT(tokenizer->encode("<s>hi", false), ElementsAre(1, 10));
  EXPECT_EQ(tokenizer->decode({1, 10}), "<s>hi");
  // Prepend adds ▁ even before a space: " hi" is ▁▁hi.
  EXPECT_THAT(tokenizer->encode(" hi", false), ElementsAre(5, 10));
  EXPECT_THAT(tokenizer->encode("", true), ElementsAre(1));
}

TEST(HfSentencePieceStyle, MetaspaceFirstPrependsOnlyAtTheStartAndOnlyOnce) {
  mdi::test::ScratchDir dir;
  const auto tokenizer = load_json(dir, sentencepiece_style_tokenizer(nullptr, kMetaspaceFirst));
  EXPECT_THAT(tokenizer->encode("hi hé", false), ElementsAre(10, 9, 3, 4));
  EXPECT_THAT(tokenizer->encode(" hi", false), ElementsAre(10));
  EXPECT_THAT(tokenizer->encode("<s>hi", false), ElementsAre(1, 8));
}

TEST(HfSentencePieceStyle, TokenizerConfigNamesBosAndEos) {
  mdi::test::ScratchDir dir;
  write_bytes(dir / "tokenizer_config.json", R"({"bos_token": {"content": "</s>"}, "eos_token": "<unk>"})");
  const auto tokenizer = load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr));
  EXPECT_EQ(tokenizer->bos_id(), 2);
  EXPECT_EQ(tokenizer->eos_id(), 0);

  write_bytes(dir / "tokenizer_config.json", R"({"bos_token": "<bos>"})");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr)); }),
              HasSubstr("bos_token \"<bos>\" is not a token"));
}

TEST(HfSentencePieceStyle, UnsupportedPipelinesAreRejected) {
  mdi::test::ScratchDir dir;
  const json split_metaspace = {{"type", "Metaspace"}, {"replacement", "▁"}, {"split", true}};
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { load_json(dir, sentencepiece_style_tokenizer(nullptr, split_metaspace)); }),
              HasSubstr("unsupported pre_tokenizer"));
  const json lowercase = {{"type", "Lowercase"}};
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { load_json(dir, sentencepiece_style_tokenizer(lowercase, nullptr)); }),
              HasSubstr("unsupported normalizer"));
  json unknown_merge = sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr);
  unknown_merge["model"]["merges"].push_back("h x");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { load_json(dir, unknown_merge); }),
              HasSubstr("merge 3 \"h x\": \"x\" is not in the vocab"));
}

TEST(LoadTokenizer, DirectoryLoadsTokenizerJsonThenModelThenBin) {
  mdi::test::ScratchDir dir;
  write_bytes(dir / "tokenizer.model", "not a model");
  write_bytes(dir / "tokenizer.bin", "x");
  EXPECT_EQ(load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr))->vocab_size(), 11);
  std::filesystem::remove(dir / "tokenizer.json");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir.path()); }),
              HasSubstr((dir / "tokenizer.model").string() + ": not a SentencePiece model"));
  std::filesystem::remove(dir / "tokenizer.model");
  EXPECT_THAT(error_of<mdi::TokenizerError>([&] { mdi::load_tokenizer(dir.path()); }),
              HasSubstr((dir / "tokenizer.bin").string() + ": truncated"));
}

// ---------------------------------------------------------------------------
// Utf8Stream

TEST(Utf8Stream, HoldsASplitCharacterUntilItIsComplete) {
  mdi::Utf8Stream stream;
  EXPECT_EQ(stream.push("caf"), "caf");
  EXPECT_EQ(stream.push("\xC3"), "");
  EXPECT_EQ(stream.push("\xA9!"), "\xC3\xA9!");
  // 🔥 in four pushes.
  EXPECT_EQ(stream.push("\xF0"), "");
  EXPECT_EQ(stream.push("\x9F"), "");
  EXPECT_EQ(stream.push("\x94"), "");
  EXPECT_EQ(stream.push("\xA5"), "\xF0\x9F\x94\xA5");
  EXPECT_EQ(stream.finish(), "");
}

TEST(Utf8Stream, InvalidBytesBecomeReplacementCharacters) {
  const std::string replacement = "\xEF\xBF\xBD";
  mdi::Utf8Stream stream;
  EXPECT_EQ(stream.push("a\xFF" "b"), "a" + replacement + "b");
  EXPECT_EQ(stream.push("\x80"), replacement);           // continuation byte with no lead
  EXPECT_EQ(stream.push("\xE2\x82" "c"), replacement + "c");  // lead cut short by an ASCII byte
  EXPECT_EQ(stream.push("\xED\xA0\x80"), replacement + replacement + replacement);  // a surrogate
  EXPECT_EQ(stream.push("\xE6\x9D"), "");
  EXPECT_EQ(stream.finish(), replacement);  // the unfinished 東
  EXPECT_EQ(stream.finish(), "");
}

}  // namespace
