#include "common/runtime/starter_cluster.hpp"

#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "common/net/http/control_plane.hpp"
#include "common/net/kernel_random.hpp"
#include "common/wire/init_request.hpp"

namespace mdi {

uint64_t new_run_id() {
  uint64_t id = 0;
  kernel_random_bytes(&id, sizeof id);
  return id;
}

namespace fs = std::filesystem;

// One thread per secondary, so a frozen node delays no other node's renewal.
class Cluster::LeaseRenewal {
 public:
  LeaseRenewal(const Cluster& cluster, uint64_t run_id) {
    const auto every = std::max<std::chrono::milliseconds>(cluster.config_.timeouts.lease / 5, std::chrono::milliseconds(100));
    for (size_t i = 0; i < cluster.config_.secondaries.size(); ++i)
      threads_.emplace_back([this, &cluster, i, every, target = "/lease?run_id=" + std::to_string(run_id)] {
        const NodeEndpoint& node = cluster.config_.secondaries[i];
        ControlClient client(node.addr, node.control_port, cluster.config_.auth_token, every);
        std::unique_lock lock(mutex_);
        // The /init itself starts the lease, so the first renewal waits one interval
        // (and rarely reaches a node before its /init, which would answer 409).
        while (!wake_.wait_for(lock, every, [&] { return done_; })) {
          lock.unlock();
          try {
            client.request("PUT", target);  // a 409 after the node dropped the run: the /init's answer says why
          } catch (const std::exception& e) {
            spdlog::debug("{}: lease not renewed: {}", cluster.describe(i), e.what());
          }
          lock.lock();
        }
      });
  }
  ~LeaseRenewal() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  bool done_ = false;
  std::vector<std::thread> threads_;
};

Cluster::Cluster(NodesConfig config, nlohmann::json config_json) : config_(std::move(config)), config_json_(std::move(config_json)) {}

Cluster::~Cluster() = default;

void Cluster::ring_up() { lease_renewal_.reset(); }

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
  request.lease_ms = static_cast<uint64_t>(config_.timeouts.lease.count());
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
  HttpResult result{0, nullptr};
  try {
    result = request_with_retry(client, "POST", "/init", &body, config_.timeouts.http_init, describe(i));
  } catch (const ControlPlaneError&) {
    silent_[i] = 1;  // stop_all does not wait for it again; should it take the /init late, its lease runs out
    throw;
  }
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
  silent_.assign(config_.secondaries.size(), 0);
  lease_renewal_ = std::make_unique<LeaseRenewal>(*this, run_id_);
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

nlohmann::json Cluster::status_all(std::chrono::milliseconds timeout) const {
  std::vector<std::future<nlohmann::json>> pending;
  for (const NodeEndpoint& node : config_.secondaries)
    pending.push_back(std::async(std::launch::async, [&, timeout]() -> nlohmann::json {
      try {
        ControlClient client(node.addr, node.control_port, config_.auth_token, timeout);
        return client.request("GET", "/status").body;
      } catch (const std::exception& e) {
        return {{"error", e.what()}};
      }
    }));
  nlohmann::json all = nlohmann::json::object();
  for (size_t i = 0; i < pending.size(); ++i) all["secondary" + std::to_string(i)] = pending[i].get();
  return all;
}

std::string Cluster::silent_nodes() {
  const auto status = status_all();
  std::string silent;
  silent_.assign(config_.secondaries.size(), 0);
  for (size_t i = 0; i < config_.secondaries.size(); ++i) {
    silent_[i] = status["secondary" + std::to_string(i)].contains("error");
    if (silent_[i]) silent += (silent.empty() ? "" : ", ") + describe(i);
  }
  return silent;
}

void Cluster::stop_all(bool keep_nodes) {
  lease_renewal_.reset();
  const std::string target = std::string(keep_nodes ? "/stop?reset=1&" : "/stop?") + "run_id=" + std::to_string(run_id_);
  for (size_t i = 0; i < sent_init_.size(); ++i) {
    if (!sent_init_[i]) continue;
    if (i < silent_.size() && silent_[i]) {
      spdlog::info("{} did not answer, so it is not stopped; it drops the run when its lease runs out or its links break", describe(i));
      continue;
    }
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
