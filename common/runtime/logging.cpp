#include "common/runtime/logging.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace mdi {

void setup_logging(int verbosity, const std::string& node_name) {
  auto logger = spdlog::stderr_color_mt(node_name);
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("[%H:%M:%S.%e] [%n] [%^%l%$] %v");
  spdlog::set_level(verbosity <= 0 ? spdlog::level::info : verbosity == 1 ? spdlog::level::debug : spdlog::level::trace);
}

}  // namespace mdi
