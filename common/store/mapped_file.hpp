#pragma once
// A read-only memory map of a whole file: opening a 100 GB model costs nothing,
// and each page is read from disk only when a tensor is asked for.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>

namespace mdi {

// A model file that cannot be read as what it claims to be; the message names the file.
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class MappedFile {
 public:
  // Throws CheckpointError naming the path when it cannot be opened or mapped.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }  // nullptr for an empty file
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace mdi
