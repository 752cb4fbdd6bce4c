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
// - Holds: a task that releases a grant saying it has more work queued (`more_queued`) keeps
//   the device for its next batch while its worker finishes the last one (splits outputs,
//   completes futures) and forms the next. Until the task is granted or waits again
//   (acquire_until; a refused try_acquire keeps the hold), or the hold expires, a waiter that
//   the task would outrank is not granted the room the hold keeps (one batch, with the
//   released grant's reservation). The hold ranks like a waiter that started waiting at the
//   release (aging lets a starved task through); it lasts `hold_gap_factor` times the longest
//   of the task's last `hold_gap_count` measured release-to-ask gaps, at most `max_hold_ns`. A task
//   with no measured gap yet, or a release without more queued (the backlog is gone), holds
//   nothing; `max_hold_ns = 0` turns holds off.
// - All calls are thread-safe. acquire_until() sleeps (no spinning); close() wakes every waiter,
//   which then fail; grants already given stay valid until released. The clock is injectable
//   (tests); waits sleep in real time, so a fake clock suits the calls that never wait.

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct SchedulerOptions {
  std::size_t concurrency = 1; // batches running at once on the device
  Nanoseconds aging_ns = 100'000'000;
  double margin_fraction = 0.05;
  // The longest a task with more work queued keeps the device between two of its batches;
  // 0: no holds (a lower task may take the device whenever the higher one has not asked yet).
  Nanoseconds max_hold_ns = 50'000'000;
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
  std::uint64_t holds = 0;         // releases that kept the device for their task's next batch
  std::size_t holding = 0;         // holds in force now
  std::map<std::uint64_t, std::uint64_t> grants_by_task;
};

class DeviceScheduler {
public:
  static constexpr std::uint64_t exclusive = UINT64_MAX;

  static constexpr std::size_t hold_gap_count = 16; // release-to-ask gaps kept per task
  static constexpr Nanoseconds hold_gap_factor = 4; // a hold: this times the longest gap
  static constexpr std::size_t tracked_tasks = 64;  // tasks whose gaps are kept (least recent go)

  DeviceScheduler(SchedulerOptions options, std::shared_ptr<TelemetrySampler> telemetry,
                  std::function<Nanoseconds()> clock = now_ns);

  // Grants at once when nobody waits and the batch fits; false otherwise (never blocks).
  bool try_acquire(const GrantRequest &request);
  // Waits for the request's turn and room; false on timeout or close. `since_ns` is when the
  // batch started waiting (its age ranks it): a caller that waits in several calls passes the
  // time of its first, so that it keeps its place.
  bool acquire_until(const GrantRequest &request, Nanoseconds deadline_ns,
                     Nanoseconds since_ns = no_deadline);
  // `more_queued`: the task has another batch waiting (it keeps the device for it, see Holds).
  void release(const GrantRequest &request, bool more_queued = false);
  void close();
  bool closed() const;
  SchedulerState state() const;

private:
  struct Waiter {
    GrantRequest request;
    Nanoseconds since_ns;
  };
  struct Hold {
    GrantRequest request; // the released grant: its task, priority and reservation
    Nanoseconds since_ns; // the release: the hold ranks as a waiter from then
    Nanoseconds until_ns;
  };
  struct TaskGaps {
    Nanoseconds released_ns = -1; // released with more queued and not asked since; -1: none
    Nanoseconds seen_ns = 0;      // last release or ask, to forget the least recent task
    std::array<Nanoseconds, hold_gap_count> gaps{};
    std::size_t count = 0; // gaps measured, up to hold_gap_count
    std::size_t next = 0;  // where the next gap goes
  };

  // Caller holds mutex_.
  // Room for `request` next to the running batches and `ahead` (holds that outrank it).
  bool fits(const GrantRequest &request, std::size_t ahead_count, std::uint64_t ahead_bytes);
  bool fits_now(const GrantRequest &request, Nanoseconds since, Nanoseconds now);
  void grant(const GrantRequest &request);
  std::list<Waiter>::iterator next_in_line(Nanoseconds now);
  std::int64_t rank(std::int32_t priority, Nanoseconds since, Nanoseconds now) const;
  // A task asks for a grant: its release-to-ask gap is measured.
  void note_ask(std::uint64_t task, Nanoseconds now);
  // The task runs or waits now: its hold (if any) ends.
  void end_hold(std::uint64_t task);
  void start_hold(const GrantRequest &request, Nanoseconds now);
  void drop_expired_holds(Nanoseconds now);
  Nanoseconds earliest_hold_end() const;

  const SchedulerOptions options_;
  const std::shared_ptr<TelemetrySampler> telemetry_;
  const std::function<Nanoseconds()> clock_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::list<Waiter> waiters_;
  std::size_t running_ = 0;
  std::uint64_t reserved_ = 0; // saturates at `exclusive`
  std::uint64_t budget_ = 0;
  std::uint64_t grants_ = 0;
  std::uint64_t waited_grants_ = 0;
  std::map<std::uint64_t, std::uint64_t> grants_by_task_;
  std::vector<Hold> holds_; // at most one per task
  std::map<std::uint64_t, TaskGaps> gaps_;
  std::uint64_t holds_started_ = 0;
  bool closed_ = false;
};

} // namespace dynbatch
