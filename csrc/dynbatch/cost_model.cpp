#include "dynbatch/cost_model.hpp"

#include <algorithm>
#include <stdexcept>

namespace dynbatch {

LinearFit::LinearFit(Robust robust, std::size_t history) : robust_(robust), history_(history) {
  if (history < 2) {
    throw std::invalid_argument("LinearFit: history must be at least 2");
  }
}

double LinearFit::representative(const Point &point) const {
  const auto begin = point.recent.begin();
  const auto end = begin + static_cast<std::ptrdiff_t>(point.filled);
  return robust_ == Robust::low ? *std::min_element(begin, end) : *std::max_element(begin, end);
}

void LinearFit::add(double x, double y) {
  ++count_;
  Point &point = points_[x];
  point.recent[point.next] = y;
  point.next = (point.next + 1) % recent_per_point;
  point.filled = std::min(point.filled + 1, recent_per_point);
  point.last_added = count_;
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

double LinearFit::smallest_x_near_best_ratio(double tolerance) const noexcept {
  const auto ratio = [&](const auto &entry) {
    const double y = representative(entry.second);
    return y > 0.0 ? entry.first / y : 0.0;
  };
  double best = 0.0;
  for (const auto &entry : points_) {
    best = std::max(best, ratio(entry));
  }
  for (const auto &entry : points_) { // ordered by x: the first that qualifies is the smallest
    if (ratio(entry) >= (1.0 - tolerance) * best) {
      return entry.first;
    }
  }
  return 0.0;
}

void LinearFit::refit() {
  if (points_.size() == 1) {
    const auto &[x, point] = *points_.begin();
    intercept_ = 0.0;
    slope_ = x != 0.0 ? representative(point) / x : 0.0;
    return;
  }
  double n = 0.0, sum_x = 0.0, sum_y = 0.0, sum_xx = 0.0, sum_xy = 0.0;
  for (const auto &[x, point] : points_) {
    const double y = representative(point);
    n += 1.0;
    sum_x += x;
    sum_y += y;
    sum_xx += x * x;
    sum_xy += x * y;
  }
  slope_ = (n * sum_xy - sum_x * sum_y) / (n * sum_xx - sum_x * sum_x);
  intercept_ = (sum_y - slope_ * sum_x) / n;
}

} // namespace dynbatch
