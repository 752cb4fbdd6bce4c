// LatencyHistogram: percentiles within a bucket's width, exact counts below powers of two
// (the Prometheus buckets), count and sum, and values past the last octave.

#include <cstdint>

#include "dynbatch/latency_histogram.hpp"
#include "test_support.hpp"

using dynbatch::LatencyHistogram;
using dynbatch::Nanoseconds;

TEST_CASE(an_empty_histogram_reads_zero) {
  const LatencyHistogram histogram;
  CHECK_EQ(histogram.total(), 0u);
  CHECK_EQ(histogram.sum(), 0.0);
  CHECK_EQ(histogram.percentile(0.5), 0);
  CHECK_EQ(histogram.count_below_power_of_two(20), 0u);
}

TEST_CASE(percentiles_are_within_one_bucket) {
  LatencyHistogram histogram;
  for (Nanoseconds value = 1'000; value <= 100'000; value += 1'000) { // 1..100 us
    histogram.add(value);
  }
  CHECK_EQ(histogram.total(), 100u);
  CHECK_EQ(histogram.sum(), 5'050'000.0);
  const Nanoseconds p50 = histogram.percentile(0.5);
  const Nanoseconds p99 = histogram.percentile(0.99);
  CHECK_GE(p50, 50'000);
  CHECK_LE(p50, 50'000 * 109 / 100);
  CHECK_GE(p99, 99'000);
  CHECK_LE(p99, 100'000 * 109 / 100);
}

TEST_CASE(counts_below_powers_of_two_are_exact) {
  LatencyHistogram histogram;
  // Just below, at and just above 2^20 ns, and 3 values of 2^10 - 1.
  histogram.add((Nanoseconds{1} << 20) - 1);
  histogram.add(Nanoseconds{1} << 20);
  histogram.add((Nanoseconds{1} << 20) + 1);
  histogram.add((Nanoseconds{1} << 10) - 1, 3);
  CHECK_EQ(histogram.total(), 6u);
  CHECK_EQ(histogram.count_below_power_of_two(10), 3u);
  CHECK_EQ(histogram.count_below_power_of_two(19), 3u);
  CHECK_EQ(histogram.count_below_power_of_two(20), 4u);
  CHECK_EQ(histogram.count_below_power_of_two(21), 6u);
  for (std::size_t exponent = 1; exponent < 60; ++exponent) { // cumulative: never decreasing
    CHECK_LE(histogram.count_below_power_of_two(exponent),
             histogram.count_below_power_of_two(exponent + 1));
  }
}

TEST_CASE(values_past_the_last_octave_count_everywhere_above_it) {
  LatencyHistogram histogram;
  histogram.add(Nanoseconds{1} << 50);
  histogram.add(0); // and the smallest bucket takes anything below 1 ns
  CHECK_EQ(histogram.count_below_power_of_two(1), 1u);
  CHECK_EQ(histogram.count_below_power_of_two(42), 1u);
  CHECK_EQ(histogram.count_below_power_of_two(LatencyHistogram::octaves), 2u);
  CHECK_EQ(histogram.sum(), static_cast<double>(Nanoseconds{1} << 50));
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
