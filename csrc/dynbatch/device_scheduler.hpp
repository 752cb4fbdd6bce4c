#pragma once
// DeviceScheduler: decides which task's batch runs next on one device, and how many at once.
//
// Contract
// - Each task's worker asks for a grant before running a batch and releases it afterwards.
//   Grants go to the waiting batch with the largest effective task priority,
//   `task_priority + waited / aging_ns` (ties: the earlier request), so a low-priority task is
//   never starved. No barging: try_acquire() fails while anyone waits.
// - At most `concurrency` batches run at once, and the memory reserved by running batches never
//   exceeds the budget: a batch reserves its predicted peak (`reservation_bytes`; `exclusive`
//   when its task has no memory model yet, so it runs alone). The budget is the telemetry's
//   available memory minus `margin_fraction` of the total, read when the device is idle (while
//   batches run, their own use is in the reading). A batch that alone exceeds the budget runs
//   alone: the sizing keeps batches within memory; the scheduler keeps tasks from adding up.
// - All calls are thread-safe. acquire_until() sleeps (no spinning); close() wakes every waiter,
//   which then fail; grants already given stay valid until released.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>

#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct SchedulerOptions {
  std::size_t concurrency = 1; // batches running at once on the device
  Nanoseconds aging_ns = 100'000'000;
  double margin_fraction = 0.05;
};

struct GrantRequest {
  std::uint64_t task = 0;
  std::int32_t task_priority = 0;
  std::uint64_t reservation_bytes = 0;
};

struct SchedulerState {
  std::size_t running = 0;
  std::size_t waiting = 0;
  std::uint64_t reserved_bytes = 0;
  std::uint64_t budget_bytes = 0;
  std::uint64_t grants = 0;
  std::uint64_t waited_grants = 0; // grants that had to wait for their turn
  std::map<std::uint64_t, std::uint64_t> grants_by_task;
};

class DeviceScheduler {
public:
  static constexpr std::uint64_t exclusive = UINT64_MAX;

  DeviceScheduler(SchedulerOptions options, std::shared_ptr<TelemetrySampler> telemetry);

  // Grants at once when nobody waits and the batch fits; false otherwise (never blocks).
  bool try_acquire(const GrantRequest &request);
  // Waits for the request's turn and room; false on timeout or close. `since_ns` is when the
  // batch started waiting (its age ranks it): a caller that waits in several calls passes the
  // time of its first, so that it keeps its place.
  bool acquire_until(const GrantRequest &request, Nanoseconds deadline_ns,
                     Nanoseconds since_ns = no_deadline);
  void release(const GrantRequest &request);
  void close();
  bool closed() const;
  SchedulerState state() const;

private:
  struct Waiter {
    GrantRequest request;
    Nanoseconds since_ns;
  };

  // Caller holds mutex_.
  bool fits(const GrantRequest &request);
  void grant(const GrantRequest &request);
  std::list<Waiter>::iterator next_in_line(Nanoseconds now);

  const SchedulerOptions options_;
  const std::shared_ptr<TelemetrySampler> telemetry_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::list<Waiter> waiters_;
  std::size_t running_ = 0;
  std::uint64_t reserved_ = 0; // saturates at `exclusive`
  std::uint64_t budget_ = 0;
  std::uint64_t grants_ = 0;
  std::uint64_t waited_grants_ = 0;
  std::map<std::uint64_t, std::uint64_t> grants_by_task_;
  bool closed_ = false;
};

} // namespace dynbatch
