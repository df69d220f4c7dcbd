#pragma once
#include <string>

namespace mdi {

// Logs go to stderr (stdout carries generated text), prefixed by the node's
// name. verbosity: 0 info, 1 debug (-v), 2+ trace (-vv).
void setup_logging(int verbosity, const std::string& node_name);

}  // namespace mdi
