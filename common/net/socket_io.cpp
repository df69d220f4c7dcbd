#include "common/net/socket_io.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <system_error>

namespace mdi::socket_io {

asio::io_context& socket_context() {
  static auto* context = new asio::io_context;
  return *context;
}

std::string ms_text(milliseconds duration) { return std::to_string(duration.count()) + " ms"; }

std::string errno_text(int error) { return std::system_category().message(error); }

milliseconds remaining(Clock::time_point deadline) {
  return std::max(milliseconds(0), std::chrono::ceil<milliseconds>(deadline - Clock::now()));
}

bool wait_ready(int fd, short events, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  pollfd watched{fd, events, 0};
  for (;;) {
    const auto wait_ms = std::min<int64_t>(remaining(deadline).count(), std::numeric_limits<int>::max());
    const int ready = ::poll(&watched, 1, static_cast<int>(wait_ms));
    if (ready > 0) return true;
    if (ready == 0) return false;
    if (errno != EINTR) throw TransportError("poll: " + errno_text(errno));
  }
}

namespace {

// Reads exactly `size` bytes, giving up when no byte arrives for `idle_timeout`.
void read_exact(int fd, uint8_t* data, size_t size, milliseconds idle_timeout) {
  size_t done = 0;
  auto progress = [&] {
    return done == 0 ? std::string() : " after " + std::to_string(done) + " of " + std::to_string(size) + " bytes";
  };
  while (done < size) {
    if (!wait_ready(fd, POLLIN, idle_timeout))
      throw TransportError("no data for " + ms_text(idle_timeout) + " (receive timeout)" + progress());
    const ssize_t got = ::recv(fd, data + done, size - done, MSG_DONTWAIT);
    if (got > 0) {
      done += static_cast<size_t>(got);
    } else if (got == 0) {
      throw TransportError("peer closed the connection" + progress());
    } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
      throw TransportError("recv: " + errno_text(errno) + progress());
    }
  }
}

// Writes all of `parts`, giving up when the peer takes no byte for `idle_timeout`.
void write_all(int fd, iovec* parts, size_t n_parts, milliseconds idle_timeout) {
  while (n_parts > 0) {
    msghdr message{};
    message.msg_iov = parts;
    message.msg_iovlen = n_parts;
    // MSG_NOSIGNAL: a vanished peer must give EPIPE here, not a SIGPIPE that kills the process.
    const ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) throw TransportError("send: " + errno_text(errno));
      if (!wait_ready(fd, POLLOUT, idle_timeout))
        throw TransportError("peer took no data for " + ms_text(idle_timeout) + " (receive timeout)");
      continue;
    }
    for (size_t left = static_cast<size_t>(sent); left > 0;) {
      const size_t step = std::min(left, parts->iov_len);
      parts->iov_base = static_cast<uint8_t*>(parts->iov_base) + step;
      parts->iov_len -= step;
      left -= step;
      if (parts->iov_len == 0) {
        ++parts;
        --n_parts;
      }
    }
  }
}

}  // namespace

void write_frame(int fd, const Frame& frame, milliseconds idle_timeout) {
  uint8_t header[kFrameHeaderBytes];
  encode_header(frame.header, header);
  iovec parts[2] = {{header, sizeof header}, {const_cast<uint8_t*>(frame.payload.data()), frame.payload.size()}};
  try {
    write_all(fd, parts, frame.payload.empty() ? 1 : 2, idle_timeout);
  } catch (const std::exception& e) {
    throw TransportError(std::string("sending ") + frame_type_name(frame.header.type) + " frame: " + e.what());
  }
}

Frame read_frame(int fd, const FrameLimits& limits, milliseconds idle_timeout) {
  Frame frame;
  try {
    uint8_t header[kFrameHeaderBytes];
    read_exact(fd, header, sizeof header, idle_timeout);
    frame.header = decode_header(header, limits);
  } catch (const std::exception& e) {
    throw TransportError(std::string("receiving frame header: ") + e.what());
  }
  try {
    frame.payload.resize(frame.header.payload_bytes);
    read_exact(fd, frame.payload.data(), frame.payload.size(), idle_timeout);
  } catch (const std::exception& e) {
    throw TransportError(std::string("receiving ") + frame_type_name(frame.header.type) + " payload of " +
                         std::to_string(frame.header.payload_bytes) + " bytes: " + e.what());
  }
  return frame;
}

}  // namespace mdi::socket_io
