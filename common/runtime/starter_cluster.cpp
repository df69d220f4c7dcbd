#include "common/runtime/starter_cluster.hpp"

#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <future>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "common/net/http/control_plane.hpp"
#include "common/wire/init_request.hpp"

namespace mdi {

// From the kernel's CSPRNG: a run id must not be guessable from an earlier one.
uint64_t new_run_id() {
  uint64_t id = 0;
  auto* bytes = reinterpret_cast<unsigned char*>(&id);
  size_t got = 0;
  while (got < sizeof id) {
    const ssize_t n = getrandom(bytes + got, sizeof id - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(std::string("new_run_id: getrandom failed: ") + std::strerror(errno));
    got += static_cast<size_t>(n);
  }
  return id;
}

namespace fs = std::filesystem;

Cluster::Cluster(NodesConfig config, nlohmann::json config_json) : config_(std::move(config)), config_json_(std::move(config_json)) {}

std::string Cluster::describe(size_t i) const {
  const NodeEndpoint& node = config_.secondaries.at(i);
  return "secondary " + std::to_string(i) + " (" + format_endpoint(node.addr, node.control_port) + ")";
}

void Cluster::init_one(size_t i, const ChunkManifest& manifest, const fs::path& chunk_dir, const RunSettings& settings) {
  const NodeEndpoint& node = config_.secondaries[i];
  const ChunkEntry& entry = manifest.secondary(static_cast<int64_t>(i));
  const fs::path chunk_file = fs::absolute(chunk_dir / entry.file);
  ControlClient client(node.addr, node.control_port, config_.auth_token, config_.timeouts.http_init);

  InitRequest request;
  request.run_id = settings.run_id;
  request.ring_index = i + 1;
  request.nodes_json = config_json_;
  request.nodes = config_;
  request.model = manifest.model;
  request.layer_begin = entry.layer_begin;
  request.layer_end = entry.layer_end;
  request.dtype = settings.dtype;
  request.device = settings.device;
  request.max_seq_len = settings.max_seq_len;
  request.max_frame_bytes = config_.max_frame_bytes;
  request.chunk_sha256 = entry.sha256;
  request.chunk_path = settings.upload_chunks ? "" : chunk_file.string();
  request.chunk_bytes = entry.bytes;
  request.interpretability = settings.interpretability.for_layers(entry.layer_begin, entry.layer_end);
  if (!settings.training.empty()) request.training = settings.training.at(i);
  const nlohmann::json body = request.to_json();

  auto upload = [&] {
    spdlog::info("{}: uploading {} ({:.1f} MiB)", describe(i), chunk_file.string(), double(entry.bytes) / (1 << 20));
    auto result = client.upload_file("POST", "/chunk?sha256=" + entry.sha256, chunk_file);
    if (result.status != 200)
      throw ClusterError(describe(i) + ": chunk upload refused (" + std::to_string(result.status) + "): " + result.body.value("error", result.body.dump()));
  };
  sent_init_[i] = 1;  // from here on the node may hold our run, and only ours is stopped
  auto result = request_with_retry(client, "POST", "/init", &body, config_.timeouts.http_init);
  if (result.status == 404 && result.body.value("need_upload", false)) {
    upload();
    result = client.request("POST", "/init", &body);
  }
  if (result.status != 200)
    throw ClusterError(describe(i) + ": /init refused (" + std::to_string(result.status) + "): " + result.body.value("error", result.body.dump()));
  spdlog::info("{}: ready with layers [{}, {})", describe(i), entry.layer_begin, entry.layer_end);
}

void Cluster::init_all(const ChunkManifest& manifest, const fs::path& chunk_dir, const RunSettings& settings) {
  run_id_ = settings.run_id;
  sent_init_.assign(config_.secondaries.size(), 0);
  std::vector<std::future<void>> pending;
  for (size_t i = 0; i < config_.secondaries.size(); ++i)
    pending.push_back(std::async(std::launch::async, [&, i] { init_one(i, manifest, chunk_dir, settings); }));
  std::string failures;
  for (auto& p : pending) {
    try {
      p.get();
    } catch (const std::exception& e) {
      failures += (failures.empty() ? "" : "; ") + std::string(e.what());
    }
  }
  if (!failures.empty()) throw ClusterError(failures);
}

nlohmann::json Cluster::status_all() const {
  nlohmann::json all = nlohmann::json::object();
  for (size_t i = 0; i < config_.secondaries.size(); ++i) {
    const NodeEndpoint& node = config_.secondaries[i];
    try {
      ControlClient client(node.addr, node.control_port, config_.auth_token, std::chrono::seconds(5));
      all["secondary" + std::to_string(i)] = client.request("GET", "/status").body;
    } catch (const std::exception& e) {
      all["secondary" + std::to_string(i)] = {{"error", e.what()}};
    }
  }
  return all;
}

void Cluster::stop_all(bool keep_nodes) const {
  const std::string target = std::string(keep_nodes ? "/stop?reset=1&" : "/stop?") + "run_id=" + std::to_string(run_id_);
  for (size_t i = 0; i < sent_init_.size(); ++i) {
    if (!sent_init_[i]) continue;
    const NodeEndpoint& node = config_.secondaries[i];
    try {
      ControlClient client(node.addr, node.control_port, config_.auth_token, std::chrono::seconds(15));
      auto result = client.request("PUT", target);
      if (result.status == 409)
        spdlog::info("{} is in another run, left as it is: {}", describe(i), result.body.value("error", result.body.dump()));
      else if (result.status != 200)
        spdlog::warn("{}: stop answered {}: {}", describe(i), result.status, result.body.value("error", result.body.dump()));
    } catch (const std::exception& e) {
      spdlog::warn("{}: could not be stopped: {}", describe(i), e.what());
    }
  }
}

}  // namespace mdi
