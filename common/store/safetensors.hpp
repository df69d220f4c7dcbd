#pragma once
// safetensors files: an 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the raw tensor bytes. Reading memory-maps the file, so opening a 100 GB
// model costs nothing and each tensor is read only when asked for.
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/store/mapped_file.hpp"

namespace mdi {

// A header larger than this is a corrupt file, not a model: real headers of
// 1000-tensor models are a few hundred KiB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// Element types this project reads and writes ("F32", "BF16", "F16", "I32", "I64").
size_t safetensors_dtype_size(const std::string& dtype);

struct TensorInfo {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t bytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Validates the header against the file size before anything is mapped: a
  // corrupt or truncated file throws CheckpointError naming the path and problem.
  explicit SafetensorsFile(const std::filesystem::path& path);
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const TensorInfo& at(const std::string& name) const;  // throws naming the file and tensor
  const uint8_t* data(const TensorInfo& info) const { return data_ + info.offset; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::filesystem::path path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  MappedFile file_;
  const uint8_t* data_ = nullptr;  // the data section, within file_
};

// Writes a safetensors file one tensor at a time, in the order declared, so a
// conversion never holds more than one tensor. Bytes go to "<path>.partial",
// renamed over `path` by commit(): a failed run leaves nothing that looks complete.
class SafetensorsWriter {
 public:
  struct Entry {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
  };
  SafetensorsWriter(const std::filesystem::path& path, std::vector<Entry> entries,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  void write(const std::string& name, const void* data, uint64_t bytes);
  // Returns the sha256 of the whole file.
  std::string commit();
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint64_t total_bytes_ = 0;
};

}  // namespace mdi
