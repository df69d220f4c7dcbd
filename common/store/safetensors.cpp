#include "common/store/safetensors.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/store/sha256.hpp"

namespace mdi {

namespace {

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& problem) {
  throw CheckpointError(path.string() + ": " + problem);
}
}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "BF16" || dtype == "F16") return 2;
  if (dtype == "I64" || dtype == "F64") return 8;
  if (dtype == "U8" || dtype == "I8" || dtype == "BOOL") return 1;
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path), file_(path) {
  const uint64_t file_size = file_.size();
  if (file_size < 8) fail(path, "truncated safetensors file (" + std::to_string(file_size) + " bytes, no header length)");
  const uint8_t* bytes = file_.data();
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxSafetensorsHeaderBytes || header_len > file_size - 8)
    fail(path, "corrupt safetensors header: header length " + std::to_string(header_len) + " exceeds the file size " +
                   std::to_string(file_size));
  data_ = bytes + 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const std::exception& e) {
    fail(path, std::string("corrupt safetensors header: ") + e.what());
  }
  if (!header.is_object()) fail(path, "corrupt safetensors header: not a JSON object");
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (entry.is_object())
        for (auto& [k, v] : entry.items())
          if (v.is_string()) metadata_[k] = v.get<std::string>();
      continue;
    }
    const std::string where = "tensor \"" + name + "\"";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail(path, "corrupt safetensors header: " + where + " lacks dtype, shape or data_offsets");
    TensorInfo info;
    info.name = name;
    info.dtype = entry["dtype"].get<std::string>();
    const size_t elem = safetensors_dtype_size(info.dtype);
    if (elem == 0) fail(path, where + " has unsupported dtype " + info.dtype);
    uint64_t numel = 1;
    for (auto& d : entry["shape"]) {
      if (!d.is_number_unsigned()) fail(path, "corrupt safetensors header: " + where + " has a bad shape");
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > data_size / dim) fail(path, where + " shape does not fit in the file");
      numel *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    auto offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      fail(path, "corrupt safetensors header: " + where + " has bad data_offsets");
    uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_size)
      fail(path, "truncated or corrupt file: " + where + " spans bytes [" + std::to_string(begin) + ", " +
                     std::to_string(end) + ") but the data section holds " + std::to_string(data_size));
    if (end - begin != numel * elem)
      fail(path, "corrupt safetensors header: " + where + " holds " + std::to_string(end - begin) +
                     " bytes but its shape and dtype need " + std::to_string(numel * elem));
    info.offset = begin;
    info.bytes = end - begin;
    index_[name] = tensors_.size();
    tensors_.push_back(std::move(info));
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  const TensorInfo* info = find(name);
  if (!info) fail(path_, "has no tensor \"" + name + "\"");
  return *info;
}

struct SafetensorsWriter::Impl {
  std::filesystem::path path, partial;
  std::ofstream out;
  std::vector<Entry> entries;
  std::vector<uint64_t> sizes;
  size_t next = 0;
  Sha256 hash;
  bool committed = false;
};

SafetensorsWriter::SafetensorsWriter(const std::filesystem::path& path, std::vector<Entry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->partial = path.string() + ".partial";
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& e : entries) {
    uint64_t bytes = safetensors_dtype_size(e.dtype);
    if (bytes == 0) throw CheckpointError(path.string() + ": cannot write dtype " + e.dtype);
    for (auto d : e.shape) bytes *= static_cast<uint64_t>(d);
    header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + bytes}}};
    impl_->sizes.push_back(bytes);
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned for mmap readers
  impl_->entries = std::move(entries);
  std::filesystem::create_directories(path.parent_path().empty() ? "." : path.parent_path());
  impl_->out.open(impl_->partial, std::ios::binary | std::ios::trunc);
  if (!impl_->out) throw CheckpointError(impl_->partial.string() + ": cannot open for writing");
  uint8_t len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  impl_->out.write(reinterpret_cast<const char*>(len), 8);
  impl_->out.write(text.data(), static_cast<std::streamsize>(text.size()));
  impl_->hash.update(len, 8);
  impl_->hash.update(text.data(), text.size());
  total_bytes_ = 8 + text.size() + offset;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (!impl_->committed) {
    impl_->out.close();
    std::error_code ec;
    std::filesystem::remove(impl_->partial, ec);
  }
}

void SafetensorsWriter::write(const std::string& name, const void* data, uint64_t bytes) {
  if (impl_->next >= impl_->entries.size() || impl_->entries[impl_->next].name != name)
    throw CheckpointError(impl_->path.string() + ": tensor \"" + name + "\" written out of the declared order");
  if (bytes != impl_->sizes[impl_->next])
    throw CheckpointError(impl_->path.string() + ": tensor \"" + name + "\" has " + std::to_string(bytes) +
                          " bytes, declared " + std::to_string(impl_->sizes[impl_->next]));
  impl_->out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!impl_->out) throw CheckpointError(impl_->partial.string() + ": write failed (disk full?)");
  impl_->hash.update(data, bytes);
  ++impl_->next;
}

std::string SafetensorsWriter::commit() {
  if (impl_->next != impl_->entries.size())
    throw CheckpointError(impl_->path.string() + ": commit after " + std::to_string(impl_->next) + " of " +
                          std::to_string(impl_->entries.size()) + " tensors");
  impl_->out.flush();
  impl_->out.close();
  if (!impl_->out) throw CheckpointError(impl_->partial.string() + ": write failed (disk full?)");
  std::filesystem::rename(impl_->partial, impl_->path);
  impl_->committed = true;
  return impl_->hash.hex_digest();
}

}  // namespace mdi
