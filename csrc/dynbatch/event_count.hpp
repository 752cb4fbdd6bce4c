#pragma once
// EventCount: lets a thread sleep until "something changed" without a lock on the fast path.
//
// Contract
// - notify() is cheap when nobody waits: one atomic increment and one atomic load.
// - A waiter calls prepare_wait(), re-checks its condition, then wait_until(key, deadline).
//   A notify() that happens after prepare_wait() is never lost.
// - cancel_wait() must follow a prepare_wait() that did not end in wait_until().
// - All calls are thread-safe. wait_until() may return spuriously; callers loop.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "dynbatch/platform.hpp"

namespace dynbatch {

class EventCount {
public:
  using Key = std::uint64_t;

  void notify() noexcept;
  Key prepare_wait() noexcept;
  void cancel_wait() noexcept;
  // Returns false when the deadline passed before a notification.
  bool wait_until(Key key, Nanoseconds deadline_ns);

private:
  alignas(cache_line_size) std::atomic<std::uint64_t> epoch_{0};
  std::atomic<std::uint32_t> waiters_{0};
  std::mutex mutex_;
  std::condition_variable changed_;
};

} // namespace dynbatch
