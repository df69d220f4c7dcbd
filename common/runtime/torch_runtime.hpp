#pragma once
// Process-wide LibTorch settings, applied once at start-up before any tensor op.

namespace mdi {

// Sets the CPU thread count (0: all cores) and lets oneDNN use the bf16
// instructions of this CPU: Debian's LibTorch 1.13 otherwise dies with
// "Illegal instruction" on its first bf16 matmul here. Must run before the first op.
void init_torch_runtime(int threads);

}  // namespace mdi
