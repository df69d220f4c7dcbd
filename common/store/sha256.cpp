#include "common/store/sha256.hpp"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace mdi {
namespace {

constexpr size_t kFileBlockBytes = 1 << 20;

void check(int openssl_result, const char* call) {
  if (openssl_result != 1) throw std::runtime_error(std::string("SHA-256: OpenSSL ") + call + " failed");
}

}  // namespace

void Sha256::ContextDeleter::operator()(evp_md_ctx_st* context) const { EVP_MD_CTX_free(context); }

Sha256::Sha256() : context_(EVP_MD_CTX_new()) {
  if (!context_) throw std::runtime_error("SHA-256: out of memory for an OpenSSL digest context");
  check(EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr), "EVP_DigestInit_ex");
}

void Sha256::update(const void* data, size_t bytes) {
  check(EVP_DigestUpdate(context_.get(), data, bytes), "EVP_DigestUpdate");
}

std::string Sha256::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  check(EVP_DigestFinal_ex(context_.get(), digest, &length), "EVP_DigestFinal_ex");
  check(EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr), "EVP_DigestInit_ex");
  static constexpr char kHexDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * length);
  for (unsigned int i = 0; i < length; ++i) {
    hex += kHexDigits[digest[i] >> 4];
    hex += kHexDigits[digest[i] & 0xf];
  }
  return hex;
}

std::string sha256_file(const std::filesystem::path& path, uint64_t max_bytes, const std::atomic<bool>* cancel) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw std::runtime_error("cannot open " + path.string() + " to hash it: " + std::strerror(errno));
  Sha256 hash;
  std::vector<char> block(kFileBlockBytes);
  size_t bytes_read;
  uint64_t total = 0;
  while ((bytes_read = std::fread(block.data(), 1, block.size(), file.get())) > 0) {
    if (cancel && *cancel) throw std::runtime_error("hashing " + path.string() + " was cancelled");
    total += bytes_read;
    if (total > max_bytes)
      throw std::runtime_error(path.string() + " holds more than the " + std::to_string(max_bytes) + " bytes expected; not hashing further");
    hash.update(block.data(), bytes_read);
  }
  if (std::ferror(file.get())) throw std::runtime_error("cannot read " + path.string() + " to hash it: " + std::strerror(errno));
  return hash.hex_digest();
}

}  // namespace mdi
