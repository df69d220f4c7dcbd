#include "common/runtime/secondary_node.hpp"

#include <spdlog/spdlog.h>

#include "common/net/ring_setup.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/sha256.hpp"

namespace mdi {

namespace fs = std::filesystem;

const char* SecondaryNode::state_name(State state) {
  switch (state) {
    case State::idle: return "idle";
    case State::loading: return "loading";
    case State::ready: return "ready";
    case State::running: return "running";
  }
  return "?";
}

SecondaryNode::SecondaryNode(SecondaryOptions options) : options_(std::move(options)) {
  fs::create_directories(options_.chunk_cache_dir);
}

SecondaryNode::~SecondaryNode() { end_run(); }

void SecondaryNode::register_routes(ControlServer& server) {
  server.route("GET", "/status", [this](const HttpRequest& r) { return status(r); });
  server.route("POST", "/init", [this](const HttpRequest& r) { return init(r); });
  server.route("PUT", "/stop", [this](const HttpRequest& r) { return stop(r); });
  server.route("POST", "/reset", [this](const HttpRequest& r) { return reset(r); });
  server.upload_route("POST", "/chunk", [this](const HttpRequest& head, const fs::path& file, const std::string& sha) {
    return upload_chunk(head, file, sha);
  });
}

void SecondaryNode::wait_for_shutdown() {
  std::unique_lock lock(mutex_);
  shutdown_cv_.wait(lock, [&] { return shutdown_; });
}

std::optional<fs::path> SecondaryNode::find_chunk(const InitRequest& request, std::string& problem) const {
  // A file named on this node's command line, or by the starter, must hold what the starter expects.
  for (const fs::path& path : {options_.chunk_override, fs::path(request.chunk_path)}) {
    std::error_code error;
    const fs::file_status kind = path.empty() ? fs::file_status{} : fs::status(path, error);
    if (!fs::exists(kind)) continue;
    // A directory cannot be hashed, and a device (/dev/zero) would be hashed forever.
    if (!fs::is_regular_file(kind)) {
      problem = "chunk " + path.string() + " is not a regular file; name a chunk .safetensors file or upload it with POST /chunk";
      return std::nullopt;
    }
    std::string digest;
    try {
      digest = sha256_file(path);
    } catch (const std::exception& e) {
      problem = "chunk " + path.string() + " cannot be read (" + e.what() + "); fix its permissions or upload it with POST /chunk";
      return std::nullopt;
    }
    if (digest != request.chunk_sha256) {
      problem = "chunk " + path.string() + " has sha256 " + digest + ", the starter expects " + request.chunk_sha256 +
                " (a different model or split?)";
      return std::nullopt;
    }
    return path;
  }
  // Uploaded chunks were checked on arrival and are named by their digest.
  const fs::path cached = options_.chunk_cache_dir / (request.chunk_sha256 + ".safetensors");
  if (fs::exists(cached)) return cached;
  problem = "no chunk with sha256 " + request.chunk_sha256 + " on this node; upload it with POST /chunk?sha256=" + request.chunk_sha256;
  return std::nullopt;
}

HttpResponse SecondaryNode::init(const HttpRequest& http) {
  InitRequest request;
  try {
    request = InitRequest::parse(parse_json_body(http));
  } catch (const InitRequestError& e) {
    return {400, {{"error", e.what()}}};
  }
  const size_t my_ring_index = options_.secondary_index + 1;
  if (request.ring_index != my_ring_index)
    return {400, {{"error", "/init is for ring index " + std::to_string(request.ring_index) + ", this is secondary " +
                                std::to_string(options_.secondary_index) + " (ring index " + std::to_string(my_ring_index) + ")"}}};
  const NodeEndpoint& me = request.nodes.node(my_ring_index);
  if (me.port_in != options_.self.port_in || me.port_out != options_.self.port_out)
    return {400, {{"error", "the starter's nodes-config gives this node ports in/out " + std::to_string(me.port_in) + "/" +
                                std::to_string(me.port_out) + ", its own gives " + std::to_string(options_.self.port_in) + "/" +
                                std::to_string(options_.self.port_out)}}};
  {
    std::lock_guard lock(mutex_);
    if (state_ != State::idle)
      return {409, {{"error", std::string("a run is already going (state ") + state_name(state_) + ", run " + std::to_string(run_id_) + ")"}}};
    state_ = State::loading;
    run_id_ = request.run_id;
    last_error_.clear();
  }
  if (ring_thread_.joinable()) ring_thread_.join();  // a finished run's thread

  auto back_to_idle = [&](int status, const std::string& error, nlohmann::json extra = {}) {
    std::lock_guard lock(mutex_);
    state_ = State::idle;
    last_error_ = error;
    spdlog::warn("/init refused: {}", error);
    extra["error"] = error;
    return HttpResponse{status, extra};
  };
  std::string problem;
  auto chunk_file = find_chunk(request, problem);
  if (!chunk_file) {
    const bool need_upload = problem.rfind("no chunk", 0) == 0;
    return back_to_idle(need_upload ? 404 : 400, problem, {{"need_upload", need_upload}});
  }
  try {
    const std::string device_text = !options_.device_override.empty() ? options_.device_override
                                    : !request.device.empty()        ? request.device
                                    : !options_.self.device.empty()   ? options_.self.device
                                                                      : "cpu";
    const torch::Device device = parse_device(device_text);
    const torch::ScalarType dtype = parse_dtype(options_.dtype_override.empty() ? request.dtype : options_.dtype_override);
    if (request.training && dtype != torch::kFloat32)
      return back_to_idle(400, "training runs in float32; this node was started with --dtype " + options_.dtype_override);
    const std::string key = request.chunk_sha256 + " " + std::to_string(request.layer_begin) + "-" + std::to_string(request.layer_end) +
                            " " + device.str() + " " + dtype_name(dtype);
    if (key != chunk_key_) {
      chunk_.reset();
      ModelConfig config = request.model;
      auto reader = open_safetensors(config, {*chunk_file}, std::nullopt, "chunk " + chunk_file->string());
      spdlog::info("loading layers [{}, {}) from {} to {} as {}", request.layer_begin, request.layer_end, chunk_file->string(),
                   device.str(), dtype_name(dtype));
      chunk_ = std::make_unique<ModelChunk>(load_chunk(*reader, {{request.layer_begin, request.layer_end}, false, false}, device, dtype));
      chunk_key_ = key;
    } else {
      spdlog::info("reusing the loaded layers [{}, {})", request.layer_begin, request.layer_end);
    }
  } catch (const std::exception& e) {
    chunk_key_.clear();
    return back_to_idle(400, e.what());
  }
  {
    std::lock_guard lock(mutex_);
    state_ = State::ready;
    stats_ = std::make_shared<StageStats>();
    training_status_ = request.training ? std::make_shared<SecondaryTrainingStatus>() : nullptr;
    cancel_ = false;
  }
  ring_thread_ = std::thread([this, request] { run_ring(request); });
  return {200, {{"state", "ready"}, {"run_id", request.run_id}, {"layers", {request.layer_begin, request.layer_end}},
                {"parameter_bytes", chunk_->parameter_bytes()}}};
}

void SecondaryNode::run_ring(InitRequest request) {
  const size_t ring_index = options_.secondary_index + 1;
  try {
    LinkOptions link_options;
    link_options.on_error = [](const std::string& error) { spdlog::error("{}", error); };
    link_options.setup_cancel = &cancel_;
    RingLinks links = connect_ring(request.nodes, ring_index, request.run_id, link_options);
    {
      std::lock_guard lock(mutex_);
      state_ = State::running;
      links_ = &links;
    }
    spdlog::info("ring up: {} → us → {}", links.from_prev->peer(), links.to_next->peer());
    // /status keeps reporting the run's link figures once the links are gone.
    auto detach_links = [&] {
      std::lock_guard lock(mutex_);
      last_link_stats_ = {links.from_prev->stats(), links.to_next->stats()};
      links_ = nullptr;
    };
    try {
      if (request.training) {
        spdlog::info("training layers [{}, {}): {}, {} micro-batches, steps {}..{}", request.layer_begin, request.layer_end,
                     schedule_name(request.training->schedule), request.training->micro_batches, request.training->first_step,
                     request.training->steps);
        const NodeEndpoint& starter = request.nodes.starter;
        ControlClient to_starter(starter.addr, starter.control_port, request.nodes.auth_token, request.nodes.timeouts.http_init);
        auto upload = [&](int64_t step, const fs::path& file, const std::string& sha256) {
          const auto result = to_starter.upload_file("POST", "/stage?step=" + std::to_string(step) + "&node=secondary" +
                                                                 std::to_string(options_.secondary_index) + "&sha256=" + sha256, file);
          if (result.status != 200)
            throw ControlPlaneError("the starter (" + format_endpoint(starter.addr, starter.control_port) + ") refused the stage of step " +
                                    std::to_string(step) + ": " + result.body.value("error", result.body.dump()));
        };
        run_secondary_training(*chunk_, links, *request.training, ring_index, request.nodes.n_nodes(), *training_status_, cancel_,
                               request.nodes.timeouts.receive, upload);
      } else {
        std::optional<LayerProbes> probes;
        if (!request.interpretability.empty()) {
          probes.emplace(request.interpretability, *chunk_);
          spdlog::info("capturing {} layers, {} interventions", request.interpretability.capture.layers.size(),
                       request.interpretability.interventions.size());
        }
        run_secondary_stage(*chunk_, links, *stats_, cancel_, request.nodes.timeouts.receive, probes ? &*probes : nullptr);
      }
    } catch (...) {
      detach_links();
      throw;
    }
    detach_links();
  } catch (const std::exception& e) {
    spdlog::error("run {} ended: {}", request.run_id, e.what());
    std::lock_guard lock(mutex_);
    last_error_ = e.what();
  }
  std::lock_guard lock(mutex_);
  // trained weights moved away from the chunk file: the next run loads the file again
  if (request.training) chunk_key_.clear();
  state_ = State::idle;
  spdlog::info("run {} over; idle", request.run_id);
}

void SecondaryNode::end_run() {
  cancel_ = true;
  if (ring_thread_.joinable()) ring_thread_.join();
  std::lock_guard lock(mutex_);
  state_ = State::idle;
}

HttpResponse SecondaryNode::status(const HttpRequest&) const {
  std::lock_guard lock(mutex_);
  nlohmann::json j = {{"state", state_name(state_)}, {"run_id", run_id_}, {"secondary_index", options_.secondary_index}};
  if (!last_error_.empty()) j["last_error"] = last_error_;
  if (chunk_) {
    const auto& spec = chunk_->spec();
    j["layers"] = {spec.layers.begin, spec.layers.end};
    j["device"] = chunk_->device().str();
    j["dtype"] = dtype_name(chunk_->dtype());
    j["memory_bytes"] = chunk_->parameter_bytes();
  }
  if (stats_) j["stage"] = stats_->to_json();
  if (training_status_) j["training"] = training_status_->to_json();
  const auto link_stats = links_ ? std::make_optional(std::make_pair(links_->from_prev->stats(), links_->to_next->stats())) : last_link_stats_;
  if (link_stats) {
    const auto& [in, out] = *link_stats;
    j["frames_in"] = in.frames_in;
    j["frames_out"] = out.frames_out;
    j["bytes_in"] = in.bytes_in;
    j["bytes_out"] = out.bytes_out;
  }
  return {200, j};
}

HttpResponse SecondaryNode::stop(const HttpRequest& request) {
  const auto reset = query_param(request, "reset");
  end_run();
  if (reset && *reset != "0") return {200, {{"state", "idle"}}};
  std::lock_guard lock(mutex_);
  shutdown_ = true;
  shutdown_cv_.notify_all();
  return {200, {{"state", "stopping"}}};
}

HttpResponse SecondaryNode::reset(const HttpRequest&) {
  end_run();
  return {200, {{"state", "idle"}}};
}

HttpResponse SecondaryNode::upload_chunk(const HttpRequest& head, const fs::path& file, const std::string& sha256) {
  const auto expected = query_param(head, "sha256");
  if (!expected) return {400, {{"error", "POST /chunk needs ?sha256=<hex digest of the chunk>"}}};
  if (*expected != sha256)
    return {400, {{"error", "uploaded chunk has sha256 " + sha256 + ", the starter announced " + *expected + "; upload refused"}}};
  const fs::path target = options_.chunk_cache_dir / (sha256 + ".safetensors");
  fs::rename(file, target);
  spdlog::info("stored uploaded chunk {} ({} bytes)", target.string(), fs::file_size(target));
  return {200, {{"stored", target.string()}, {"sha256", sha256}}};
}

}  // namespace mdi
