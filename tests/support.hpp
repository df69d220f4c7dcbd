#pragma once
// Helpers shared by the test executables: where ../shared is, free loopback
// ports, scratch directories and child processes with bounded waits.
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace mdi::test {

// ../shared beside the checkout, or nullopt where a fresh clone has none.
std::optional<std::filesystem::path> shared_dir();

#define MDI_REQUIRE_SHARED(var)                                                              \
  auto var##_opt = ::mdi::test::shared_dir();                                                \
  if (!var##_opt) GTEST_SKIP() << "../shared is absent (fresh clone): skipping reference check"; \
  const std::filesystem::path var = *var##_opt

std::filesystem::path source_dir();
std::filesystem::path bin_dir();

// A loopback TCP port of this test alone: bound to port 0 with SO_REUSEADDR and held,
// not listening, until the process ends. No other process's bind(0) can take it
// meanwhile (another parallel test picking the same port made a ring connect to an
// HTTP server), while the nodes under test, which set SO_REUSEADDR, still bind it.
int free_tcp_port();

// A fresh directory under the system temp dir, removed when the object dies.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// A child process whose stdout and stderr go to files, so a test can read them
// after the fact. The destructor kills it (SIGKILL) if still running.
class ChildProcess {
 public:
  ChildProcess(std::vector<std::string> argv, const std::filesystem::path& log_dir, const std::string& name,
               std::map<std::string, std::string> extra_env = {});
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Exit code, or nullopt if still running after `timeout` (the process is left running).
  std::optional<int> wait(std::chrono::milliseconds timeout);
  void kill(int signal);
  int pid() const { return pid_; }
  std::string out() const;
  std::string err() const;

 private:
  int pid_ = -1;
  std::optional<int> exit_code_;
  std::filesystem::path out_path_, err_path_;
};

std::string read_file(const std::filesystem::path& path);
// How often `what` occurs in `text`, not overlapping.
size_t count(const std::string& text, const std::string& what);

// The message of the `Error` that `call` throws, or "" when it throws none (other
// exceptions go on up, failing the test).
template <class Error, class F>
std::string error_of(F&& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A nodes-config of `n_nodes` (the starter and n_nodes - 1 secondaries) on loopback,
// every port free, with these "timeouts".
nlohmann::json loopback_nodes_config(size_t n_nodes, const nlohmann::json& timeouts);

// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout);

}  // namespace mdi::test
