#pragma once
// Online cost models: what a batch of n samples costs in time and in memory, learned from
// feedback so that they follow a workload that drifts.
//
// Contract: plain values, not thread-safe (the owning policy serialises access); deterministic.

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>

namespace dynbatch {

// A line y = intercept + slope * x through one robust point per distinct x.
// Measurements are noisy in one direction: interference (another process, a stall, the first
// batch's one-off setup) only ever adds time, and memory peaks are what must fit. So each x
// keeps its last few measurements and stands for their minimum (Robust::low, for times) or
// maximum (Robust::high, for memory). A point not measured again within `history` additions
// is forgotten, oldest first, so a drifting workload is followed; the two most recent points
// always stay, so a size held for long keeps its line.
class LinearFit {
public:
  enum class Robust { low, high };

  explicit LinearFit(Robust robust, std::size_t history = 64);

  void add(double x, double y);
  std::size_t count() const noexcept { return count_; }
  // True with two or more distinct x; before that the fit is the line through the origin and
  // the one point (y proportional to x).
  bool has_line() const noexcept { return points_.size() >= 2; }
  std::size_t distinct_x() const noexcept { return points_.size(); }
  double intercept() const noexcept { return intercept_; }
  double slope() const noexcept { return slope_; }
  // The smallest x whose x / y is within `tolerance` of the largest x / y among the points (for
  // times: the smallest size whose measured throughput is near the best); 0 without points.
  double smallest_x_near_best_ratio(double tolerance) const noexcept;

private:
  static constexpr std::size_t recent_per_point = 3;
  struct Point {
    std::array<double, recent_per_point> recent{};
    std::size_t filled = 0;
    std::size_t next = 0;
    std::uint64_t last_added = 0;
  };
  double representative(const Point &point) const;
  void refit();

  Robust robust_;
  std::size_t history_;
  std::map<double, Point> points_;
  std::uint64_t count_ = 0;
  double intercept_ = 0.0;
  double slope_ = 0.0;
};

// Per input-shape bucket: latency L(n) = a + b*n (ns) and peak memory M(n) = m0 + m1*n (bytes).
struct CostModel {
  explicit CostModel(std::size_t history)
      : latency_ns(LinearFit::Robust::low, history),
        memory_bytes(LinearFit::Robust::high, history) {}
  LinearFit latency_ns;
  LinearFit memory_bytes;
};

} // namespace dynbatch
