#include "common/tokenizer.hpp"

#include <fstream>
#include <map>

#include <gmock/gmock.h>
#include <nlohmann/json.hpp>

#include "tests/support.hpp"

namespace {

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

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const mdi::TokenizerError& e) {
    return e.what();
  }
  return "(no error)";
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
  EXPECT_THAT(error_of([&] { tokenizer.token_bytes(1, 512); }), HasSubstr("512"));
  EXPECT_THROW(tokenizer.decode({-1}), mdi::TokenizerError);
}

// ---------------------------------------------------------------------------
// Errors

TEST(LoadTokenizer, MissingFileNamesThePath) {
  mdi::test::ScratchDir dir;
  const auto missing = dir / "nope.bin";
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(missing); }), HasSubstr(missing.string() + ": no such file"));
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir.path()); }),
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
  const std::string error = error_of([&] { mdi::load_tokenizer(path); });
  EXPECT_THAT(error, HasSubstr(path.string()));
  EXPECT_THAT(error, HasSubstr("truncated entry for token 0"));

  write_bytes(path, "\x05");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(path); }), HasSubstr(path.string() + ": truncated"));
}

TEST(LoadTokenizer, TruncatedRealTokenizerFilesNameThePath) {
  MDI_REQUIRE_SHARED(shared);
  mdi::test::ScratchDir dir;
  const std::string bin = mdi::test::read_file(shared / "models/stories260K/tok512.bin");
  write_bytes(dir / "tok512.bin", bin.substr(0, bin.size() - 2));
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir / "tok512.bin"); }),
              HasSubstr((dir / "tok512.bin").string() + ": truncated entry for token 511"));

  const std::string model = mdi::test::read_file(shared / "tokenizers/llama2/tokenizer.model");
  write_bytes(dir / "tokenizer.model", model.substr(0, model.size() / 2));
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir / "tokenizer.model"); }),
              HasSubstr((dir / "tokenizer.model").string() + ": not a SentencePiece model"));
}

TEST(LoadTokenizer, UnknownFormatsAreRejected) {
  mdi::test::ScratchDir dir;
  write_bytes(dir / "vocab.txt", "hello");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir / "vocab.txt"); }),
              HasSubstr((dir / "vocab.txt").string() + ": unknown tokenizer format"));
  write_bytes(dir / "tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir / "tokenizer.json"); }),
              HasSubstr("unsupported model type \"WordPiece\""));
  write_bytes(dir / "tokenizer.json", R"({"model": )");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir / "tokenizer.json"); }),
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
  EXPECT_THAT(error_of([&] { load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr)); }),
              HasSubstr("bos_token \"<bos>\" is not a token"));
}

TEST(HfSentencePieceStyle, UnsupportedPipelinesAreRejected) {
  mdi::test::ScratchDir dir;
  const json split_metaspace = {{"type", "Metaspace"}, {"replacement", "▁"}, {"split", true}};
  EXPECT_THAT(error_of([&] { load_json(dir, sentencepiece_style_tokenizer(nullptr, split_metaspace)); }),
              HasSubstr("unsupported pre_tokenizer"));
  const json lowercase = {{"type", "Lowercase"}};
  EXPECT_THAT(error_of([&] { load_json(dir, sentencepiece_style_tokenizer(lowercase, nullptr)); }),
              HasSubstr("unsupported normalizer"));
  json unknown_merge = sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr);
  unknown_merge["model"]["merges"].push_back("h x");
  EXPECT_THAT(error_of([&] { load_json(dir, unknown_merge); }),
              HasSubstr("merge 3 \"h x\": \"x\" is not in the vocab"));
}

TEST(LoadTokenizer, DirectoryLoadsTokenizerJsonThenModelThenBin) {
  mdi::test::ScratchDir dir;
  write_bytes(dir / "tokenizer.model", "not a model");
  write_bytes(dir / "tokenizer.bin", "x");
  EXPECT_EQ(load_json(dir, sentencepiece_style_tokenizer(kLlama2Normalizer, nullptr))->vocab_size(), 11);
  std::filesystem::remove(dir / "tokenizer.json");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir.path()); }),
              HasSubstr((dir / "tokenizer.model").string() + ": not a SentencePiece model"));
  std::filesystem::remove(dir / "tokenizer.model");
  EXPECT_THAT(error_of([&] { mdi::load_tokenizer(dir.path()); }),
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
