#include "dynbatch/sizing_policy.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace dynbatch {
namespace {
constexpr double smoothing = 0.5;    // weight of a new measurement in the per-size average
constexpr double reprobe_span = 1.5; // a held size re-checks this far on either side
constexpr std::size_t remembered_sizes = 32;
} // namespace

ThroughputClimb::ThroughputClimb(const ThroughputClimbOptions &options)
    : options_(options), current_(options.min_batch_size), memory_ceiling_(options.max_batch_size) {
  if (options.min_batch_size < 1 || options.max_batch_size < options.min_batch_size) {
    throw std::invalid_argument("ThroughputClimb: need 1 <= min_batch_size <= max_batch_size");
  }
  if (options.batches_per_probe < 1) {
    throw std::invalid_argument("ThroughputClimb: batches_per_probe must be at least 1");
  }
  if (options.growth <= 1.0 || options.tight <= 1.0) {
    throw std::invalid_argument("ThroughputClimb: growth and tight must be above 1");
  }
}

std::size_t ThroughputClimb::clamp(double size) const {
  const double bounded = std::clamp(size, static_cast<double>(options_.min_batch_size),
                                    static_cast<double>(options_.max_batch_size));
  return static_cast<std::size_t>(std::llround(bounded));
}

std::size_t ThroughputClimb::next_batch_size(const SizingInputs &inputs) {
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

void ThroughputClimb::probe(std::size_t size) {
  current_ = size;
  probe_batches_ = 0;
  probe_cost_ = 0.0;
}

void ThroughputClimb::on_feedback(const BatchFeedback &feedback) {
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
    const auto distance = [&](std::size_t other) {
      return std::abs(std::log(static_cast<double>(other) / static_cast<double>(current_)));
    };
    cost_per_sample_.erase(distance(cost_per_sample_.begin()->first) >
                                   distance(cost_per_sample_.rbegin()->first)
                               ? cost_per_sample_.begin()
                               : std::prev(cost_per_sample_.end()));
  }
  if (size != current_) {
    return; // a batch formed before the last decision, or cut by memory: not a probe result
  }
  probe_cost_ = probe_batches_ == 0 ? cost : std::min(probe_cost_, cost);
  if (++probe_batches_ < options_.batches_per_probe) {
    return;
  }
  judge(probe_cost_);
}

void ThroughputClimb::judge(double cost) {
  const bool better = best_ == 0 || cost < best_cost_ * (1.0 - options_.tolerance);
  switch (phase_) {
  case Phase::holding:
    // Re-measure the held size, then look around it again.
    best_cost_ = cost;
    if (++held_batches_ * options_.batches_per_probe < options_.reprobe_after) {
      probe(best_);
      return;
    }
    lower_ = clamp(static_cast<double>(best_) / reprobe_span);
    upper_ = clamp(static_cast<double>(best_) * reprobe_span);
    phase_ = Phase::narrowing;
    narrow();
    return;
  case Phase::expanding:
    if (better) {
      lower_ = best_ == 0 ? current_ : best_;
      best_ = current_;
      best_cost_ = cost;
      const std::size_t next = clamp(static_cast<double>(current_) * options_.growth);
      if (next == current_) { // reached the maximum
        phase_ = Phase::holding;
        held_batches_ = 0;
        probe(best_);
        return;
      }
      probe(next);
      return;
    }
    upper_ = current_;
    phase_ = Phase::narrowing;
    narrow();
    return;
  case Phase::narrowing:
    if (better) {
      (current_ > best_ ? lower_ : upper_) = best_;
      best_ = current_;
      best_cost_ = cost;
    } else {
      (current_ > best_ ? upper_ : lower_) = current_;
    }
    narrow();
    return;
  }
}

void ThroughputClimb::narrow() {
  // Probe the geometric middle of the wider side of the bracket around the best size.
  const double best = static_cast<double>(best_);
  const double above = static_cast<double>(upper_) / best;
  const double below = best / static_cast<double>(lower_);
  const bool go_up = above >= below;
  const double middle = go_up ? std::sqrt(best * static_cast<double>(upper_))
                              : std::sqrt(best * static_cast<double>(lower_));
  const std::size_t next = clamp(middle);
  if (std::max(above, below) <= options_.tight || next == best_ || next == upper_ ||
      next == lower_) {
    phase_ = Phase::holding;
    held_batches_ = 0;
    probe(best_);
    return;
  }
  probe(next);
}

SizingState ThroughputClimb::state() const {
  std::lock_guard lock(mutex_);
  SizingState state;
  state.target = current_;
  state.memory_ceiling = memory_ceiling_;
  state.converged = phase_ == Phase::holding;
  state.best_size = best_;
  state.best_samples_per_second = best_cost_ > 0.0 ? 1e9 / best_cost_ : 0.0;
  return state;
}

} // namespace dynbatch
