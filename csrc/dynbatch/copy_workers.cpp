#include "dynbatch/copy_workers.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "dynbatch/fork_guard.hpp"

namespace dynbatch {

CopyWorkers::CopyWorkers(std::size_t helpers) {
  threads_.reserve(helpers);
  for (std::size_t i = 0; i < helpers; ++i) {
    threads_.emplace_back([this] { work(); });
  }
}

CopyWorkers::~CopyWorkers() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (std::thread &thread : threads_) {
    thread.join();
  }
}

CopyWorkers &CopyWorkers::shared() {
  struct Instance {
    ForkStamp stamp;
    CopyWorkers workers{
        std::min<std::size_t>(std::max(std::thread::hardware_concurrency(), 1u) - 1, 3)};
  };
  // Never destroyed: a copy may still run on a thread Python has not stopped at exit.
  static std::atomic<Instance *> current{nullptr};
  Instance *instance = current.load(std::memory_order_acquire); // pairs with the exchange
  while (instance == nullptr || instance->stamp.forked()) {
    auto *fresh = new Instance;
    // The release publishes the new instance to acquire loads above; a loser's acquire sees
    // the winner's.
    if (current.compare_exchange_strong(instance, fresh, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
      instance = fresh; // the parent's instance, if any, is leaked
    } else {
      delete fresh; // another thread of this process was first: its threads are ours to join
    }
  }
  return instance->workers;
}

void CopyWorkers::work() {
  std::uint64_t seen = 0;
  for (;;) {
    std::unique_lock lock(mutex_);
    changed_.wait(
        lock, [&] { return stopping_ || (generation_ != seen && next_range_ < ranges_.size()); });
    if (stopping_) {
      return;
    }
    const auto [begin, end] = ranges_[next_range_++];
    if (next_range_ == ranges_.size()) {
      seen = generation_; // every range of this run is taken
    }
    const Body *body = body_;
    lock.unlock();
    std::exception_ptr error;
    try {
      (*body)(begin, end);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && !error_) {
      error_ = error;
    }
    if (--unfinished_ == 0) {
      changed_.notify_all();
    }
  }
}

void CopyWorkers::parallel_for(std::size_t count, const Body &body) {
  std::unique_lock run_lock(run_mutex_, std::try_to_lock);
  const std::size_t parts = std::min(count, threads_.size() + 1);
  if (!run_lock.owns_lock() || parts <= 1) {
    body(0, count);
    return;
  }
  const std::size_t step = (count + parts - 1) / parts;
  {
    std::lock_guard lock(mutex_);
    ranges_.clear();
    for (std::size_t begin = step; begin < count; begin += step) {
      ranges_.emplace_back(begin, std::min(count, begin + step));
    }
    body_ = &body;
    next_range_ = 0;
    unfinished_ = ranges_.size();
    error_ = nullptr;
    ++generation_;
  }
  changed_.notify_all();
  std::exception_ptr mine;
  try {
    body(0, std::min(count, step));
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return unfinished_ == 0; });
  body_ = nullptr;
  if (mine) {
    std::rethrow_exception(mine);
  }
  if (error_) {
    std::rethrow_exception(error_);
  }
}

} // namespace dynbatch
