#include "common/runtime/torch_runtime.hpp"

#include <cstdlib>
#include <thread>

#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

namespace mdi {

void init_torch_runtime(int threads) {
  // The user's own setting wins (setenv's last argument 0).
  ::setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_BF16", 0);
  const int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(n);
  spdlog::debug("LibTorch: {} intra-op threads", at::get_num_threads());
}

}  // namespace mdi
