// decode_bench: single-stream decode speed against the machine's memory-read floor.
//
//   decode_bench [--models-dir DIR] [--tokens N] [--out FILE]   the whole table, in one run
//   decode_bench run --ckpt PATH --dtype D --threads N ...       one measured run (the driver runs
//                                                                 each in a child, so each peak RSS is its own)
//
// For every model, dtype and thread count: the memory-read floor (a vectorised read of a buffer as
// large as the weights one decode step streams), decode tok/s from standalone greedy generation, the
// effective weight bandwidth (streamed bytes × tok/s), LibTorch ops dispatched per token, and peak RSS.
// Results go to stdout as Markdown and to --out (default bench/results/decode.md); progress to stderr.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/record_function.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>
#include <nlohmann/json.hpp>
#include <sstream>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/runtime/torch_runtime.hpp"
#include "common/store/checkpoint.hpp"

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

namespace {

double seconds_since(clock_type::time_point start) { return std::chrono::duration<double>(clock_type::now() - start).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// ---------------------------------------------------------------------------
// memory-read floor

// Sums 32-bit words with integer adds, so any bytes (bf16 pairs, NaNs) read at the same speed.
#if defined(__x86_64__)
#define MDI_LOAD(q) _mm512_loadu_si512(reinterpret_cast<const void*>(q))
__attribute__((target("avx512f"))) uint32_t sum_avx512(const uint32_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm512_add_epi32(a0, MDI_LOAD(p + i)), a1 = _mm512_add_epi32(a1, MDI_LOAD(p + i + 16));
    a2 = _mm512_add_epi32(a2, MDI_LOAD(p + i + 32)), a3 = _mm512_add_epi32(a3, MDI_LOAD(p + i + 48));
    a4 = _mm512_add_epi32(a4, MDI_LOAD(p + i + 64)), a5 = _mm512_add_epi32(a5, MDI_LOAD(p + i + 80));
    a6 = _mm512_add_epi32(a6, MDI_LOAD(p + i + 96)), a7 = _mm512_add_epi32(a7, MDI_LOAD(p + i + 112));
  }
  // stored and added in plain code: GCC 12's _mm512_reduce_add_epi32 trips its own
  // -Wuninitialized (bug 105593)
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                             _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7))));
  uint32_t s = 0;
  for (uint32_t lane : lanes) s += lane;
  for (; i < n; ++i) s += p[i];
  return s;
}
#undef MDI_LOAD
#endif

uint32_t sum_plain(const uint32_t* p, int64_t n) {
  uint32_t a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) a[j] += p[i + j];
  uint32_t s = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
  for (; i < n; ++i) s += p[i];
  return s;
}

// Reads n words at p with the current thread count, split as at::parallel_for splits a projection's rows.
uint32_t read_words(const uint32_t* p, int64_t n) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
#else
  const bool avx512 = false;
#endif
  std::atomic<uint32_t> total{0};
  at::parallel_for(0, (n + 4095) / 4096, 1, [&](int64_t b, int64_t e) {
    const uint32_t* q = p + b * 4096;
    const int64_t m = std::min(n, e * 4096) - b * 4096;
#if defined(__x86_64__)
    total += avx512 ? sum_avx512(q, m) : sum_plain(q, m);
#else
    total += sum_plain(q, m);
#endif
  });
  return total.load();
}

// GB/s (1e9 bytes) of reading `bytes` with `threads` threads, split as at::parallel_for splits a
// matrix-vector product; median of `reps` passes. huge: ask for transparent huge pages.
double read_floor_gbs(int64_t bytes, int threads, bool huge, int reps = 5) {
  const int64_t n = bytes / 4 / 4096 * 4096;
  void* raw = nullptr;
  if (posix_memalign(&raw, 2 << 20, n * 4) != 0) throw std::bad_alloc();
  std::unique_ptr<void, void (*)(void*)> holder(raw, std::free);
  if (huge) ::madvise(raw, n * 4, MADV_HUGEPAGE);
  auto* p = static_cast<uint32_t*>(raw);
  std::fill(p, p + n, 1u);
  at::set_num_threads(threads);
  std::vector<double> gbs;
  volatile uint32_t sink = 0;
  for (int r = 0; r < reps + 1; ++r) {
    const auto start = clock_type::now();
    sink = sink + read_words(p, n);
    if (r > 0) gbs.push_back(n * 4 / seconds_since(start) / 1e9);  // the first pass warms the page tables
  }
  return median(gbs);
}

// ---------------------------------------------------------------------------
// one measured run (child process)

// Counts the ops LibTorch dispatches (each RecordFunction of scope FUNCTION), and those not nested in another.
std::atomic<int64_t> g_ops{0}, g_top_ops{0};
thread_local int t_depth = 0;

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction&) {
  ++g_ops;
  if (t_depth++ == 0) ++g_top_ops;
  return nullptr;
}
void on_op_end(const at::RecordFunction&, at::ObserverContext*) { --t_depth; }

struct RunOptions {
  std::string ckpt, dtype = "float32";
  int threads = 1;
  int64_t tokens = 32;
  int64_t batch = 1;  // samples decoded in lockstep as one micro-batch
  bool count_ops = false;
  bool floor = false;
};

int64_t argmax(const float* p, int64_t n) { return std::max_element(p, p + n) - p; }

// Greedy decode from BOS, every step fed one token, as generate_standalone feeds it (stop tokens
// do not stop it: random weights would end a sample anywhere).
nlohmann::json run_one(const RunOptions& opt) {
  mdi::init_torch_runtime(opt.threads);
  const auto load_start = clock_type::now();
  auto reader = mdi::open_checkpoint(opt.ckpt);
  const auto& c = reader->config();
  auto model = mdi::load_chunk(*reader, {{0, c.n_layers}, true, true}, torch::kCPU, mdi::parse_dtype(opt.dtype));
  const double load_s = seconds_since(load_start);
  const int64_t steps = std::min(opt.tokens, c.max_seq_len - 1);

  // --batch samples, each with its own cache, one micro-batch per step; all start from BOS
  std::vector<mdi::KvCache> caches;
  for (int64_t b = 0; b < opt.batch; ++b) caches.push_back(model.new_cache());
  std::vector<int64_t> tokens = {c.bos_token_id};
  auto step = [&](int64_t pos) {
    std::vector<mdi::SequenceSpan> spans;
    for (auto& cache : caches) spans.push_back({&cache, pos, 1, nullptr});
    auto logits = model.forward(torch::full({opt.batch}, tokens.back(), torch::kLong), spans).to(torch::kCPU).contiguous();
    tokens.push_back(argmax(logits[0].data_ptr<float>(), logits.size(1)));
  };
  // the weights one step streams: every tensor but the embedding (unless it is the tied head)
  std::vector<torch::Tensor> streamed_tensors;
  const auto& w = model.weights();
  for (const auto& l : w.layers)
    for (const auto* t : {&l.attn_norm, &l.wqkv, &l.wo, &l.ffn_norm, &l.w_gate_up, &l.w_down}) streamed_tensors.push_back(*t);
  streamed_tensors.push_back(w.final_norm);
  streamed_tensors.push_back(w.lm_head);
  volatile uint32_t sink = 0;
  std::vector<double> step_s, floor_s;
  for (int64_t pos = 0; pos < steps; ++pos) {
    if (opt.floor) {
      // a read of the same bytes just before the step: the pair sees the same neighbours
      const auto start = clock_type::now();
      for (const auto& t : streamed_tensors)
        sink = sink + read_words(static_cast<const uint32_t*>(t.data_ptr()), t.nbytes() / 4);
      floor_s.push_back(seconds_since(start));
    }
    const auto start = clock_type::now();
    step(pos);
    step_s.push_back(seconds_since(start));
  }
  // ops are counted on a few more steps, apart from the timed ones (the callback costs time)
  int64_t counted = 0;
  if (opt.count_ops) {
    auto handle = at::addGlobalCallback(at::RecordFunctionCallback(on_op_start, on_op_end));
    for (int64_t pos = steps; pos < std::min(steps + 8, c.max_seq_len - 1); ++pos, ++counted) step(pos);
    at::removeCallback(handle);
    tokens.resize(steps + 1);
  }
  // decode: every step after the first; the median step is robust to a neighbour's compile
  std::vector<double> decode(step_s.begin() + 1, step_s.end());
  double total = 0;
  for (double s : decode) total += s;
  const int64_t embedding_bytes = c.vocab_size * c.dim * torch::elementSize(model.dtype());
  const int64_t streamed = model.parameter_bytes() - (c.tied_embeddings ? 0 : embedding_bytes);
  nlohmann::json j;
  j["load_s"] = load_s;
  j["first_step_s"] = step_s.front();
  j["decode_tok_s"] = opt.batch / median(decode);
  j["decode_tok_s_mean"] = opt.batch * decode.size() / total;
  j["parameter_bytes"] = model.parameter_bytes();
  j["streamed_bytes"] = streamed;
  j["kv_bytes"] = caches[0].bytes() * opt.batch;
  j["tokens"] = tokens;
  if (opt.floor) {
    std::vector<double> floors(floor_s.begin() + 1, floor_s.end()), ratios;
    for (size_t i = 0; i < decode.size(); ++i) ratios.push_back(floors[i] / decode[i]);
    j["floor_gbs"] = streamed / median(floors) / 1e9;
    j["of_floor"] = median(ratios);
  }
  if (opt.count_ops) {
    j["ops_per_token"] = g_ops.load() / double(counted);
    j["top_ops_per_token"] = g_top_ops.load() / double(counted);
  }
  return j;
}

// ---------------------------------------------------------------------------
// driver

struct ChildResult {
  nlohmann::json run;
  double peak_rss_mb = 0;
};

// Runs `argv` in a child; its stdout's last line is JSON. Peak RSS from wait4.
ChildResult run_child(const std::vector<std::string>& args, bool json_stdout = true) {
  int out_pipe[2];
  if (pipe(out_pipe) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    dup2(out_pipe[1], 1);
    close(out_pipe[0]);
    close(out_pipe[1]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(out_pipe[0], buf, sizeof buf)) > 0;) out.append(buf, n);
  close(out_pipe[0]);
  int status = 0;
  struct rusage usage {};
  wait4(pid, &status, 0, &usage);
  std::string cmd;
  for (auto& a : args) cmd += a + " ";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error("failed: " + cmd);
  ChildResult r;
  if (json_stdout) r.run = nlohmann::json::parse(out.substr(out.rfind("\n{") == std::string::npos ? 0 : out.rfind("\n{") + 1));
  r.peak_rss_mb = usage.ru_maxrss / 1024.0;  // KiB → MiB
  return r;
}

std::string read_first_line(const std::string& path, const std::string& key = "") {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    if (key.empty() || line.rfind(key, 0) == 0) return key.empty() ? line : line.substr(line.find(':') + 2);
  return "?";
}

std::string trim(const std::string& text) {
  const auto b = text.find_first_not_of(" \t"), e = text.find_last_not_of(" \t");
  return b == std::string::npos ? "" : text.substr(b, e - b + 1);
}

std::string machine_description() {
  std::ostringstream s;
  struct utsname u {};
  uname(&u);
  const std::string cache = "/sys/devices/system/cpu/cpu0/cache/";
  s << "- CPU: " << read_first_line("/proc/cpuinfo", "model name") << ", " << std::thread::hardware_concurrency()
    << " logical cores; L2 " << read_first_line(cache + "index2/size") << " per core, L3 " << read_first_line(cache + "index3/size")
    << "\n- memory: " << trim(read_first_line("/proc/meminfo", "MemTotal")) << "; transparent huge pages: "
    << read_first_line("/sys/kernel/mm/transparent_hugepage/enabled") << "\n- kernel " << u.release << " " << u.machine
    << "\n- LibTorch " << TORCH_VERSION << ", ATen parallel: ";
  std::istringstream info(at::get_parallel_info());
  for (std::string line; std::getline(info, line);)
    if (line.rfind("ATen parallel backend", 0) == 0 || line.rfind("at::get_num_threads", 0) == 0) s << line << "; ";
  std::istringstream config(at::show_config());
  for (std::string line; std::getline(config, line);) {
    auto p = line.find("BLAS_INFO=");
    if (p != std::string::npos) s << "BLAS_INFO " << line.substr(p + 10, line.find(',', p) - p - 10);
  }
  std::error_code ec;
  const auto blas = fs::canonical("/usr/lib/x86_64-linux-gnu/libblas.so.3", ec);
  if (!ec) s << " (libblas.so.3 → " << blas.string() << ")";
  s << "\n";
  return s.str();
}

struct DriverOptions {
  std::string models_dir = "/tmp/mdi-decode-bench";
  std::string out = std::string(MDI_SOURCE_DIR) + "/bench/results/decode.md";
  std::string stories = std::string(MDI_SOURCE_DIR) + "/../shared/models/stories260K/stories260K.bin";
  int64_t tokens = 24;
  int64_t stories_tokens = 200;
  int reps = 3;
  std::vector<std::string> presets = {"nanollama-304m", "tinyllama-1.1b"};
  std::vector<std::string> dtypes = {"float32", "bfloat16", "float16"};
  std::vector<int> threads = {1, 2};
  std::string command;  // how this run was started, for the results file
};

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

int drive(const DriverOptions& opt, const std::string& self) {
  const fs::path bin_dir = fs::path(self).parent_path();
  fs::create_directories(opt.models_dir);
  std::ostringstream md;
  md << "# Decode benchmark (issue 11)\n\n`" << opt.command << "`\n\n" << machine_description() << "\n";
  md << "Standalone greedy decode from BOS, one token per step, " << opt.tokens << " steps (stories260K: " << opt.stories_tokens
     << "); tok/s = 1 / the median step after the first (a neighbour's compile stretches single steps: the mean is beside it), "
     << "median of " << opt.reps << " processes. *Streamed* = the weight bytes one "
     << "step reads (all but the embedding, of which it reads one row). *Floor* = a vectorised read of those same weight bytes "
     << "(AVX-512 integer adds, the same threads and row split) just before each step; *% of floor* = the median over steps of "
     << "floor-read time / step time, so each pair sees the same neighbours. Peak RSS = the process's ru_maxrss "
     << "(load + decode); KV = the caches' bytes at the end.\n\n";
  md << "| model | dtype | threads | streamed MB | floor GB/s | tok/s median step / mean | eff. GB/s | % of floor | peak RSS MB |"
        " weights+KV MB | RSS − (weights+KV) MB |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::cout << md.str() << std::flush;
  std::ostringstream rows;
  auto emit = [&](const std::string& row) {
    rows << row;
    std::cout << row << std::flush;
  };
  std::map<std::string, double> fp32_toks;
  for (const auto& preset : opt.presets) {
    for (const auto& dtype : opt.dtypes) {
      const fs::path dir = fs::path(opt.models_dir) / (preset + "-" + dtype);
      if (!fs::exists(dir / "config.json")) {
        spdlog::info("preparing {}", dir.string());
        run_child({(bin_dir / "prepare_model").string(), "random:" + preset, "--n-nodes", "1", "--dtype", dtype, "--out",
                   dir.string()},
                  /*json_stdout=*/false);
      }
      for (int threads : opt.threads) {
        // runs and floor passes alternate, so both see the same neighbours
        std::vector<double> toks, means, floors, of_floor;
        ChildResult last;
        for (int r = 0; r < opt.reps; ++r) {
          last = run_child({self, "run", "--ckpt", dir.string(), "--dtype", dtype, "--threads", std::to_string(threads),
                            "--tokens", std::to_string(opt.tokens), "--floor"});
          toks.push_back(last.run["decode_tok_s"].get<double>());
          means.push_back(last.run["decode_tok_s_mean"].get<double>());
          floors.push_back(last.run["floor_gbs"].get<double>());
          of_floor.push_back(last.run["of_floor"].get<double>());
          spdlog::info("{} {} {} threads: {:.2f} tok/s, floor {:.1f} GB/s, {:.0f}% of it, peak RSS {:.0f} MB", preset, dtype, threads,
                       toks.back(), floors.back(), 100 * of_floor.back(), last.peak_rss_mb);
        }
        const double tok_s = median(toks), floor = median(floors);
        const double streamed = last.run["streamed_bytes"].get<double>();
        const double eff = streamed * tok_s / 1e9;
        const double weights_kv = (last.run["parameter_bytes"].get<double>() + last.run["kv_bytes"].get<double>()) / (1 << 20);
        const std::string key = preset + "/" + std::to_string(threads);
        if (dtype == "float32") fp32_toks[key] = tok_s;
        std::string ratio;
        if (dtype != "float32" && fp32_toks.count(key)) ratio = fmt(" (%.2f× fp32)", tok_s / fp32_toks[key]);
        emit("| " + preset + " | " + dtype + " | " + std::to_string(threads) + " | " + fmt("%.0f", streamed / (1 << 20)) + " | " +
             fmt("%.1f", floor) + " | " + fmt("%.2f", tok_s) + ratio + " / " + fmt("%.2f", median(means)) + " | " + fmt("%.1f", eff) +
             " | " + fmt("%.0f%%", 100 * median(of_floor)) + " | " + fmt("%.0f", last.peak_rss_mb) + " | " + fmt("%.0f", weights_kv) + " | " +
             fmt("%+.0f", last.peak_rss_mb - weights_kv) + " |\n");
      }
    }
  }

  // stories260K: per-op overhead, not bandwidth
  std::ostringstream small;
  small << "\n| stories260K | dtype | threads | tok/s | ATen ops / token (top-level) | peak RSS MB |\n|---|---|---|---|---|---|\n";
  std::cout << small.str();
  std::map<std::string, std::vector<int64_t>> greedy;
  for (const std::string dtype : {"float32", "bfloat16"}) {
    for (int threads : opt.threads) {
      std::vector<double> toks;
      ChildResult last;
      for (int r = 0; r < opt.reps; ++r) {
        last = run_child({self, "run", "--ckpt", opt.stories, "--dtype", dtype, "--threads", std::to_string(threads), "--tokens",
                          std::to_string(opt.stories_tokens), "--count-ops"});
        toks.push_back(last.run["decode_tok_s"].get<double>());
      }
      greedy[dtype] = last.run["tokens"].get<std::vector<int64_t>>();
      std::string row = "| stories260K | " + dtype + " | " + std::to_string(threads) + " | " + fmt("%.0f", median(toks)) + " | " +
                        fmt("%.1f", last.run["ops_per_token"].get<double>()) + " (" +
                        fmt("%.1f", last.run["top_ops_per_token"].get<double>()) + ") | " + fmt("%.0f", last.peak_rss_mb) + " |\n";
      small << row;
      std::cout << row << std::flush;
    }
  }
  // the same through the starter binary: its tokens_per_s counts the prefill too
  for (int threads : opt.threads) {
    std::vector<double> toks;
    double rss = 0;
    const fs::path out = fs::path(opt.models_dir) / "starter-stories260K.json";
    for (int r = 0; r < opt.reps; ++r) {
      const ChildResult c = run_child({(bin_dir / "starter").string(), "--ckpt", opt.stories, "--n-tokens",
                                       std::to_string(opt.stories_tokens), "--temperature", "0", "--threads", std::to_string(threads),
                                       "--out", out.string()},
                                      /*json_stdout=*/false);
      std::ifstream in(out);
      toks.push_back(nlohmann::json::parse(in)["stats"]["tokens_per_s"].get<double>());
      rss = c.peak_rss_mb;
    }
    std::string row = "| stories260K, `starter` (prompt \"\", stops at BOS) | float32 | " + std::to_string(threads) + " | " +
                      fmt("%.0f", median(toks)) + " (its tokens_per_s) | | " + fmt("%.0f", rss) + " |\n";
    small << row;
    std::cout << row << std::flush;
  }

  size_t agree = 0;
  const auto &a = greedy["float32"], &b = greedy["bfloat16"];
  while (agree < std::min(a.size(), b.size()) && a[agree] == b[agree]) ++agree;
  const std::string agreement = "\nstories260K greedy from BOS: bfloat16 weights give the same ids as float32 for the first " +
                                std::to_string(agree > 0 ? agree - 1 : 0) + " generated tokens (of " +
                                std::to_string(a.size() - 1) + ").\n";
  std::cout << agreement;

  // the floor itself, at a size no cache holds
  std::ostringstream floor;
  floor << "\nMemory-read floor over 2 GiB: ";
  for (int threads : opt.threads)
    floor << threads << " thread" << (threads > 1 ? "s" : "") << " " << fmt("%.1f", read_floor_gbs(int64_t(2) << 30, threads, false))
          << " GB/s (huge pages: " << fmt("%.1f", read_floor_gbs(int64_t(2) << 30, threads, true)) << "); ";
  floor << "\n";
  std::cout << floor.str();

  const std::string text = md.str() + rows.str() + small.str() + agreement + floor.str();
  if (!opt.out.empty()) {
    fs::create_directories(fs::path(opt.out).parent_path());
    std::ofstream(opt.out) << text;
    spdlog::info("wrote {}", opt.out);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"decode_bench: single-stream decode speed against the machine's memory-read floor"};
  DriverOptions driver;
  app.add_option("--models-dir", driver.models_dir, "Where prepared random models are kept (made on first use)");
  app.add_option("--out", driver.out, "Markdown results file ('' for none)");
  app.add_option("--stories", driver.stories, "stories260K checkpoint");
  app.add_option("--tokens", driver.tokens, "Decode steps per run of the random models");
  app.add_option("--stories-tokens", driver.stories_tokens, "Decode steps per stories260K run");
  app.add_option("--reps", driver.reps, "Processes per configuration (the median is reported)");
  app.add_option("--presets", driver.presets, "random:* presets")->delimiter(',');
  app.add_option("--dtypes", driver.dtypes, "Weight dtypes")->delimiter(',');
  app.add_option("--threads", driver.threads, "Thread counts")->delimiter(',');
  RunOptions run;
  auto* sub = app.add_subcommand("run", "One measured run; prints a JSON line");
  sub->add_option("--ckpt", run.ckpt)->required();
  sub->add_option("--dtype", run.dtype);
  sub->add_option("--threads", run.threads);
  sub->add_option("--tokens", run.tokens);
  sub->add_option("--batch", run.batch, "Samples decoded together as one micro-batch (tok/s counts all of them)")->check(CLI::PositiveNumber);
  sub->add_flag("--count-ops", run.count_ops);
  sub->add_flag("--floor", run.floor, "Before each step, read the streamed weights once (the paired floor)");
  auto* floor = app.add_subcommand("floor", "Memory-read floor only");
  int64_t floor_mb = 2048;
  floor->add_option("--mb", floor_mb);
  CLI11_PARSE(app, argc, argv);
  spdlog::set_pattern("[%H:%M:%S] %v");
  try {
    if (*sub) {
      std::cout << run_one(run).dump() << std::endl;
      return 0;
    }
    if (*floor) {
      for (int t : driver.threads)
        for (bool huge : {false, true})
          std::cout << t << " threads" << (huge ? ", huge pages" : "") << ": " << read_floor_gbs(floor_mb << 20, t, huge) << " GB/s\n";
      return 0;
    }
    for (int i = 0; i < argc; ++i) driver.command += (i ? " " : "") + std::string(argv[i]);
    return drive(driver, fs::canonical("/proc/self/exe").string());
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
