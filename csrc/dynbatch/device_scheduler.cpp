#include "dynbatch/device_scheduler.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace dynbatch {

DeviceScheduler::DeviceScheduler(SchedulerOptions options,
                                 std::shared_ptr<TelemetrySampler> telemetry)
    : options_(options), telemetry_(std::move(telemetry)) {
  if (options.concurrency < 1 || options.aging_ns <= 0 || !(options.margin_fraction >= 0.0) ||
      options.margin_fraction >= 1.0) {
    throw std::invalid_argument(
        "DeviceScheduler: concurrency >= 1, aging_ns > 0 and margin_fraction in [0, 1)");
  }
  if (!telemetry_) {
    throw std::invalid_argument("DeviceScheduler: telemetry is required");
  }
}

bool DeviceScheduler::fits(const GrantRequest &request) {
  if (running_ >= options_.concurrency) {
    return false;
  }
  if (running_ == 0) {
    // Idle: the reading holds no batch of ours, so it is the room batches may share.
    const TelemetrySample reading = telemetry_->latest();
    const auto margin = static_cast<std::uint64_t>(options_.margin_fraction *
                                                   static_cast<double>(reading.memory_total_bytes));
    budget_ = reading.memory_available_bytes > margin ? reading.memory_available_bytes - margin : 0;
    return true; // alone, any batch runs: its size is the sizing's business
  }
  if (request.reservation_bytes == exclusive || reserved_ == exclusive) {
    return false;
  }
  return reserved_ + request.reservation_bytes <= budget_;
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
    const std::int64_t rank =
        waiter->request.task_priority + (now - waiter->since_ns) / options_.aging_ns;
    if (best == waiters_.end() || rank > best_rank) { // ties: the earlier (list order)
      best = waiter;
      best_rank = rank;
    }
  }
  return best;
}

bool DeviceScheduler::try_acquire(const GrantRequest &request) {
  std::lock_guard lock(mutex_);
  if (closed_ || !waiters_.empty() || !fits(request)) {
    return false;
  }
  grant(request);
  return true;
}

bool DeviceScheduler::acquire_until(const GrantRequest &request, Nanoseconds deadline_ns,
                                    Nanoseconds since_ns) {
  std::unique_lock lock(mutex_);
  const Nanoseconds since = since_ns == no_deadline ? now_ns() : std::min(since_ns, now_ns());
  const auto me = waiters_.insert(waiters_.end(), Waiter{request, since});
  for (;;) {
    if (closed_) {
      break;
    }
    if (next_in_line(now_ns()) == me && fits(request)) {
      waiters_.erase(me);
      grant(request);
      ++waited_grants_;
      changed_.notify_all(); // the next in line may fit too
      return true;
    }
    if (deadline_ns == no_deadline) {
      // Aging changes who is next as time passes, not only on release: re-rank each period.
      changed_.wait_for(lock, std::chrono::nanoseconds(options_.aging_ns));
    } else {
      if (now_ns() >= deadline_ns) {
        break;
      }
      const Nanoseconds step = std::min(options_.aging_ns, deadline_ns - now_ns());
      changed_.wait_for(lock, std::chrono::nanoseconds(std::max<Nanoseconds>(step, 0)));
    }
  }
  waiters_.erase(me);
  changed_.notify_all(); // whoever was behind this waiter may be next now
  return false;
}

void DeviceScheduler::release(const GrantRequest &request) {
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
  changed_.notify_all();
}

void DeviceScheduler::close() {
  std::lock_guard lock(mutex_);
  closed_ = true;
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
  state.grants_by_task = grants_by_task_;
  return state;
}

} // namespace dynbatch
