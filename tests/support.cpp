#include "tests/support.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace mdi::test {
namespace fs = std::filesystem;

std::optional<fs::path> shared_dir() {
  fs::path dir = fs::path(MDI_SHARED_DIR);
  if (fs::exists(dir / "models" / "stories260K" / "stories260K.bin")) return fs::canonical(dir);
  return std::nullopt;
}

fs::path source_dir() { return fs::path(MDI_SOURCE_DIR); }
fs::path bin_dir() { return fs::path(MDI_BIN_DIR); }

int free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  const int one = 1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw std::runtime_error("bind(127.0.0.1:0) failed");
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.sin_port);  // fd stays open: the reservation
}

ScratchDir::ScratchDir() {
  std::random_device rd;
  path_ = fs::temp_directory_path() / ("mdi-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
  fs::create_directories(path_);
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  if (std::getenv("MDI_KEEP_TEST_FILES") == nullptr) fs::remove_all(path_, ec);
}

ChildProcess::ChildProcess(std::vector<std::string> argv, const fs::path& log_dir, const std::string& name,
                           std::map<std::string, std::string> extra_env)
    : out_path_(log_dir / (name + ".out")), err_path_(log_dir / (name + ".err")) {
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    int out = ::open(out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = ::open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(err, 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    for (auto& [k, v] : extra_env) ::setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
}

ChildProcess::~ChildProcess() {
  if (!exit_code_) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

std::optional<int> ChildProcess::wait(std::chrono::milliseconds timeout) {
  if (exit_code_) return exit_code_;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    int r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_code_;
    }
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void ChildProcess::kill(int signal) { ::kill(pid_, signal); }

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); !what.empty() && at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

std::string ChildProcess::out() const { return read_file(out_path_); }
std::string ChildProcess::err() const { return read_file(err_path_); }

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

nlohmann::json loopback_nodes_config(size_t n_nodes, const nlohmann::json& timeouts) {
  auto node = [](bool secondary) {
    nlohmann::json n = {{"addr", "127.0.0.1"},
                        {"communication", {{"port", free_tcp_port()}}},
                        {"inference", {{"port_in", free_tcp_port()}, {"port_out", free_tcp_port()}}}};
    if (secondary) n["communication"]["starter_addr"] = "127.0.0.1";
    return n;
  };
  nlohmann::json config = {{"nodes", {{"starter", node(false)}, {"secondary", nlohmann::json::array()}}}};
  for (size_t i = 1; i < n_nodes; ++i) config["nodes"]["secondary"].push_back(node(true));
  config["timeouts"] = timeouts;
  return config;
}

}  // namespace mdi::test
