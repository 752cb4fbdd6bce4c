#pragma once
// LatencyHistogram: a fixed-size log-linear histogram of durations, for percentiles of
// per-request waits without keeping every value.
//
// Contract: not thread-safe (its owner locks). Values are bucketed with 8 buckets per power of
// two, so a percentile is within 9% of the exact one; anything beyond 2^42 ns (~73 minutes)
// lands in the last bucket. Octave edges are bucket edges, so the count below a power of two
// is exact (Prometheus buckets). Memory is fixed: sub_buckets * octaves counters.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

#include "dynbatch/platform.hpp"

namespace dynbatch {

class LatencyHistogram {
public:
  static constexpr std::size_t sub_buckets = 8;
  static constexpr std::size_t octaves = 43;

  void add(Nanoseconds value, std::uint64_t count = 1) noexcept {
    counts_[bucket_of(value)] += count;
    total_ += count;
    sum_ += static_cast<double>(value) * static_cast<double>(count);
  }

  std::uint64_t total() const noexcept { return total_; }
  double sum() const noexcept { return sum_; } // of the values added, in ns

  // How many values were below 2^exponent ns (every value, past the last octave).
  std::uint64_t count_below_power_of_two(std::size_t exponent) const noexcept {
    if (exponent >= octaves) {
      return total_;
    }
    std::uint64_t below = 0;
    for (std::size_t bucket = 0; bucket < exponent * sub_buckets; ++bucket) {
      below += counts_[bucket];
    }
    return below;
  }

  // The upper edge of the bucket holding the nearest-rank percentile; 0 when empty.
  Nanoseconds percentile(double fraction) const noexcept {
    if (total_ == 0) {
      return 0;
    }
    const auto rank = static_cast<std::uint64_t>(fraction * static_cast<double>(total_));
    std::uint64_t seen = 0;
    for (std::size_t bucket = 0; bucket < counts_.size(); ++bucket) {
      seen += counts_[bucket];
      if (seen > rank || seen == total_) {
        return upper_edge(bucket);
      }
    }
    return upper_edge(counts_.size() - 1);
  }

private:
  static std::size_t bucket_of(Nanoseconds value) noexcept {
    const auto v = static_cast<std::uint64_t>(value < 1 ? 1 : value);
    const auto octave = static_cast<std::size_t>(std::bit_width(v) - 1); // floor(log2 v)
    if (octave >= octaves) {
      return octaves * sub_buckets - 1;
    }
    // The 3 bits below the leading one pick the sub-bucket (none below 8 ns).
    const std::size_t sub = octave >= 3 ? (v >> (octave - 3)) & (sub_buckets - 1) : 0;
    return octave * sub_buckets + sub;
  }

  static Nanoseconds upper_edge(std::size_t bucket) noexcept {
    const std::size_t octave = bucket / sub_buckets;
    const std::size_t sub = bucket % sub_buckets;
    if (octave < 3) {
      return static_cast<Nanoseconds>(std::uint64_t{2} << octave);
    }
    return static_cast<Nanoseconds>((sub_buckets + sub + 1) << (octave - 3));
  }

  std::array<std::uint64_t, octaves * sub_buckets> counts_{};
  std::uint64_t total_ = 0;
  double sum_ = 0.0;
};

} // namespace dynbatch
