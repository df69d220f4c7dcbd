// secondary: a node daemon. Serves the HTTP control plane on its communication
// port and waits for the starter's /init; then runs its layer range in the ring.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <pthread.h>

#include <csignal>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>
#include <nlohmann/json.hpp>

#include "common/net/http/control_plane.hpp"
#include "common/runtime/logging.hpp"
#include "common/runtime/secondary_node.hpp"
#include "common/runtime/torch_runtime.hpp"
#include "common/wire/nodes_config.hpp"

namespace {

struct SecondaryCli {
  std::string nodes_config;
  size_t index = 0;
  std::string chunk;
  std::string device;
  std::string dtype;
  std::string chunk_cache;
  std::vector<std::string> chunk_dirs{"models"};
  double chunk_cache_max_gib = 0;
  int threads = 0;
  int verbosity = 0;
};

// The whole nodes-config, or this secondary's own object alone (MDI-LLM accepts both).
struct OwnConfig {
  mdi::NodeEndpoint self;
  std::string auth_token;
};

OwnConfig read_own_config(const std::string& path, size_t index) {
  const nlohmann::json j = mdi::read_nodes_config_json(path);
  if (mdi::is_single_secondary_object(j))
    return {mdi::parse_secondary_only(j, path), mdi::auth_token_or_env(j.value("auth_token", std::string()))};
  auto config = mdi::parse_nodes_config(j, path);
  if (index >= config.secondaries.size())
    throw std::invalid_argument(path + " lists " + std::to_string(config.secondaries.size()) + " secondaries; there is no index " +
                                std::to_string(index));
  return {config.secondaries[index], mdi::auth_token_or_env(config.auth_token)};
}

int run(const SecondaryCli& cli) {
  // SIGINT and SIGTERM are taken by one thread (sigwait) and end the process like
  // PUT /stop; blocked before any thread starts, so every thread inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  mdi::init_torch_runtime(cli.threads);
  const OwnConfig own = read_own_config(cli.nodes_config, cli.index);

  mdi::SecondaryOptions options;
  options.secondary_index = cli.index;
  options.self = own.self;
  options.chunk_override = cli.chunk;
  options.device_override = cli.device;
  options.dtype_override = cli.dtype;
  options.chunk_cache_dir = cli.chunk_cache.empty() ? std::filesystem::temp_directory_path() /
                                                          ("mdi-chunks-" + std::to_string(own.self.control_port))
                                                    : std::filesystem::path(cli.chunk_cache);
  options.chunk_dirs.assign(cli.chunk_dirs.begin(), cli.chunk_dirs.end());
  options.chunk_cache_budget_bytes = static_cast<uint64_t>(cli.chunk_cache_max_gib * double(1ull << 30));
  mdi::SecondaryNode node(options);

  mdi::ControlServerOptions server_options;
  server_options.bind_addr = own.self.bind_addr.empty() ? own.self.addr : own.self.bind_addr;
  server_options.port = own.self.control_port;
  server_options.auth_token = own.auth_token;
  server_options.upload_dir = options.chunk_cache_dir / "incoming";
  // /status, /stop and /reset answer while one /init loads a chunk and a retried one waits for it.
  server_options.threads = 4;
  std::filesystem::create_directories(server_options.upload_dir);
  mdi::ControlServer server(server_options);
  node.register_routes(server);
  server.start();
  spdlog::info("secondary {} listening on {} (control plane{}), ring ports in {} / out {}; idle", cli.index,
               mdi::format_endpoint(server_options.bind_addr, server.port()), own.auth_token.empty() ? ", no auth token" : ", token required",
               own.self.port_in, own.self.port_out);

  std::thread signal_waiter([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    node.stop({"PUT", "/stop", {}, "", "signal"});
  });
  node.wait_for_shutdown();
  pthread_kill(signal_waiter.native_handle(), SIGTERM);  // wakes the waiter if no signal came
  signal_waiter.join();
  spdlog::info("stopped by the starter");
  server.stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  SecondaryCli cli;
  CLI::App app{
      "secondary: a node of the ring. Serves the HTTP control plane on its communication port and waits for the\n"
      "starter, which sends its layer range and chunk (POST /init, POST /chunk); runs those layers in the\n"
      "activation ring; goes back to idle after the run, or exits on PUT /stop.\n"
      "The nodes-config is MDI-LLM's file (the whole file, or this secondary's object alone)."};
  app.option_defaults()->always_capture_default();
  app.add_option("--nodes-config", cli.nodes_config, "Nodes-config JSON")->required()->check(CLI::ExistingFile);
  app.add_option("IDX", cli.index, "This secondary's index in the config's \"secondary\" list")->required();
  app.add_option("--chunk", cli.chunk, "Use this chunk file (its sha256 must match what the starter expects)");
  app.add_option("--device", cli.device, "Override the device: cpu, cuda, cuda:N");
  app.add_option("--dtype", cli.dtype, "Override the dtype: float32, bfloat16, float16");
  app.add_option("--chunk-dir", cli.chunk_dirs,
                 "A directory whose chunk files the starter's /init may name (repeatable). Files elsewhere are never read;\n"
                 "the starter uploads those chunks instead")
      ->take_all();
  app.add_option("--chunk-cache", cli.chunk_cache, "Where uploaded chunks are kept (default: a temp directory per port)");
  app.add_option("--chunk-cache-max-gib", cli.chunk_cache_max_gib,
                 "Most GiB of uploaded chunks kept; the oldest unused go first (0: as the disk allows, keeping 64 MiB free)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", cli.threads, "CPU threads for LibTorch (0: all cores)");
  app.add_flag("-v,--verbose", cli.verbosity, "More log detail (-v debug, -vv trace)");
  CLI11_PARSE(app, argc, argv);
  mdi::setup_logging(cli.verbosity, "secondary" + std::to_string(cli.index));
  try {
    return run(cli);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
