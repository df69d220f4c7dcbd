#pragma once
// Files that are whole or absent: a reader never sees half of one, even when the
// writer dies mid-way (results, manifests, configs).
#include <string>

namespace mdi {

// Writes `content` to `path` atomically: a temporary file beside it, then a rename.
// Throws std::runtime_error naming the path.
void write_file_atomic(const std::string& path, const std::string& content);

}  // namespace mdi
