#pragma once
// Frames over a connected TCP socket, for common/net's links and ring setup only:
// non-blocking syscalls with poll() deadlines on the descriptor, so every wait is
// bounded and no io_context has to be kept running.
#include <chrono>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "common/net/link.hpp"
#include "common/wire/frame.hpp"

namespace mdi::socket_io {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Asio sockets need a context; these are never driven by run(). Never destroyed,
// because a link may outlive static destruction.
asio::io_context& socket_context();

std::string ms_text(milliseconds duration);
std::string errno_text(int error);
milliseconds remaining(Clock::time_point deadline);

// Waits until `fd` is ready for `events`, at most `timeout`; false on timeout.
// POLLERR and POLLHUP count as ready: the recv/send that follows reports why.
bool wait_ready(int fd, short events, milliseconds timeout);

// One frame, header and payload in one sendmsg where it fits; gives up when the peer
// takes no byte for `idle_timeout`. Throws TransportError saying what was being sent.
void write_frame(int fd, const Frame& frame, milliseconds idle_timeout);
// One frame, its header validated against `limits` before the payload is allocated;
// gives up when no byte arrives for `idle_timeout`. Throws TransportError.
Frame read_frame(int fd, const FrameLimits& limits, milliseconds idle_timeout);

// What a link of `config` built with `options` accepts: the smaller payload cap wins.
FrameLimits frame_limits(const NodesConfig& config, const LinkOptions& options);

// A TcpLink over `socket`, once ring setup has connected it and exchanged Hellos.
std::unique_ptr<TcpLink> make_tcp_link(tcp::socket socket, std::string peer, const NodesConfig& config, const LinkOptions& options);

}  // namespace mdi::socket_io
