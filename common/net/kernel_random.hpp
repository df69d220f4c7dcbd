#pragma once
// Bytes from the kernel's CSPRNG (getrandom): run ids and Hello nonces, which a peer
// must not be able to guess from earlier ones.
#include <cstddef>

namespace mdi {

// Fills `bytes` bytes at `out`; throws std::runtime_error when the kernel refuses.
void kernel_random_bytes(void* out, size_t bytes);

}  // namespace mdi
