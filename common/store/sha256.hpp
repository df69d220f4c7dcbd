#pragma once
// SHA-256 through OpenSSL's EVP interface. Digests are lower-case hex, as
// sha256sum prints them, so they can be compared with the model manifests.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX, declared here so <openssl/evp.h> stays out of headers

namespace mdi {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t bytes);
  // Finishes this message and starts the next one, so the object can be reused.
  std::string hex_digest();

 private:
  struct ContextDeleter {
    void operator()(evp_md_ctx_st* context) const;
  };
  std::unique_ptr<evp_md_ctx_st, ContextDeleter> context_;
};

// Reads the file in 1 MiB blocks, so any size costs one block of memory.
// Throws std::runtime_error naming the path when it cannot be read, when it holds
// more than `max_bytes` (a file that grows, or a device, is never hashed forever),
// or once `cancel` is set.
std::string sha256_file(const std::filesystem::path& path, uint64_t max_bytes = UINT64_MAX,
                        const std::atomic<bool>* cancel = nullptr);

}  // namespace mdi
