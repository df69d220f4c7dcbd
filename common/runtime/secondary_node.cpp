#include "common/runtime/secondary_node.hpp"

#include <pthread.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/net/ring_setup.hpp"
#include "common/store/checkpoint.hpp"
#include "common/store/sha256.hpp"
#include "common/wire/json_excerpt.hpp"

namespace mdi {

namespace fs = std::filesystem;

namespace {

// A cancelled load gives up within one layer, a cancelled ring within a second;
// a stop that waited this long answers anyway.
constexpr std::chrono::seconds kStopWait{10};
// Left free on the chunk cache's disk, so an upload never fills it to the last byte.
constexpr uint64_t kDiskMarginBytes = 64ull << 20;
// How often leases are looked at: a run is dropped at most this long after its lease ran out.
constexpr std::chrono::milliseconds kLeaseCheck{200};

HttpResponse error_response(int status, std::string error) { return {status, {{"error", std::move(error)}}}; }

// The run a /stop or /reset names, if it names one. Throws HttpError 400 when malformed.
std::optional<uint64_t> named_run(const HttpRequest& request) {
  const auto text = query_param(request, "run_id");
  if (!text) return std::nullopt;
  try {
    size_t used = 0;
    const uint64_t id = std::stoull(*text, &used);
    if (used == text->size() && !text->empty() && text->front() != '-') return id;
  } catch (const std::exception&) {
  }
  throw HttpError(400, "run_id=" + json_excerpt(*text) + " is not a run id (an unsigned 64-bit integer)");
}

}  // namespace

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
  for (const fs::path& dir : options_.chunk_dirs) {
    fs::path root = fs::weakly_canonical(fs::absolute(dir));
    if (!root.has_filename()) root = root.parent_path();  // "models/" → "models"
    canonical_chunk_dirs_.push_back(root);
  }
  lease_watch_ = std::thread([this] { drop_runs_whose_lease_expired(); });
}

SecondaryNode::~SecondaryNode() {
  {
    std::lock_guard lock(mutex_);
    destroying_ = true;
  }
  state_changed_.notify_all();
  lease_watch_.join();
  end_run(std::nullopt);
  std::unique_lock lock(mutex_);
  std::thread ring = std::move(ring_thread_);
  lock.unlock();
  if (ring.joinable()) ring.join();  // even a run that outlived kStopWait
}

void SecondaryNode::register_routes(ControlServer& server) {
  server.route("GET", "/status", [this](const HttpRequest& r) { return status(r); });
  server.route("POST", "/init", [this](const HttpRequest& r) { return init(r); });
  server.route("PUT", "/stop", [this](const HttpRequest& r) { return stop(r); });
  server.route("POST", "/reset", [this](const HttpRequest& r) { return reset(r); });
  server.route("PUT", "/lease", [this](const HttpRequest& r) { return renew_lease(r); });
  server.upload_route(
      "POST", "/chunk",
      [this](const HttpRequest& head, const fs::path& file, const std::string& sha) { return upload_chunk(head, file, sha); },
      [this](const HttpRequest& head, std::optional<uint64_t>) { return admit_upload(head); });
}

void SecondaryNode::wait_for_shutdown() {
  std::unique_lock lock(mutex_);
  state_changed_.wait(lock, [&] { return shutdown_; });
}

bool SecondaryNode::in_chunk_dirs(const fs::path& path) const {
  std::error_code error;
  const fs::path canonical = fs::weakly_canonical(fs::absolute(path), error);  // symbolic links resolved
  if (error) return false;
  return std::any_of(canonical_chunk_dirs_.begin(), canonical_chunk_dirs_.end(), [&](const fs::path& root) {
    return std::mismatch(root.begin(), root.end(), canonical.begin(), canonical.end()).first == root.end();
  });
}

std::string SecondaryNode::chunk_dirs_text() const {
  std::string text;
  for (const fs::path& dir : canonical_chunk_dirs_) text += (text.empty() ? "" : ", ") + dir.string();
  return text.empty() ? "none" : text;
}

SecondaryNode::ChunkLookup SecondaryNode::find_chunk(const Run& run) {
  const InitRequest& request = run.request;
  const uint64_t most_bytes = max_chunk_file_bytes(request.model, {{request.layer_begin, request.layer_end}, false, false});
  // --chunk was named by this node's operator; chunk.path by whoever sent the /init.
  std::vector<fs::path> candidates;
  if (!options_.chunk_override.empty()) candidates.push_back(options_.chunk_override);
  std::string not_read;
  if (!request.chunk_path.empty()) {
    if (in_chunk_dirs(request.chunk_path))
      candidates.emplace_back(request.chunk_path);
    else
      not_read = "; chunk.path " + json_excerpt(request.chunk_path) + " is outside this node's chunk directories (" + chunk_dirs_text() +
                 "), so it was not read (start the secondary with --chunk-dir to allow it)";
  }
  for (const fs::path& path : candidates) {
    std::error_code error;
    const fs::file_status kind = fs::status(path, error);
    if (!fs::exists(kind)) continue;
    const std::string name = json_excerpt(path.string());
    // A directory cannot be hashed, and a device (/dev/zero) would be hashed forever.
    if (!fs::is_regular_file(kind))
      return {std::nullopt, "chunk " + name + " is not a regular file; name a chunk .safetensors file or upload it with POST /chunk"};
    const uint64_t bytes = fs::file_size(path, error);
    if (error) return {std::nullopt, "chunk " + name + " cannot be read (" + error.message() + ")"};
    if (request.chunk_bytes != 0 && bytes != request.chunk_bytes)
      return {std::nullopt, "chunk " + name + " has " + std::to_string(bytes) + " bytes, the starter's manifest says " +
                                std::to_string(request.chunk_bytes) + " (a different model or split?)"};
    if (bytes > most_bytes)
      return {std::nullopt, "chunk " + name + " has " + std::to_string(bytes) + " bytes, more than layers [" +
                                std::to_string(request.layer_begin) + ", " + std::to_string(request.layer_end) +
                                ") of this model can fill (" + std::to_string(most_bytes) + ")"};
    std::string digest;
    try {
      digest = sha256_file(path, bytes, &run.cancel);
    } catch (const std::exception& e) {
      return {std::nullopt, "chunk " + name + " cannot be read (" + e.what() + "); fix its permissions or upload it with POST /chunk"};
    }
    if (digest != request.chunk_sha256)
      return {std::nullopt, "chunk " + name + " has sha256 " + digest + ", the starter expects " + request.chunk_sha256 +
                                " (a different model or split?)"};
    return {path, ""};
  }
  // Uploaded chunks were checked on arrival and are named by their digest.
  const fs::path cached = options_.chunk_cache_dir / (request.chunk_sha256 + ".safetensors");
  if (fs::is_regular_file(cached)) return {cached, ""};
  std::lock_guard lock(mutex_);
  expected_upload_ = ExpectedUpload{request.chunk_sha256, request.chunk_bytes != 0 ? request.chunk_bytes : most_bytes,
                                    request.chunk_bytes != 0};
  return {std::nullopt,
          "no chunk with sha256 " + request.chunk_sha256 + " on this node" + not_read + "; upload it with POST /chunk?sha256=" +
              request.chunk_sha256,
          true};
}

std::shared_ptr<ModelChunk> SecondaryNode::load(Run& run, const fs::path& chunk_file) {
  const InitRequest& request = run.request;
  const std::string device_text = !options_.device_override.empty() ? options_.device_override
                                  : !request.device.empty()        ? request.device
                                  : !options_.self.device.empty()   ? options_.self.device
                                                                    : "cpu";
  const torch::Device device = parse_device(device_text);
  const torch::ScalarType dtype = parse_dtype(options_.dtype_override.empty() ? request.dtype : options_.dtype_override);
  if (request.training && dtype != torch::kFloat32)
    throw std::invalid_argument("training runs in float32; this node was started with --dtype " + options_.dtype_override);
  const std::string key = request.chunk_sha256 + " " + std::to_string(request.layer_begin) + "-" + std::to_string(request.layer_end) +
                          " " + device.str() + " " + dtype_name(dtype);
  {
    std::lock_guard lock(mutex_);
    if (key == chunk_key_) {
      spdlog::info("reusing the loaded layers [{}, {})", request.layer_begin, request.layer_end);
      return chunk_;
    }
    chunk_.reset();  // its memory goes before the next chunk's arrives
    chunk_key_.clear();
  }
  ModelConfig config = request.model;
  auto reader = open_safetensors(config, {chunk_file}, std::nullopt, "chunk " + chunk_file.string());
  spdlog::info("loading layers [{}, {}) from {} to {} as {}", request.layer_begin, request.layer_end, chunk_file.string(), device.str(),
               dtype_name(dtype));
  auto chunk = std::make_shared<ModelChunk>(
      load_chunk(*reader, {{request.layer_begin, request.layer_end}, false, false}, device, dtype, &run.cancel));
  std::lock_guard lock(mutex_);
  chunk_ = chunk;
  chunk_key_ = key;
  return chunk;
}

HttpResponse SecondaryNode::ready_answer(const Run& run) const {
  return {200, {{"state", "ready"}, {"run_id", run.request.run_id}, {"layers", {run.request.layer_begin, run.request.layer_end}},
                {"parameter_bytes", run.chunk->parameter_bytes()}}};
}

HttpResponse SecondaryNode::init(const HttpRequest& http) {
  InitRequest request;
  try {
    request = InitRequest::parse(parse_json_body(http));
  } catch (const InitRequestError& e) {
    return error_response(400, e.what());
  }
  const size_t my_ring_index = options_.secondary_index + 1;
  if (request.ring_index != my_ring_index)
    return error_response(400, "/init is for ring index " + std::to_string(request.ring_index) + ", this is secondary " +
                                   std::to_string(options_.secondary_index) + " (ring index " + std::to_string(my_ring_index) + ")");
  const NodeEndpoint& me = request.nodes.node(my_ring_index);
  if (me.port_in != options_.self.port_in || me.port_out != options_.self.port_out)
    return error_response(400, "the starter's nodes-config gives this node ports in/out " + std::to_string(me.port_in) + "/" +
                                   std::to_string(me.port_out) + ", its own gives " + std::to_string(options_.self.port_in) + "/" +
                                   std::to_string(options_.self.port_out));
  if (request.training && !request.training->resume_file.empty() && !in_chunk_dirs(request.training->resume_file))
    return error_response(400, "training resume file " + json_excerpt(request.training->resume_file) + " is outside this node's chunk directories (" +
                                   chunk_dirs_text() + "); start the secondary with --chunk-dir to allow it");

  auto run = std::make_shared<Run>();
  run->request = std::move(request);
  run->lease_expires = std::chrono::steady_clock::now() + std::chrono::milliseconds(run->request.lease_ms);
  if (run->request.training) run->training = std::make_shared<SecondaryTrainingStatus>();
  const uint64_t run_id = run->request.run_id;
  std::thread finished_ring;
  {
    std::unique_lock lock(mutex_);
    if (run_ && run_->request.run_id == run_id) {
      // The starter retried an /init whose answer it lost: the same run gets the same answer.
      const auto same = run_;
      state_changed_.wait_for(lock, run->request.nodes.timeouts.http_init, [&] { return run_ != same || state_ != State::loading; });
      if (run_ == same && state_ != State::loading) return ready_answer(*same);
      if (run_ == same) return error_response(409, "run " + std::to_string(run_id) + " is still loading; ask again later");
    }
    if (run_)
      return error_response(409, std::string("a run is already going (state ") + state_name(state_) + ", run " +
                                     std::to_string(run_->request.run_id) + "); its starter must end it first");
    state_ = State::loading;
    run_ = run;
    last_run_id_ = run_id;
    last_error_.clear();
    last_stats_ = run->stats;
    last_training_ = run->training;
    last_link_stats_.reset();
    finished_ring = std::move(ring_thread_);  // a finished run's, which has set the node idle already
  }
  if (finished_ring.joinable()) finished_ring.join();

  auto back_to_idle = [&](int status, const std::string& error, nlohmann::json extra = nlohmann::json::object()) {
    std::lock_guard lock(mutex_);
    if (run_ == run) run_ = nullptr;
    state_ = State::idle;
    last_error_ = error;
    state_changed_.notify_all();
    spdlog::warn("/init of run {} refused: {}", run_id, error);
    extra["error"] = error;
    return HttpResponse{status, extra};
  };
  auto cancelled = [&] { return back_to_idle(409, "run " + std::to_string(run_id) + " was stopped while its chunk was loading"); };

  ChunkLookup chunk_file = find_chunk(*run);
  if (run->cancel) return cancelled();
  if (!chunk_file.file)
    return back_to_idle(chunk_file.need_upload ? 404 : 400, chunk_file.problem, {{"need_upload", chunk_file.need_upload}});
  try {
    run->chunk = load(*run, *chunk_file.file);
  } catch (const LoadCancelled&) {
    return cancelled();
  } catch (const std::exception& e) {
    return back_to_idle(400, e.what());
  }
  {
    std::lock_guard lock(mutex_);
    if (!run->cancel) {
      state_ = State::ready;
      state_changed_.notify_all();
      ring_thread_ = std::thread([this, run] { run_ring(run); });
      return ready_answer(*run);
    }
  }
  return cancelled();  // the stop that set the flag waits until this frees the node
}

void SecondaryNode::run_ring(std::shared_ptr<Run> run) {
  pthread_setname_np(pthread_self(), "mdi-ring");  // the thread that computes, as top -H and gdb show it
  const InitRequest& request = run->request;
  const size_t ring_index = options_.secondary_index + 1;
  try {
    LinkOptions link_options;
    link_options.setup_cancel = &run->cancel;
    link_options.max_payload_bytes =
        request.training ? training_payload_cap(request.model.dim, request.training->micro_batch_sequences * request.training->seq_len)
                         : inference_payload_cap(request.model.dim, request.max_seq_len, kBatchInvariantRows);
    RingLinks links = connect_ring(request.nodes, ring_index, request.run_id, link_options);
    {
      std::lock_guard lock(mutex_);
      state_ = State::running;
      links_ = &links;
      state_changed_.notify_all();
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
        run_secondary_training(*run->chunk, links, *request.training, ring_index, request.nodes.n_nodes(), *run->training, run->cancel,
                               request.nodes.timeouts.receive, upload);
      } else {
        std::optional<LayerProbes> probes;
        if (!request.interpretability.empty()) {
          probes.emplace(request.interpretability, *run->chunk);
          spdlog::info("capturing {} layers, {} interventions", request.interpretability.capture.layers.size(),
                       request.interpretability.interventions.size());
        }
        run_secondary_stage(*run->chunk, links, *run->stats, run->cancel, request.nodes.timeouts.receive, request.max_seq_len,
                            probes ? &*probes : nullptr);
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
  if (request.training && chunk_ == run->chunk) chunk_key_.clear();
  run_ = nullptr;
  state_ = State::idle;
  state_changed_.notify_all();
  spdlog::info("run {} over; idle", request.run_id);
}

std::optional<HttpResponse> SecondaryNode::end_run(std::optional<uint64_t> run_id) {
  std::unique_lock lock(mutex_);
  if (run_ && run_id && *run_id != run_->request.run_id)
    return HttpResponse{409, {{"error", "this node is in run " + std::to_string(run_->request.run_id) + " (state " + state_name(state_) +
                                            "), not run " + std::to_string(*run_id) + ": not stopped"},
                              {"run_id", run_->request.run_id}}};
  if (run_) {
    const auto current = run_;
    current->cancel = true;
    if (!state_changed_.wait_for(lock, kStopWait, [&] { return run_ != current; }))
      return HttpResponse{503, {{"error", "run " + std::to_string(current->request.run_id) + " was cancelled but has not ended within " +
                                              std::to_string(kStopWait.count()) + " s (state " + state_name(state_) + "); ask again"}}};
  }
  std::thread finished = std::move(ring_thread_);
  lock.unlock();
  if (finished.joinable()) finished.join();
  return std::nullopt;
}

HttpResponse SecondaryNode::status(const HttpRequest&) const {
  std::lock_guard lock(mutex_);
  nlohmann::json j = {{"state", state_name(state_)}, {"run_id", last_run_id_}, {"secondary_index", options_.secondary_index}};
  if (!last_error_.empty()) j["last_error"] = last_error_;
  if (chunk_) {
    const auto& spec = chunk_->spec();
    j["layers"] = {spec.layers.begin, spec.layers.end};
    j["device"] = chunk_->device().str();
    j["dtype"] = dtype_name(chunk_->dtype());
    j["memory_bytes"] = chunk_->parameter_bytes();
  }
  if (last_stats_) j["stage"] = last_stats_->to_json();
  if (last_training_) j["training"] = last_training_->to_json();
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
  if (auto refused = end_run(named_run(request))) return *refused;
  if (reset && *reset != "0") return {200, {{"state", "idle"}}};
  std::lock_guard lock(mutex_);
  shutdown_ = true;
  state_changed_.notify_all();
  return {200, {{"state", "stopping"}}};
}

HttpResponse SecondaryNode::reset(const HttpRequest& request) {
  if (auto refused = end_run(named_run(request))) return *refused;
  return {200, {{"state", "idle"}}};
}

HttpResponse SecondaryNode::renew_lease(const HttpRequest& request) {
  const auto run_id = named_run(request);
  if (!run_id) return error_response(400, "PUT /lease needs ?run_id=<the run to renew>");
  std::lock_guard lock(mutex_);
  if (!run_ || run_->request.run_id != *run_id || run_->cancel)
    return error_response(409, "this node is not in run " + std::to_string(*run_id) + " (state " + state_name(state_) + ")");
  run_->lease_expires = std::chrono::steady_clock::now() + std::chrono::milliseconds(run_->request.lease_ms);
  return {200, {{"state", state_name(state_)}, {"run_id", *run_id}}};
}

// A starter that died or gave up between /init and the ring renews nothing: its run
// is cancelled (the load stops within a layer, ring setup within a second).
void SecondaryNode::drop_runs_whose_lease_expired() {
  std::unique_lock lock(mutex_);
  while (!destroying_) {
    state_changed_.wait_for(lock, kLeaseCheck);
    if (!run_ || !run_->request.lease_ms || run_->cancel || (state_ != State::loading && state_ != State::ready)) continue;
    if (std::chrono::steady_clock::now() < run_->lease_expires) continue;
    run_->cancel = true;
    last_error_ = "run " + std::to_string(run_->request.run_id) + " dropped: its starter did not renew it for " +
                  std::to_string(run_->request.lease_ms) + " ms before the ring was up (is the starter gone?)";
    spdlog::warn("{}", last_error_);
  }
}

std::optional<HttpResponse> SecondaryNode::make_room_for_upload(uint64_t bytes) {
  const uint64_t budget = options_.chunk_cache_budget_bytes;
  const std::string loaded = chunk_key_.substr(0, chunk_key_.find(' ')) + ".safetensors";
  struct Cached {
    fs::path path;
    uint64_t bytes;
    fs::file_time_type written;
  };
  std::vector<Cached> evictable;
  uint64_t cached_bytes = 0;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(options_.chunk_cache_dir, error)) {
    if (!entry.is_regular_file(error) || entry.path().extension() != ".safetensors") continue;
    const uint64_t size = entry.file_size(error);
    cached_bytes += size;
    if (entry.path().filename() != loaded) evictable.push_back({entry.path(), size, entry.last_write_time(error)});
  }
  std::sort(evictable.begin(), evictable.end(), [](const Cached& a, const Cached& b) { return a.written < b.written; });
  auto free_bytes = [&] { return fs::space(options_.chunk_cache_dir, error).available; };
  auto fits = [&] { return free_bytes() >= bytes + kDiskMarginBytes && (budget == 0 || cached_bytes + bytes <= budget); };
  if (budget == 0 || bytes <= budget) {
    for (auto oldest = evictable.begin(); !fits() && oldest != evictable.end(); ++oldest) {
      if (!fs::remove(oldest->path, error)) continue;
      cached_bytes -= oldest->bytes;
      spdlog::info("chunk cache: deleted {} ({} bytes) to make room for an upload", oldest->path.string(), oldest->bytes);
    }
  }
  if (fits()) return std::nullopt;
  return error_response(507, "chunk cache " + options_.chunk_cache_dir.string() + ": an upload of up to " + std::to_string(bytes) +
                                 " bytes does not fit (" + std::to_string(free_bytes()) + " bytes free on its disk, " +
                                 std::to_string(cached_bytes) + " bytes cached" +
                                 (budget ? ", budget " + std::to_string(budget) : std::string()) +
                                 "); free disk space, raise --chunk-cache-max-gib, or put the chunk under the node's --chunk-dir");
}

UploadAdmission SecondaryNode::admit_upload(const HttpRequest& head) {
  auto refuse = [](HttpResponse refusal) {
    UploadAdmission refused;
    refused.refusal = std::move(refusal);
    return refused;
  };
  const auto sha256 = query_param(head, "sha256");
  if (!sha256) return refuse(error_response(400, "POST /chunk needs ?sha256=<hex digest of the chunk>"));
  std::lock_guard lock(mutex_);
  // Only the chunk an /init asked for: nobody else fills this node's disk.
  if (!expected_upload_ || expected_upload_->sha256 != *sha256)
    return refuse(error_response(409, "this node expects no upload of chunk " + json_excerpt(*sha256) +
                                          (expected_upload_ ? " (it waits for " + expected_upload_->sha256 + ")" : std::string()) +
                                          "; POST /init first: it answers need_upload with the chunk the node lacks"));
  if (upload_in_progress_)
    return refuse(error_response(409, "an upload of chunk " + *sha256 + " is already under way; wait for it to end"));
  if (auto full = make_room_for_upload(expected_upload_->max_bytes)) return refuse(std::move(*full));
  upload_in_progress_ = true;
  UploadAdmission admitted;
  admitted.max_bytes = expected_upload_->max_bytes;
  admitted.reservation = std::shared_ptr<void>(nullptr, [this](void*) {
    std::lock_guard lock(mutex_);
    upload_in_progress_ = false;
  });
  return admitted;
}

HttpResponse SecondaryNode::upload_chunk(const HttpRequest& head, const fs::path& file, const std::string& sha256) {
  const auto expected = query_param(head, "sha256");
  if (!expected || *expected != sha256)
    return error_response(400, "uploaded chunk has sha256 " + sha256 + ", the starter announced " + json_excerpt(expected.value_or("")) +
                                   "; upload refused");
  const uint64_t bytes = fs::file_size(file);
  std::lock_guard lock(mutex_);
  if (!expected_upload_ || expected_upload_->sha256 != sha256)
    return error_response(409, "chunk " + sha256 + " is no longer expected (another /init came meanwhile); upload refused");
  if (expected_upload_->exact && bytes != expected_upload_->max_bytes)
    return error_response(400, "uploaded chunk has " + std::to_string(bytes) + " bytes, the manifest says " +
                                   std::to_string(expected_upload_->max_bytes) + "; upload refused");
  const fs::path target = options_.chunk_cache_dir / (sha256 + ".safetensors");
  fs::rename(file, target);
  expected_upload_.reset();
  spdlog::info("stored uploaded chunk {} ({} bytes)", target.string(), bytes);
  return {200, {{"stored", target.string()}, {"sha256", sha256}}};
}

}  // namespace mdi
