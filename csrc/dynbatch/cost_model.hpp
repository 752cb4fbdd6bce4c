#pragma once
// Online cost models: what a batch of n samples costs in time and in memory, learned from
// feedback so that they follow a workload that drifts.
//
// Contract: plain values, not thread-safe (the owning policy serialises access); deterministic.

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace dynbatch {

// A line y = intercept + slope * x through one robust point per distinct x.
// Times and memory peaks are noisy in different ways, so each x keeps its last few
// measurements and stands for:
// - Robust::median (times): the median of the last `median_window`. Its expected value does not
//   depend on how often x was measured (a minimum does: a size measured more often looks
//   faster, and under noise the held size ratchets up); a stall or a first call's setup is
//   outvoted once x has three measurements. Times are noisy in proportion to their size, and the
//   variance of a median of k measurements falls as 1/k, so the line is fitted to relative
//   errors weighted by measurements (weights k/y^2): the small sizes pin the intercept, the
//   large ones the slope, one noisy large batch cannot move the intercept by more than the
//   small sizes' own time, and a size met once (a pass's last, short batch) pulls less than
//   one measured nine times. Nine, not five: the knee (19 a / b) is as noisy as the intercept,
//   which rests on the few small sizes measured; a longer window steadies it.
// - Robust::high (memory peaks, what must fit): the maximum of the last 3; plain least squares.
// A point not measured again within `history` additions is forgotten, oldest first, so a
// drifting workload is followed; the two most recent points always stay, so a size held for
// long keeps its line.
// Binned (for x that rarely repeats exactly, such as the padded tokens of a batch): x values
// within 9% of each other (bins of 2^(1/8)) share a point, whose x is the mean of its recent x.
// Following the host's speed (times only): a shared host's speed drifts (one process's time for
// the same batch moved by ~10% over seconds on our 2-core CI machine), and a knee compares
// sizes measured at different moments: a small size probed in a slow second against the held
// size's fast ones reads as a larger fixed cost. Each time is stored divided by the host's
// speed at that moment, which each repeated size's time updates against that size's own
// median (a quarter of the way, at most 1.5x per time: one stall moves it by an eighth at most);
// the line reads back at the current speed. The knee (a / b) does not depend on the speed. The
// speed is relative and wanders with the noise, so past 2x either way the stored times are
// brought to it (it becomes 1 again): no value drifts out of range on a server that runs for
// weeks.
class LinearFit {
public:
  enum class Robust { median, high };

  // One point of a fit, as a profile keeps it: `count` measurements whose representative is y.
  struct Summary {
    double x = 0.0;
    double y = 0.0;
    std::size_t count = 1;
  };

  explicit LinearFit(Robust robust, std::size_t history = 64, bool binned = false,
                     bool follows_speed = false);

  void add(double x, double y);
  // A point as `count` measurements of y (what points() gave): the line it came from comes back.
  void restore(const Summary &point);
  std::size_t count() const noexcept { return count_; }
  // True with two or more distinct x; before that the fit is the line through the origin and
  // the one point (y proportional to x).
  bool has_line() const noexcept { return points_.size() >= 2; }
  std::size_t distinct_x() const noexcept { return points_.size(); }
  // At the host's current speed.
  double intercept() const noexcept { return intercept_ * speed_; }
  double slope() const noexcept { return slope_ * speed_; }
  // The smallest x whose x / y is within `tolerance` of the largest x / y among the points (for
  // times: the smallest size whose measured throughput is near the best); 0 without points.
  // With Robust::median, "within" allows for the measured noise: each point's ratio is given
  // the benefit of two standard errors (relative_spread() / sqrt(its measurements)) and the
  // best one is taken at two below, so a lucky sample cannot raise the bar, while on a quiet
  // host (spread 0) it is the plain comparison.
  double smallest_x_near_best_ratio(double tolerance) const noexcept;
  // The largest x whose x / y is near the best in the same sense, where a larger x measured
  // worse than that (its throughput below the best by more than `tolerance` and the noise):
  // bigger sizes are measured not to pay. 0 where no larger x is worse (nothing measured says
  // stop, as on a device whose throughput keeps growing).
  double largest_x_near_best_ratio_below_a_worse_one(double tolerance) const noexcept;
  // The relative standard deviation of one measurement, from the repeats at each x (a robust
  // estimate: the median absolute relative deviation from each x's median); 0 before any x has
  // two measurements, and always 0 for Robust::high.
  double relative_spread() const noexcept { return spread_; }
  // How far the line misses the worst point, relative to the point (0 without points).
  double largest_relative_residual() const noexcept;
  // One summary per point, by x, at the current speed: what a profile keeps. Restoring them
  // into a fresh fit gives the same line.
  std::vector<Summary> points() const;

private:
  static constexpr std::size_t median_window = 9;
  static constexpr std::size_t high_window = 3;
  struct Point {
    std::array<double, median_window> recent{};
    std::array<double, median_window> recent_x{};
    std::size_t filled = 0;
    std::size_t next = 0;
    std::uint64_t last_added = 0;
    // Kept up to date by add(): read several times per sizing decision, changed once a batch.
    double x = 0.0; // the mean of recent_x
    double y = 0.0; // the representative of recent (median or maximum)
  };
  std::size_t window() const noexcept {
    return robust_ == Robust::median ? median_window : high_window;
  }
  static double representative(const Point &point) noexcept { return point.y; }
  static double x_of(const Point &point) noexcept { return point.x; }
  double summary_of(const Point &point) const; // what representative() caches
  double key_of(double x) const noexcept;
  // y in the line's units (divided by the speed before it), after moving the speed by it.
  double in_line_units(double key, double x, double y);
  void rebase(); // stored times to the current speed, which becomes 1
  void record(double key, double x, double y, std::size_t repeats);
  static double mean_x_of(const Point &point) noexcept;
  double ratio_of(const Point &point) const;          // x / y: the measured throughput
  double error_of(const Point &point) const noexcept; // two standard errors of that ratio
  double best_ratio() const;                          // the best ratio, less two standard errors
  // Whether the point's ratio, plus two standard errors, is within `tolerance` of `best`.
  bool near(const Point &point, double best, double tolerance) const;
  void refit();
  void measure_spread();

  Robust robust_;
  std::size_t history_;
  bool binned_;
  bool follows_speed_;
  std::map<double, Point> points_;
  std::uint64_t count_ = 0;
  double intercept_ = 0.0;
  double slope_ = 0.0;
  double spread_ = 0.0;
  double speed_ = 1.0; // the host's speed now, in the line's units (1: as when it was learned)
  std::vector<double> deviations_; // measure_spread's scratch, kept to spare an allocation a batch
};

// Per input-shape bucket: latency L(n) = a + b*n (ns) and peak memory M(n) = m0 + m1*n (bytes),
// n in samples, or in padded tokens (binned) for padded layouts. Token latencies follow the
// host's speed: their knee rests on sparse small probes measured seconds from the held budget's
// batches (MiniLM on CPU: budgets learned in three identical runs spread 1.4-2.8x without it).
struct CostModel {
  explicit CostModel(std::size_t history, bool binned = false)
      : latency_ns(LinearFit::Robust::median, history, binned, /*follows_speed=*/binned),
        memory_bytes(LinearFit::Robust::high, history, binned) {}
  LinearFit latency_ns;
  LinearFit memory_bytes;
};

} // namespace dynbatch
