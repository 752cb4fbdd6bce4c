#include "dynbatch/event_count.hpp"

#include <chrono>

namespace dynbatch {

void EventCount::notify() noexcept {
  epoch_.fetch_add(1, std::memory_order_seq_cst); // pairs with the epoch load in prepare_wait
  // seq_cst on both sides: either we see the waiter, or the waiter sees the new epoch.
  if (waiters_.load(std::memory_order_seq_cst) != 0) { // pairs with fetch_add in prepare_wait
    // Taking the lock orders this notify after a waiter that is between its check and its wait.
    std::lock_guard lock(mutex_);
    changed_.notify_all();
  }
}

EventCount::Key EventCount::prepare_wait() noexcept {
  waiters_.fetch_add(1, std::memory_order_seq_cst); // pairs with the waiters load in notify
  return epoch_.load(std::memory_order_seq_cst);    // pairs with fetch_add in notify
}

void EventCount::cancel_wait() noexcept {
  waiters_.fetch_sub(1, std::memory_order_seq_cst); // pairs with the waiters load in notify
}

bool EventCount::wait_until(Key key, Nanoseconds deadline_ns) {
  bool notified = true;
  {
    std::unique_lock lock(mutex_);
    const auto changed = [&] {
      return epoch_.load(std::memory_order_seq_cst) != key; // pairs with fetch_add in notify
    };
    if (deadline_ns == no_deadline) {
      changed_.wait(lock, changed);
    } else {
      const auto deadline = std::chrono::steady_clock::time_point(
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::nanoseconds(deadline_ns)));
      notified = changed_.wait_until(lock, deadline, changed);
    }
  }
  cancel_wait();
  return notified;
}

} // namespace dynbatch
