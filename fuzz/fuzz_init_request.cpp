// libFuzzer target: the POST /init body parser (common/wire/init_request.cpp), which a
// secondary runs on whatever the network sends (common/runtime/secondary_node.cpp). Bytes
// are parsed as JSON (malformed JSON is a 400 before InitRequest::parse runs), then
// parsed as an InitRequest. Only InitRequestError and nlohmann's exceptions may
// escape; anything else reaches libFuzzer as a crash. An accepted request must
// satisfy the documented bounds and survive to_json() -> parse() unchanged.
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "common/wire/init_request.hpp"

namespace {

[[noreturn]] void bug(const char* what) {
  std::fprintf(stderr, "fuzz_init_request: %s\n", what);
  std::abort();
}
void check(bool ok, const char* what) {
  if (!ok) bug(what);
}

void check_request(const mdi::InitRequest& r) {
  check(r.ring_index >= 1 && r.ring_index < r.nodes.n_nodes(), "ring_index is not a secondary");
  check(r.layer_begin >= 0 && r.layer_begin < r.layer_end && r.layer_end <= r.model.n_layers, "impossible layers");
  check(r.dtype == "float32" || r.dtype == "bfloat16" || r.dtype == "float16", "unknown dtype");
  check(r.max_seq_len >= 1 && r.max_seq_len <= r.model.max_seq_len, "max_seq_len out of range");
  check(r.chunk_sha256.size() == 64 && std::all_of(r.chunk_sha256.begin(), r.chunk_sha256.end(),
                                                   [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }),
        "chunk.sha256 is not 64 hex digits");
  check(r.model.n_heads > 0 && r.model.dim % r.model.n_heads == 0, "model config not validated");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  mdi::InitRequest r;
  try {
    r = mdi::InitRequest::parse(j);
  } catch (const mdi::InitRequestError&) {
    return 0;
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  check_request(r);
  // What the starter sends for an accepted request must be accepted the same.
  const nlohmann::json sent = r.to_json();
  mdi::InitRequest back;
  try {
    back = mdi::InitRequest::parse(sent);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_init_request: to_json() of an accepted request is rejected: %s\n", e.what());
    std::abort();
  }
  check(back.to_json() == sent, "to_json() -> parse() -> to_json() changed the request");
  return 0;
}
