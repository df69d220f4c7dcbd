// SentencePiece tokenizer.model: a serialized ModelProto (sentencepiece_model.proto),
// read with a small protobuf wire-format reader rather than libsentencepiece,
// whose embedded protobuf clashes with LibTorch's libprotobuf in one process.
#include <cstdint>
#include <cstring>
#include <string_view>

#include "common/model/tokenizer/sentencepiece_bpe.hpp"
#include "common/model/tokenizer/utf8.hpp"

namespace mdi::tokenizer_detail {
namespace {

class ProtoReader {
 public:
  enum WireType { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };
  struct Field {
    uint64_t number;
    int wire_type;
    size_t at;  // file offset of its key
  };

  // `start`: where `data` begins in the file, for error messages.
  ProtoReader(const fs::path& path, std::string_view data, size_t start) : path_(path), data_(data), start_(start) {}

  bool at_end() const { return pos_ == data_.size(); }

  Field next_field() {
    const size_t at = offset();
    const uint64_t key = varint();
    const Field field{key >> 3, static_cast<int>(key & 7), at};
    if (field.number == 0) corrupt("field number 0", at);
    if (field.wire_type == 3 || field.wire_type == 4 || field.wire_type > 5) {
      corrupt("field " + std::to_string(field.number) + " with unsupported wire type " +
                  std::to_string(field.wire_type),
              at);
    }
    return field;
  }

  uint64_t varint_field(const Field& field) {
    expect(field, kVarint);
    return varint();
  }
  int32_t int32_field(const Field& field) { return static_cast<int32_t>(varint_field(field)); }
  bool bool_field(const Field& field) { return varint_field(field) != 0; }

  float float_field(const Field& field) {
    expect(field, kFixed32);
    const std::string_view bytes = take(4, "float");
    const uint32_t bits = static_cast<uint32_t>(static_cast<uint8_t>(bytes[0])) |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[1])) << 8 |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[2])) << 16 |
                          static_cast<uint32_t>(static_cast<uint8_t>(bytes[3])) << 24;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
  }

  std::string_view bytes_field(const Field& field) {
    expect(field, kLengthDelimited);
    const size_t at = offset();
    const uint64_t length = varint();
    if (length > data_.size() - pos_) {
      corrupt("field " + std::to_string(field.number) + " announces " + std::to_string(length) + " bytes, " +
                  std::to_string(data_.size() - pos_) + " left",
              at);
    }
    return take(length, "");
  }

  ProtoReader message_field(const Field& field) {
    const std::string_view bytes = bytes_field(field);
    return ProtoReader(path_, bytes, start_ + static_cast<size_t>(bytes.data() - data_.data()));
  }

  void skip(const Field& field) {
    switch (field.wire_type) {
      case kVarint: varint(); break;
      case kFixed64: take(8, "64-bit field"); break;
      case kLengthDelimited: bytes_field(field); break;
      case kFixed32: take(4, "32-bit field"); break;
    }
  }

  [[noreturn]] void corrupt(const std::string& problem, size_t at) const {
    fail(path_, "not a SentencePiece model: " + problem + " at byte " + std::to_string(at));
  }

 private:
  size_t offset() const { return start_ + pos_; }

  uint64_t varint() {
    const size_t at = offset();
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ == data_.size()) corrupt("truncated varint", at);
      const auto byte = static_cast<uint8_t>(data_[pos_++]);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return value;
    }
    corrupt("varint longer than 10 bytes", at);
  }

  std::string_view take(size_t n, const char* what) {
    if (n > data_.size() - pos_) corrupt(std::string("truncated ") + what, offset());
    const std::string_view bytes = data_.substr(pos_, n);
    pos_ += n;
    return bytes;
  }

  void expect(const Field& field, WireType wire_type) const {
    if (field.wire_type != wire_type) {
      corrupt("field " + std::to_string(field.number) + " has wire type " + std::to_string(field.wire_type) +
                  ", expected " + std::to_string(wire_type),
              field.at);
    }
  }

  const fs::path& path_;
  std::string_view data_;
  size_t start_;
  size_t pos_ = 0;
};

class SentencePieceModelTokenizer : public SentencePieceBpeTokenizer {
 public:
  explicit SentencePieceModelTokenizer(const fs::path& path) : SentencePieceBpeTokenizer(path) {
    const std::string data = read_file_bytes(path);
    ProtoReader model(path, data, 0);
    Trainer trainer;
    Normalizer normalizer;
    bool has_trainer_spec = false;
    while (!model.at_end()) {  // ModelProto
      const ProtoReader::Field field = model.next_field();
      if (field.number == 1) {
        read_piece(model.message_field(field), field.at);
      } else if (field.number == 2) {
        read_trainer(model.message_field(field), trainer);
        has_trainer_spec = true;
      } else if (field.number == 3) {
        read_normalizer(model.message_field(field), normalizer);
      } else {
        model.skip(field);
      }
    }
    if (pieces_.empty()) fail(path, "not a SentencePiece model: no pieces");
    if (!has_trainer_spec) fail(path, "not a SentencePiece model: no trainer_spec (truncated?)");

    if (trainer.model_type != kBpe) {
      const char* const names[] = {"UNIGRAM", "BPE", "WORD", "CHAR"};
      const std::string type = trainer.model_type >= 1 && trainer.model_type <= 4
                                   ? names[trainer.model_type - 1]
                                   : "model_type " + std::to_string(trainer.model_type);
      fail(path, "only BPE SentencePiece models are supported; this one is " + type);
    }
    if (trainer.treat_whitespace_as_suffix) fail(path, "unsupported treat_whitespace_as_suffix");
    if (!normalizer.precompiled_charsmap.empty()) {
      fail(path, "unsupported normalization rule \"" + normalizer.name + "\" (only identity is)");
    }
    if (!normalizer.escape_whitespaces) fail(path, "unsupported escape_whitespaces false");
    rules_ = {normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces, true};
    byte_fallback_ = trainer.byte_fallback;

    // The checks SentencePiece makes on loading.
    for (size_t id = 0; id < pieces_.size(); ++id) {
      const ScoredPiece& piece = pieces_[id];
      const std::string what = "piece " + std::to_string(id) + " \"" + piece.text + "\"";
      if (piece.type == PieceType::kUnknown) {
        if (unk_id_ >= 0) fail(path, what + ": a second unknown piece");
        unk_id_ = static_cast<int>(id);
      } else if (piece.type == PieceType::kByte) {
        const auto byte = byte_fallback_value(piece.text);
        if (!byte) fail(path, what + " is a byte piece but not <0xNN>");
        if (!byte_fallback_) fail(path, what + " is a byte piece, but byte_fallback is off");
        byte_ids_[static_cast<uint8_t>(*byte)] = static_cast<int>(id);
      }
    }
    if (unk_id_ < 0) fail(path, "no unknown piece");
    bos_id_ = special_id(trainer.bos_id, "bos_id");
    eos_id_ = special_id(trainer.eos_id, "eos_id");
    index(true);
  }

 private:
  static constexpr uint64_t kBpe = 2;

  struct Trainer {  // the TrainerSpec fields that encoding depends on, with their defaults
    uint64_t model_type = 1;  // UNIGRAM
    bool treat_whitespace_as_suffix = false;
    bool byte_fallback = false;
    int32_t bos_id = 1;
    int32_t eos_id = 2;
  };
  struct Normalizer {  // NormalizerSpec
    std::string name;
    std::string precompiled_charsmap;
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = true;
    bool escape_whitespaces = true;
  };

  void read_piece(ProtoReader message, size_t at) {
    ScoredPiece piece;
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      if (field.number == 1) {
        piece.text = replace_all(std::string(message.bytes_field(field)), kSentencePieceSpace, " ");
      } else if (field.number == 2) {
        piece.score = message.float_field(field);
      } else if (field.number == 3) {
        const uint64_t type = message.varint_field(field);
        if (type < 1 || type > 6) message.corrupt("piece type " + std::to_string(type), field.at);
        piece.type = static_cast<PieceType>(type);
      } else {
        message.skip(field);
      }
    }
    if (piece.text.empty()) message.corrupt("empty piece " + std::to_string(pieces_.size()), at);
    pieces_.push_back(std::move(piece));
  }

  static void read_trainer(ProtoReader message, Trainer& trainer) {
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      switch (field.number) {
        case 3: trainer.model_type = message.varint_field(field); break;
        case 24: trainer.treat_whitespace_as_suffix = message.bool_field(field); break;
        case 35: trainer.byte_fallback = message.bool_field(field); break;
        case 41: trainer.bos_id = message.int32_field(field); break;
        case 42: trainer.eos_id = message.int32_field(field); break;
        default: message.skip(field);
      }
    }
  }

  static void read_normalizer(ProtoReader message, Normalizer& normalizer) {
    while (!message.at_end()) {
      const ProtoReader::Field field = message.next_field();
      switch (field.number) {
        case 1: normalizer.name = message.bytes_field(field); break;
        case 2: normalizer.precompiled_charsmap = message.bytes_field(field); break;
        case 3: normalizer.add_dummy_prefix = message.bool_field(field); break;
        case 4: normalizer.remove_extra_whitespaces = message.bool_field(field); break;
        case 5: normalizer.escape_whitespaces = message.bool_field(field); break;
        default: message.skip(field);
      }
    }
  }

  int special_id(int32_t id, const char* name) const {
    if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) {
      fail(path_, std::string("trainer_spec ") + name + " " + std::to_string(id) + " is not one of the " +
                      std::to_string(pieces_.size()) + " pieces");
    }
    return id;
  }
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const fs::path& path) {
  return std::make_unique<SentencePieceModelTokenizer>(path);
}

}  // namespace mdi::tokenizer_detail
