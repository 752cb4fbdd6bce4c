#include "dynbatch/cost_model.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace dynbatch {

namespace {
constexpr double speed_gain = 0.25; // how far one time moves the speed towards its own
constexpr double speed_step = 1.5;  // one time counts as at most this much slower or faster
// The speed is relative and wanders with the noise (a few % a batch, unbounded over a long
// run): beyond this factor either way the stored times are brought back to the current speed.
constexpr double speed_rebase = 2.0;
} // namespace

LinearFit::LinearFit(Robust robust, std::size_t history, bool binned, bool follows_speed)
    : robust_(robust), history_(history), binned_(binned),
      follows_speed_(follows_speed && robust == Robust::median) {
  if (history < 2) {
    throw std::invalid_argument("LinearFit: history must be at least 2");
  }
}

double LinearFit::summary_of(const Point &point) const {
  std::array<double, median_window> values = point.recent;
  const std::size_t filled = std::min(point.filled, median_window);
  if (robust_ == Robust::high) {
    return *std::max_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(filled));
  }
  // Insertion sort of at most median_window values (std::sort's unrolled prologue trips GCC
  // 12's -Warray-bounds at -O3 on an array this small).
  for (std::size_t i = 1; i < filled; ++i) {
    for (std::size_t j = i; j > 0 && values[j - 1] > values[j]; --j) {
      std::swap(values[j - 1], values[j]);
    }
  }
  const std::size_t half = filled / 2;
  return filled % 2 == 1 ? values[half] : 0.5 * (values[half - 1] + values[half]);
}

double LinearFit::mean_x_of(const Point &point) noexcept {
  double sum = 0.0;
  for (std::size_t i = 0; i < point.filled; ++i) {
    sum += point.recent_x[i];
  }
  return point.filled > 0 ? sum / static_cast<double>(point.filled) : 0.0;
}

double LinearFit::key_of(double x) const noexcept {
  constexpr double bins_per_octave = 8.0;
  return binned_ && x > 0.0 ? std::round(std::log2(x) * bins_per_octave) : x;
}

void LinearFit::add(double x, double y) {
  const double key = key_of(x);
  record(key, x, follows_speed_ ? in_line_units(key, x, y) : y, 1);
}

void LinearFit::restore(const Summary &point) {
  record(key_of(point.x), point.x, point.y / speed_, std::max<std::size_t>(point.count, 1));
}

double LinearFit::in_line_units(double key, double x, double y) {
  double scaled = y / speed_;
  const auto found = points_.find(key);
  if (found == points_.end()) {
    return scaled; // a new size says nothing about the speed: the line may just miss it
  }
  const Point &point = found->second;
  const double expected = point.y + slope_ * (x - point.x); // a bin's x varies a little
  if (expected > 0.0) {
    const double speed = std::clamp(y / expected, speed_ / speed_step, speed_ * speed_step);
    speed_ += speed_gain * (speed - speed_);
  }
  if (speed_ > speed_rebase || speed_ < 1.0 / speed_rebase) {
    scaled *= speed_; // in the units rebase() leaves
    rebase();
  }
  return scaled;
}

void LinearFit::rebase() {
  for (auto &[key, point] : points_) {
    for (std::size_t i = 0; i < point.filled; ++i) {
      point.recent[i] *= speed_;
    }
    point.y *= speed_; // a median or maximum scales with its values
  }
  intercept_ *= speed_;
  slope_ *= speed_;
  speed_ = 1.0;
}

void LinearFit::record(double key, double x, double y, std::size_t repeats) {
  ++count_;
  Point &point = points_[key];
  for (std::size_t i = 0; i < std::min(repeats, window()); ++i) {
    point.recent_x[point.next] = x;
    point.recent[point.next] = y;
    point.next = (point.next + 1) % window();
    point.filled = std::min(point.filled + 1, window());
  }
  point.last_added = count_;
  point.x = mean_x_of(point);
  point.y = summary_of(point);
  // Forget stale sizes oldest first, but keep two: a held size must not lose its line.
  while (points_.size() > 2) {
    const auto oldest = std::min_element(points_.begin(), points_.end(), [](auto &a, auto &b) {
      return a.second.last_added < b.second.last_added;
    });
    if (count_ - oldest->second.last_added < history_) {
      break;
    }
    points_.erase(oldest);
  }
  refit();
}

double LinearFit::ratio_of(const Point &point) const {
  const double y = representative(point);
  return y > 0.0 ? x_of(point) / y : 0.0;
}

double LinearFit::error_of(const Point &point) const noexcept {
  return 2.0 * spread_ / std::sqrt(static_cast<double>(point.filled));
}

double LinearFit::best_ratio() const {
  double best = 0.0; // at two standard errors below: a lucky measurement cannot raise it
  for (const auto &[key, point] : points_) {
    best = std::max(best, ratio_of(point) * (1.0 - error_of(point)));
  }
  return best;
}

bool LinearFit::near(const Point &point, double best, double tolerance) const {
  return ratio_of(point) * (1.0 + error_of(point)) >= (1.0 - tolerance) * best;
}

double LinearFit::smallest_x_near_best_ratio(double tolerance) const noexcept {
  const double best = best_ratio();
  for (const auto &[key, point] : points_) { // ordered by x: the first that qualifies
    if (near(point, best, tolerance)) {
      return x_of(point);
    }
  }
  return 0.0;
}

double LinearFit::largest_x_near_best_ratio_below_a_worse_one(double tolerance) const noexcept {
  const double best = best_ratio();
  bool worse_above = false;
  for (auto entry = points_.rbegin(); entry != points_.rend(); ++entry) { // largest x first
    if (near(entry->second, best, tolerance)) {
      return worse_above ? x_of(entry->second) : 0.0;
    }
    worse_above = true;
  }
  return 0.0;
}

double LinearFit::largest_relative_residual() const noexcept {
  double largest = 0.0;
  for (const auto &[key, point] : points_) {
    const double y = representative(point);
    if (y > 0.0) {
      largest = std::max(largest, std::abs(y - (intercept_ + slope_ * x_of(point))) / y);
    }
  }
  return largest;
}

std::vector<LinearFit::Summary> LinearFit::points() const {
  std::vector<Summary> out;
  out.reserve(points_.size());
  for (const auto &[key, point] : points_) {
    out.push_back({x_of(point), representative(point) * speed_, point.filled});
  }
  return out;
}

void LinearFit::measure_spread() {
  spread_ = 0.0;
  if (robust_ != Robust::median) {
    return;
  }
  std::vector<double> &deviations = deviations_;
  deviations.clear();
  for (const auto &[key, point] : points_) {
    if (point.filled < 2) {
      continue;
    }
    const double middle = representative(point);
    for (std::size_t i = 0; i < point.filled; ++i) {
      deviations.push_back(middle > 0.0 ? std::abs(point.recent[i] / middle - 1.0) : 0.0);
    }
  }
  if (deviations.empty()) {
    return;
  }
  const auto half = deviations.begin() + static_cast<std::ptrdiff_t>(deviations.size() / 2);
  std::nth_element(deviations.begin(), half, deviations.end());
  constexpr double mad_to_sd = 1.4826; // for normal noise
  spread_ = mad_to_sd * *half;
}

void LinearFit::refit() {
  measure_spread();
  if (points_.size() == 1) {
    const Point &point = points_.begin()->second;
    const double x = x_of(point);
    intercept_ = 0.0;
    slope_ = x != 0.0 ? representative(point) / x : 0.0;
    return;
  }
  // Weighted means first, then the centred sums: stable with weights far from 1.
  const auto weight = [&](const Point &point) {
    const double y = representative(point);
    return robust_ == Robust::median && y > 0.0 ? static_cast<double>(point.filled) / (y * y) : 1.0;
  };
  double total = 0.0, mean_x = 0.0, mean_y = 0.0;
  for (const auto &[key, point] : points_) {
    const double x = x_of(point);
    const double y = representative(point);
    const double w = weight(point);
    total += w;
    mean_x += w * x;
    mean_y += w * y;
  }
  mean_x /= total;
  mean_y /= total;
  double sxx = 0.0, sxy = 0.0;
  for (const auto &[key, point] : points_) {
    const double x = x_of(point);
    const double y = representative(point);
    const double w = weight(point);
    sxx += w * (x - mean_x) * (x - mean_x);
    sxy += w * (x - mean_x) * (y - mean_y);
  }
  slope_ = sxy / sxx;
  intercept_ = mean_y - slope_ * mean_x;
}

} // namespace dynbatch
