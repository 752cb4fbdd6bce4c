#pragma once
// BlockingQueue<T>: MpmcRing plus sleeping waits, a deadline-bounded bulk pop and close().
//
// Contract
// - try_push / try_pop_bulk never block; push_until / pop_bulk_until / wait_for_size sleep (no
//   spinning core) until they can proceed, the deadline passes, or the queue is closed.
// - close() is idempotent and wakes every waiter. After close(), pushes fail and pops drain
//   what is left, then return 0. A push racing with close() may still land; whoever owns the
//   requests accounts for them (nothing is dropped silently by the queue itself).
// - All calls are thread-safe; sizes are snapshots.

#include <algorithm>
#include <atomic>
#include <cstddef>

#include "dynbatch/event_count.hpp"
#include "dynbatch/platform.hpp"
#include "dynbatch/request_queue.hpp"

namespace dynbatch {

enum class PushResult { ok, full, closed };

template <class T> class BlockingQueue {
public:
  explicit BlockingQueue(std::size_t capacity, std::uint64_t start_position = 0)
      : ring_(capacity, start_position) {}

  PushResult try_push(const T &value) noexcept {
    if (closed()) {
      return PushResult::closed;
    }
    if (!ring_.try_push(value)) {
      return PushResult::full;
    }
    not_empty_.notify();
    return PushResult::ok;
  }

  PushResult push_until(const T &value, Nanoseconds deadline_ns) {
    for (;;) {
      const PushResult result = try_push(value);
      if (result != PushResult::full) {
        return result;
      }
      const EventCount::Key key = not_full_.prepare_wait();
      const PushResult again = try_push(value);
      if (again != PushResult::full) {
        not_full_.cancel_wait();
        return again;
      }
      if (!not_full_.wait_until(key, deadline_ns)) {
        return try_push(value);
      }
    }
  }

  std::size_t try_pop_bulk(T *out, std::size_t max_items) noexcept {
    std::size_t count = 0;
    while (count < max_items && ring_.try_pop(out[count])) {
      ++count;
    }
    if (count != 0) {
      not_full_.notify();
    }
    return count;
  }

  // Pops until max_items were taken, the deadline passed, or the queue is closed and empty.
  std::size_t pop_bulk_until(T *out, std::size_t max_items, Nanoseconds deadline_ns) {
    std::size_t count = try_pop_bulk(out, max_items);
    while (count < max_items) {
      const EventCount::Key key = not_empty_.prepare_wait();
      count += try_pop_bulk(out + count, max_items - count);
      if (count == max_items || (closed() && ring_.was_size() == 0)) {
        not_empty_.cancel_wait();
        // A last re-check after close: a racing push may have landed.
        return count + try_pop_bulk(out + count, max_items - count);
      }
      if (!not_empty_.wait_until(key, deadline_ns)) {
        return count + try_pop_bulk(out + count, max_items - count);
      }
      count += try_pop_bulk(out + count, max_items - count);
    }
    return count;
  }

  // Waits until at least `count` items are queued, the queue is closed, or the deadline passed.
  // Returns whether one of the first two holds.
  bool wait_for_size(std::size_t count, Nanoseconds deadline_ns) {
    return wait_for_size_or(count, deadline_ns, [] { return false; });
  }

  // wait_for_size(), or until `also()` holds: a condition that whoever changes it follows
  // with wake_consumers() (checked after the wait is armed, so that wake-up is never lost).
  template <class Condition>
  bool wait_for_size_or(std::size_t count, Nanoseconds deadline_ns, Condition also) {
    const auto ready = [&] { return ring_.was_size() >= count || closed() || also(); };
    while (!ready()) {
      const EventCount::Key key = not_empty_.prepare_wait();
      if (ready()) {
        not_empty_.cancel_wait();
        return true;
      }
      if (!not_empty_.wait_until(key, deadline_ns)) {
        return ready();
      }
    }
    return true;
  }

  // Wakes consumers waiting in wait_for_size / pop_bulk_until so they look again: for a
  // consumer that took items aside and changed what another consumer waits for.
  void wake_consumers() noexcept { not_empty_.notify(); }

  void close() noexcept {
    closed_.store(true, std::memory_order_seq_cst); // pairs with the loads in closed()
    not_empty_.notify();
    not_full_.notify();
  }

  bool closed() const noexcept {
    return closed_.load(std::memory_order_seq_cst); // pairs with the store in close()
  }
  std::size_t was_size() const noexcept { return ring_.was_size(); }
  std::size_t capacity() const noexcept { return ring_.capacity(); }

private:
  MpmcRing<T> ring_;
  EventCount not_empty_;
  EventCount not_full_;
  std::atomic<bool> closed_{false};
};

} // namespace dynbatch
