#include "common/net/kernel_random.hpp"

#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mdi {

void kernel_random_bytes(void* out, size_t bytes) {
  auto* at = static_cast<unsigned char*>(out);
  size_t got = 0;
  while (got < bytes) {
    const ssize_t n = getrandom(at + got, bytes - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(std::string("getrandom failed: ") + std::strerror(errno));
    got += static_cast<size_t>(n);
  }
}

}  // namespace mdi
