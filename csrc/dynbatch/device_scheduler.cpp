#include "dynbatch/device_scheduler.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace dynbatch {

DeviceScheduler::DeviceScheduler(SchedulerOptions options,
                                 std::shared_ptr<TelemetrySampler> telemetry,
                                 std::function<Nanoseconds()> clock)
    : options_(options), telemetry_(std::move(telemetry)), clock_(std::move(clock)) {
  if (options.concurrency < 1 || options.aging_ns <= 0 || !(options.margin_fraction >= 0.0) ||
      options.margin_fraction >= 1.0 || options.max_hold_ns < 0) {
    throw std::invalid_argument("DeviceScheduler: concurrency >= 1, aging_ns > 0, "
                                "margin_fraction in [0, 1) and max_hold_ns >= 0");
  }
  if (!telemetry_) {
    throw std::invalid_argument("DeviceScheduler: telemetry is required");
  }
  if (!clock_) {
    throw std::invalid_argument("DeviceScheduler: clock is required");
  }
}

bool DeviceScheduler::fits(const GrantRequest &request, std::size_t ahead_count,
                           std::uint64_t ahead_bytes) {
  if (running_ == 0) {
    // Idle: the reading holds no batch of ours, so it is the room batches may share.
    const TelemetrySample reading = telemetry_->latest();
    const auto margin = static_cast<std::uint64_t>(options_.margin_fraction *
                                                   static_cast<double>(reading.memory_total_bytes));
    budget_ = reading.memory_available_bytes > margin ? reading.memory_available_bytes - margin : 0;
  }
  const std::size_t running = running_ + ahead_count;
  if (running >= options_.concurrency) {
    return false;
  }
  if (running == 0) {
    return true; // alone, any batch runs: its size is the sizing's business
  }
  const std::uint64_t reserved =
      reserved_ == exclusive || ahead_bytes == exclusive || ahead_bytes > exclusive - reserved_
          ? exclusive
          : reserved_ + ahead_bytes;
  if (request.reservation_bytes == exclusive || reserved == exclusive) {
    return false;
  }
  return reserved + request.reservation_bytes <= budget_;
}

std::int64_t DeviceScheduler::rank(std::int32_t priority, Nanoseconds since,
                                   Nanoseconds now) const {
  return priority + std::max<Nanoseconds>(now - since, 0) / options_.aging_ns;
}

bool DeviceScheduler::fits_now(const GrantRequest &request, Nanoseconds since, Nanoseconds now) {
  // Holds that outrank the request keep their room (ties: the earlier, as for waiters; a
  // release and an ask at the same instant: the release).
  std::size_t ahead_count = 0;
  std::uint64_t ahead_bytes = 0;
  const std::int64_t mine = rank(request.task_priority, since, now);
  for (const Hold &hold : holds_) {
    if (hold.request.task == request.task) {
      continue;
    }
    const std::int64_t theirs = rank(hold.request.task_priority, hold.since_ns, now);
    if (theirs > mine || (theirs == mine && hold.since_ns <= since)) {
      ++ahead_count;
      const std::uint64_t bytes = hold.request.reservation_bytes;
      ahead_bytes =
          bytes == exclusive || bytes > exclusive - ahead_bytes ? exclusive : ahead_bytes + bytes;
    }
  }
  return fits(request, ahead_count, ahead_bytes);
}

void DeviceScheduler::grant(const GrantRequest &request) {
  ++running_;
  reserved_ = request.reservation_bytes == exclusive || reserved_ == exclusive
                  ? exclusive
                  : reserved_ + request.reservation_bytes;
  ++grants_;
  ++grants_by_task_[request.task];
}

std::list<DeviceScheduler::Waiter>::iterator DeviceScheduler::next_in_line(Nanoseconds now) {
  auto best = waiters_.end();
  std::int64_t best_rank = 0;
  for (auto waiter = waiters_.begin(); waiter != waiters_.end(); ++waiter) {
    const std::int64_t waiter_rank = rank(waiter->request.task_priority, waiter->since_ns, now);
    if (best == waiters_.end() || waiter_rank > best_rank) { // ties: the earlier (list order)
      best = waiter;
      best_rank = waiter_rank;
    }
  }
  return best;
}

void DeviceScheduler::note_ask(std::uint64_t task, Nanoseconds now) {
  const auto gaps = gaps_.find(task);
  if (gaps == gaps_.end()) {
    return;
  }
  TaskGaps &mine = gaps->second;
  if (mine.released_ns >= 0) {
    mine.gaps[mine.next] = std::max<Nanoseconds>(now - mine.released_ns, 0);
    mine.next = (mine.next + 1) % hold_gap_count;
    mine.count = std::min(mine.count + 1, hold_gap_count);
    mine.released_ns = -1;
  }
  mine.seen_ns = now;
}

void DeviceScheduler::end_hold(std::uint64_t task) {
  const auto held = std::find_if(holds_.begin(), holds_.end(),
                                 [&](const Hold &hold) { return hold.request.task == task; });
  if (held != holds_.end()) {
    holds_.erase(held);
    changed_.notify_all(); // a waiter it kept out may go now
  }
}

void DeviceScheduler::start_hold(const GrantRequest &request, Nanoseconds now) {
  auto gaps = gaps_.find(request.task);
  if (gaps == gaps_.end()) {
    if (gaps_.size() >= tracked_tasks) { // forget the task seen least recently
      gaps_.erase(std::min_element(gaps_.begin(), gaps_.end(), [](const auto &a, const auto &b) {
        return a.second.seen_ns < b.second.seen_ns;
      }));
    }
    gaps = gaps_.emplace(request.task, TaskGaps{}).first;
  }
  TaskGaps &mine = gaps->second;
  mine.released_ns = now;
  mine.seen_ns = now;
  if (mine.count == 0) {
    return; // nothing measured yet: a hold's length must come from this task's own gaps
  }
  const Nanoseconds longest = *std::max_element(mine.gaps.begin(), mine.gaps.begin() + mine.count);
  // A gap is noisy (GIL hand-offs, late wake-ups): a hold that ends just before its task asks
  // gives the device away for a whole batch, while one that lasts longer than needed idles the
  // device only when the task's backlog vanished or its worker stalled.
  const Nanoseconds length = longest >= options_.max_hold_ns / hold_gap_factor
                                 ? options_.max_hold_ns
                                 : hold_gap_factor * longest;
  holds_.push_back(Hold{request, now, now + length});
  ++holds_started_;
}

void DeviceScheduler::drop_expired_holds(Nanoseconds now) {
  std::erase_if(holds_, [&](const Hold &hold) { return hold.until_ns <= now; });
}

Nanoseconds DeviceScheduler::earliest_hold_end() const {
  Nanoseconds earliest = no_deadline;
  for (const Hold &hold : holds_) {
    earliest = std::min(earliest, hold.until_ns);
  }
  return earliest;
}

bool DeviceScheduler::try_acquire(const GrantRequest &request) {
  std::lock_guard lock(mutex_);
  const Nanoseconds now = clock_();
  note_ask(request.task, now);
  drop_expired_holds(now);
  // A refused ask keeps the task's hold: it is about to wait (acquire_until), and the hold
  // keeps its place until then.
  if (closed_ || !waiters_.empty() || !fits_now(request, now, now)) {
    return false;
  }
  end_hold(request.task);
  grant(request);
  return true;
}

bool DeviceScheduler::acquire_until(const GrantRequest &request, Nanoseconds deadline_ns,
                                    Nanoseconds since_ns) {
  std::unique_lock lock(mutex_);
  const Nanoseconds asked = clock_();
  note_ask(request.task, asked);
  end_hold(request.task); // the waiter takes its place, ranked by its own age
  const Nanoseconds since = since_ns == no_deadline ? asked : std::min(since_ns, asked);
  const auto me = waiters_.insert(waiters_.end(), Waiter{request, since});
  for (;;) {
    if (closed_) {
      break;
    }
    const Nanoseconds now = clock_();
    drop_expired_holds(now);
    if (next_in_line(now) == me && fits_now(request, since, now)) {
      waiters_.erase(me);
      grant(request);
      ++waited_grants_;
      changed_.notify_all(); // the next in line may fit too
      return true;
    }
    // Aging changes who is next as time passes, and holds expire: re-rank at either.
    Nanoseconds wake_at = std::min(now + options_.aging_ns, earliest_hold_end());
    if (deadline_ns != no_deadline) {
      if (now >= deadline_ns) {
        break;
      }
      wake_at = std::min(wake_at, deadline_ns);
    }
    changed_.wait_for(lock, std::chrono::nanoseconds(std::max<Nanoseconds>(wake_at - now, 0)));
  }
  waiters_.erase(me);
  changed_.notify_all(); // whoever was behind this waiter may be next now
  return false;
}

void DeviceScheduler::release(const GrantRequest &request, bool more_queued) {
  std::lock_guard lock(mutex_);
  if (running_ == 0) {
    throw std::logic_error("DeviceScheduler::release without a grant");
  }
  --running_;
  if (running_ == 0) {
    reserved_ = 0;
  } else if (reserved_ != exclusive) {
    reserved_ -= std::min(reserved_, request.reservation_bytes);
  }
  const Nanoseconds now = clock_();
  // One hold per task: the latest release says whether the task has more queued.
  std::erase_if(holds_, [&](const Hold &hold) { return hold.request.task == request.task; });
  if (more_queued && options_.max_hold_ns > 0 && !closed_) {
    start_hold(request, now);
  } else if (const auto gaps = gaps_.find(request.task); gaps != gaps_.end()) {
    gaps->second.released_ns = -1; // its next ask waits for new work: not a gap to learn
  }
  changed_.notify_all();
}

void DeviceScheduler::close() {
  std::lock_guard lock(mutex_);
  closed_ = true;
  holds_.clear();
  changed_.notify_all();
}

bool DeviceScheduler::closed() const {
  std::lock_guard lock(mutex_);
  return closed_;
}

SchedulerState DeviceScheduler::state() const {
  std::lock_guard lock(mutex_);
  SchedulerState state;
  state.running = running_;
  state.waiting = waiters_.size();
  state.reserved_bytes = reserved_;
  state.budget_bytes = budget_;
  state.grants = grants_;
  state.waited_grants = waited_grants_;
  state.holds = holds_started_;
  const Nanoseconds now = clock_();
  state.holding = static_cast<std::size_t>(
      std::count_if(holds_.begin(), holds_.end(), [&](const Hold &h) { return h.until_ns > now; }));
  state.grants_by_task = grants_by_task_;
  return state;
}

} // namespace dynbatch
