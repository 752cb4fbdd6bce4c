#pragma once
// DispatchDelay: how long a released batch takes to be dispatched (the consumer's claim, after
// which its requests no longer expire), kept as a robust recent estimate: the slack by which a
// batch is released before a waiting request's deadline.
//
// Contract
// - record() takes one measured delay per dispatched batch; slack() may be read from any thread
//   at any time. Both are thread-safe; record() takes a short lock, slack() never does.
// - slack() is 1.5x the longest of the last `window` delays, at least `min_slack_ns` (what a
//   release always allows: the batch still has to be formed and handed over) and at most
//   `max_slack_ns` (a deadline batch is never released more than that early, however slow
//   the consumer was). It errs high on purpose: a request found late is lost, a batch
//   released a little early is only smaller; a stall leaves the window after `window`
//   batches. Before any delay is measured it is `initial_slack_ns`: a Python worker's claim
//   on a loaded host takes milliseconds, and the first requests lost to a 1 ms guess cost more
//   than a first deadline batch released 10 ms early.

#include <array>
#include <atomic>
#include <cstddef>
#include <mutex>

#include "dynbatch/platform.hpp"

namespace dynbatch {

class DispatchDelay {
public:
  static constexpr std::size_t window = 16;
  static constexpr Nanoseconds min_slack_ns = 1'000'000;
  static constexpr Nanoseconds max_slack_ns = 100'000'000;
  static constexpr Nanoseconds initial_slack_ns = 10'000'000;

  void record(Nanoseconds delay_ns);
  Nanoseconds slack() const noexcept {
    return slack_.load(std::memory_order_relaxed); // a value on its own: pairs with nothing
  }

private:
  std::mutex mutex_;
  std::array<Nanoseconds, window> recent_{}; // guarded by mutex_
  std::size_t count_ = 0;                    // delays recorded, up to window
  std::size_t next_ = 0;                     // where the next delay goes
  std::atomic<Nanoseconds> slack_{initial_slack_ns};
};

} // namespace dynbatch
