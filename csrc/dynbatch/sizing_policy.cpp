#include "dynbatch/sizing_policy.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace dynbatch {
namespace {
constexpr double smoothing = 0.5;      // weight of a new measurement in the per-size average
constexpr double finest_step = 1.05;   // below this the climb has converged
constexpr double reprobe_step = 1.25;  // a converged climb re-checks its neighbours with this
constexpr std::size_t remembered_sizes = 32;
} // namespace

ThroughputClimb::ThroughputClimb(const ThroughputClimbOptions& options)
    : options_(options), current_(options.min_batch_size), step_(options.initial_step),
      memory_ceiling_(options.max_batch_size) {
  if (options.min_batch_size < 1 || options.max_batch_size < options.min_batch_size) {
    throw std::invalid_argument("ThroughputClimb: need 1 <= min_batch_size <= max_batch_size");
  }
  if (options.initial_step <= 1.0) {
    throw std::invalid_argument("ThroughputClimb: initial_step must be above 1");
  }
}

std::size_t ThroughputClimb::clamp(double size) const {
  const double bounded = std::clamp(size, static_cast<double>(options_.min_batch_size),
                                    static_cast<double>(options_.max_batch_size));
  return static_cast<std::size_t>(std::llround(bounded));
}

std::size_t ThroughputClimb::next_batch_size(const SizingInputs& inputs) {
  std::lock_guard lock(mutex_);
  memory_ceiling_ = options_.max_batch_size;
  const std::uint64_t available = inputs.telemetry.memory_available_bytes;
  if (inputs.bytes_per_sample > 0 && available > 0) {
    const double fits = static_cast<double>(available) * options_.memory_fraction /
                        static_cast<double>(inputs.bytes_per_sample);
    memory_ceiling_ = clamp(std::floor(fits));
  }
  return std::min(current_, memory_ceiling_);
}

void ThroughputClimb::move() {
  const double factor = direction_ > 0 ? step_ : 1.0 / step_;
  std::size_t next = clamp(static_cast<double>(current_) * factor);
  if (next == current_) {
    next = clamp(static_cast<double>(current_) + direction_);
  }
  if (next == current_) { // pinned at a bound: nothing left to probe on this side
    converged_ = true;
    held_batches_ = 0;
    return;
  }
  current_ = next;
}

void ThroughputClimb::on_feedback(const BatchFeedback& feedback) {
  std::lock_guard lock(mutex_);
  const std::size_t size = feedback.batch_size;
  const Nanoseconds period = std::max(feedback.compute_ns, feedback.collate_ns);
  if (size == 0 || period <= 0) {
    return;
  }
  const double cost = static_cast<double>(period) / static_cast<double>(size);
  auto [entry, inserted] = cost_per_sample_.try_emplace(size, cost);
  if (!inserted) {
    entry->second = (1.0 - smoothing) * entry->second + smoothing * cost;
  }
  if (cost_per_sample_.size() > remembered_sizes) {
    // Forget the size farthest from where the climb is now.
    auto farthest = std::abs(static_cast<double>(cost_per_sample_.begin()->first) -
                             static_cast<double>(current_)) >
                            std::abs(static_cast<double>(cost_per_sample_.rbegin()->first) -
                                     static_cast<double>(current_))
                        ? cost_per_sample_.begin()
                        : std::prev(cost_per_sample_.end());
    cost_per_sample_.erase(farthest);
  }
  if (size != current_) {
    return; // a batch formed before the last decision: remembered, not acted on
  }
  const double current_cost = cost_per_sample_.at(size);

  if (converged_) {
    if (++held_batches_ < options_.reprobe_after) {
      return;
    }
    converged_ = false;
    step_ = reprobe_step;
    previous_ = 0;
  }
  if (previous_ == 0 || current_cost < previous_cost_ * (1.0 - options_.tolerance)) {
    previous_ = current_;
    previous_cost_ = current_cost;
    move();
    return;
  }
  // No better than the previous size: return to it and probe the other side, more finely.
  const std::size_t better = current_cost < previous_cost_ ? current_ : previous_;
  const double better_cost = std::min(current_cost, previous_cost_);
  direction_ = -direction_;
  step_ = std::sqrt(step_);
  current_ = better;
  previous_ = better;
  previous_cost_ = better_cost;
  if (step_ < finest_step) {
    converged_ = true;
    held_batches_ = 0;
    return;
  }
  move();
}

SizingState ThroughputClimb::state() const {
  std::lock_guard lock(mutex_);
  SizingState state;
  state.target = current_;
  state.memory_ceiling = memory_ceiling_;
  state.step = step_;
  state.converged = converged_;
  for (const auto& [size, cost] : cost_per_sample_) {
    const double rate = 1e9 / cost;
    if (rate > state.best_samples_per_second) {
      state.best_samples_per_second = rate;
      state.best_size = size;
    }
  }
  return state;
}

} // namespace dynbatch
