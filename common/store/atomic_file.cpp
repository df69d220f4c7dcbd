#include "common/store/atomic_file.hpp"

#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace mdi {

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(path + ": cannot open for writing");
    out << content;
    if (!out) throw std::runtime_error(path + ": write failed");
  }
  std::filesystem::rename(partial, path);
}

}  // namespace mdi
