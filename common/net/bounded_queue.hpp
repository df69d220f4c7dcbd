#pragma once
// A fixed-capacity FIFO between threads: a full queue makes producers wait, which
// is how a slow consumer slows the network down instead of memory growing.
// Every wait has a timeout; close() wakes every waiter.
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace mdi {

template <class T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {
    if (capacity == 0) throw std::invalid_argument("BoundedQueue: capacity must be at least 1");
  }
  BoundedQueue(const BoundedQueue&) = delete;
  BoundedQueue& operator=(const BoundedQueue&) = delete;

  // Waits up to `timeout` for room. False on timeout or once closed; `item` is
  // moved from only when it was queued, so the caller may retry with it.
  template <class U>
  bool push(U&& item, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!not_full_.wait_for(lock, timeout, [&] { return closed_ || items_.size() < capacity_; }) || closed_)
      return false;
    items_.emplace_back(std::forward<U>(item));
    not_empty_.notify_one();
    return true;
  }

  // Waits up to `timeout` for an item. nullopt on timeout, or once closed and drained.
  std::optional<T> pop(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!not_empty_.wait_for(lock, timeout, [&] { return closed_ || !items_.empty(); })) return std::nullopt;
    return take_front();
  }

  // Waits up to `timeout` until an item is queued, and leaves it there: a consumer
  // that must take some lock of its own before it pops. False on timeout, or once
  // closed and drained.
  bool wait_for_item(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    not_empty_.wait_for(lock, timeout, [&] { return closed_ || !items_.empty(); });
    return !items_.empty();
  }

  // An item already queued, or nullopt; never waits. (A zero-timeout pop() still goes
  // to the kernel and may lose the CPU: measured, 70 µs per ring hop on 2 busy cores.)
  std::optional<T> try_pop() {
    std::lock_guard lock(mutex_);
    return take_front();
  }

  // Items already queued can still be popped; pushes fail from now on.
  void close() { close_with_error(""); }
  // As close(), recording why, for consumers that find the queue closed.
  // The first reason given is kept.
  void close_with_error(std::string why) {
    {
      std::lock_guard lock(mutex_);
      if (!closed_) error_ = std::move(why);
      closed_ = true;
    }
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  bool closed() const {
    std::lock_guard lock(mutex_);
    return closed_;
  }
  // "" while open and after a plain close().
  std::string error() const {
    std::lock_guard lock(mutex_);
    return error_;
  }
  size_t size() const {
    std::lock_guard lock(mutex_);
    return items_.size();
  }
  size_t capacity() const { return capacity_; }

 private:
  std::optional<T> take_front() {  // mutex_ held
    if (items_.empty()) return std::nullopt;
    std::optional<T> item(std::move(items_.front()));
    items_.pop_front();
    not_full_.notify_one();
    return item;
  }

  const size_t capacity_;
  mutable std::mutex mutex_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> items_;
  bool closed_ = false;
  std::string error_;
};

}  // namespace mdi
