// LinearFit and CostModel: exact lines from exact points, the line through the origin for one
// point, the robust per-x representative (median of the last 9 times, max of the last 3
// memory peaks), relative weights for times (and by measurements), the measured noise and the
// noise-aware best ratio, following the host's speed, restoring a fit from its points,
// forgetting points not re-added within `history` additions, and the constructor's bound.

#include <cmath>
#include <stdexcept>

#include "dynbatch/cost_model.hpp"
#include "test_support.hpp"

using dynbatch::CostModel;
using dynbatch::LinearFit;

namespace {

bool near(double actual, double expected, double relative = 1e-9) {
  return std::abs(actual - expected) <= relative * std::max(1.0, std::abs(expected));
}

#define CHECK_NEAR(actual, expected)                                                               \
  do {                                                                                             \
    const double near_actual_ = (actual);                                                          \
    const double near_expected_ = (expected);                                                      \
    if (!near(near_actual_, near_expected_)) {                                                     \
      CHECK_EQ(near_actual_, near_expected_);                                                      \
    }                                                                                              \
  } while (false)

} // namespace

TEST_CASE(exact_points_give_the_exact_line) {
  for (const LinearFit::Robust robust : {LinearFit::Robust::median, LinearFit::Robust::high}) {
    LinearFit fit(robust);
    CHECK_EQ(fit.count(), 0u);
    CHECK(!fit.has_line());
    for (const double x : {1.0, 2.0, 4.0, 8.0, 16.0, 300.0}) {
      fit.add(x, 3'500.0 + 2'250.0 * x); // a = 3500, b = 2250
    }
    CHECK_EQ(fit.count(), 6u);
    CHECK(fit.has_line());
    CHECK_NEAR(fit.intercept(), 3'500.0);
    CHECK_NEAR(fit.slope(), 2'250.0);
    CHECK_NEAR(fit.intercept() + fit.slope() * 1'000.0, 3'500.0 + 2'250'000.0);
    // Memory-sized numbers: 1 GiB + 10 MiB per sample.
    LinearFit big(robust);
    for (const double x : {1.0, 2.0, 1024.0}) {
      big.add(x, 1073741824.0 + 10485760.0 * x);
    }
    CHECK_NEAR(big.intercept(), 1073741824.0);
    CHECK_NEAR(big.slope(), 10485760.0);
  }
}

TEST_CASE(single_point_gives_the_line_through_the_origin) {
  for (const LinearFit::Robust robust : {LinearFit::Robust::median, LinearFit::Robust::high}) {
    LinearFit fit(robust);
    fit.add(4.0, 20.0);
    CHECK(!fit.has_line());
    CHECK_EQ(fit.count(), 1u);
    CHECK_NEAR(fit.intercept(), 0.0);
    CHECK_NEAR(fit.slope(), 5.0);
    CHECK_NEAR(fit.intercept() + fit.slope() * 10.0, 50.0);
    // Repeats of the same x are still one point: no line.
    fit.add(4.0, 24.0);
    CHECK(!fit.has_line());
    CHECK_EQ(fit.count(), 2u);
    CHECK_NEAR(fit.slope(), robust == LinearFit::Robust::median ? 5.5 : 6.0); // mean of 2, max
    // A second x makes a line.
    fit.add(8.0, 40.0);
    CHECK(fit.has_line());
  }
  LinearFit at_zero(LinearFit::Robust::median);
  at_zero.add(0.0, 7.0); // no slope through the origin from x = 0
  CHECK_NEAR(at_zero.intercept(), 0.0);
  CHECK_NEAR(at_zero.slope(), 0.0);
}

TEST_CASE(median_fit_takes_the_median_of_the_last_nine_values) {
  // y = 100 + 10 x, measured at x = 1 and x = 2.
  LinearFit fit(LinearFit::Robust::median);
  fit.add(1.0, 110.0);
  fit.add(2.0, 500.0); // the first value at x = 2 is a slow outlier: it is all there is
  CHECK_NEAR(fit.slope(), 390.0);
  fit.add(2.0, 120.0); // two values: their mean
  CHECK_NEAR(fit.slope(), 200.0);
  fit.add(2.0, 120.0); // three: the median outvotes the outlier
  CHECK_NEAR(fit.intercept(), 100.0);
  CHECK_NEAR(fit.slope(), 10.0);
  fit.add(1.0, 500.0); // an outlier at x = 1 beside one normal value: their mean
  CHECK_NEAR(fit.intercept() + fit.slope(), 305.0);
  fit.add(1.0, 110.0);
  CHECK_NEAR(fit.intercept(), 100.0);
  CHECK_NEAR(fit.slope(), 10.0);
  // A lucky fast value moves nothing either (a minimum would take it).
  fit.add(2.0, 60.0);
  CHECK_NEAR(fit.slope(), 10.0);
  // The window is the last nine: the 30s are outvoted once the fifth 100 after them arrives.
  LinearFit window(LinearFit::Robust::median);
  window.add(1.0, 10.0);
  for (const double y : {100.0, 100.0, 100.0, 100.0, 30.0, 30.0, 30.0, 30.0, 30.0}) {
    window.add(2.0, y);
  }
  CHECK_NEAR(window.slope(), 20.0); // four 100s, five 30s: median 30
  for (int i = 0; i < 4; ++i) {
    window.add(2.0, 100.0); // the oldest 100s drop out: still five 30s of nine
  }
  CHECK_NEAR(window.slope(), 20.0);
  window.add(2.0, 100.0); // the first 30 drops out: five 100s of nine
  CHECK_NEAR(window.slope(), 90.0);
}

TEST_CASE(median_fit_weighs_relative_errors) {
  // The same absolute error is a large relative one at a small x: with weights 1/y^2 the
  // small sizes pin the intercept. y = 100 + 10 x at x = 1, 2 exactly; x = 100 off by +550
  // (+50%). A plain least-squares line would put the intercept near 0 or below.
  LinearFit fit(LinearFit::Robust::median);
  fit.add(1.0, 110.0);
  fit.add(2.0, 120.0);
  fit.add(100.0, 1'650.0);
  CHECK_GT(fit.intercept(), 90.0);
  CHECK_LT(fit.intercept(), 110.0);
}

TEST_CASE(spread_measures_the_noise_of_repeats) {
  LinearFit fit(LinearFit::Robust::median);
  fit.add(1.0, 100.0);
  fit.add(2.0, 200.0);
  CHECK_NEAR(fit.relative_spread(), 0.0); // no repeats yet
  for (const double y : {200.0, 220.0, 180.0, 200.0}) {
    fit.add(2.0, y); // 200, 200, 220, 180, 200: deviations 0, 0, .1, .1, 0 -> median 0
  }
  CHECK_NEAR(fit.relative_spread(), 0.0);
  for (const double y : {220.0, 180.0}) {
    fit.add(2.0, y); // 220, 180, 200, 220, 180: median 200, deviations .1 .1 0 .1 .1
  }
  CHECK_NEAR(fit.relative_spread(), 1.4826 * 0.1);
  LinearFit memory(LinearFit::Robust::high);
  memory.add(1.0, 100.0);
  memory.add(1.0, 150.0);
  CHECK_NEAR(memory.relative_spread(), 0.0);
}

TEST_CASE(the_best_ratio_allows_for_the_measured_noise) {
  // Throughput x / y: x = 100 at 1.0, x = 200 at 1.0 / 0.93 (7% faster, one lucky sample).
  // Quiet (no repeats, spread 0): 100 is not within 5% of the best, so 200 is the smallest.
  LinearFit quiet(LinearFit::Robust::median);
  quiet.add(100.0, 100.0);
  quiet.add(200.0, 186.0);
  CHECK_NEAR(quiet.smallest_x_near_best_ratio(0.05), 200.0);
  // The same points where repeats show 5% noise: 7% is within the noise, 100 qualifies.
  LinearFit noisy(LinearFit::Robust::median);
  for (const double y : {95.0, 105.0, 100.0, 95.0, 105.0}) {
    noisy.add(100.0, y);
  }
  noisy.add(200.0, 186.0);
  CHECK_GT(noisy.relative_spread(), 0.04);
  CHECK_NEAR(noisy.smallest_x_near_best_ratio(0.05), 100.0);
  // A clear difference still counts under that noise: 2x faster per sample.
  noisy.add(400.0, 200.0);
  CHECK_NEAR(noisy.smallest_x_near_best_ratio(0.05), 400.0);
}

TEST_CASE(a_larger_size_measured_worse_caps_at_the_largest_near_the_best) {
  LinearFit fit(LinearFit::Robust::median);
  CHECK_EQ(fit.largest_x_near_best_ratio_below_a_worse_one(0.05), 0.0); // nothing measured
  fit.add(64.0, 64.0 * 40.0);                                           // ratio 1/40
  fit.add(256.0, 256.0 * 29.0);                                         // 1/29: the best
  fit.add(512.0, 512.0 * 29.5);                                         // within 5% of it
  fit.add(1024.0, 1024.0 * 29.8); // within 5% too: nothing larger is worse
  CHECK_EQ(fit.largest_x_near_best_ratio_below_a_worse_one(0.05), 0.0);
  fit.add(2048.0, 2048.0 * 33.0); // 12% below the best: bigger does not pay
  CHECK_EQ(fit.largest_x_near_best_ratio_below_a_worse_one(0.05), 1024.0);
  CHECK_EQ(fit.largest_x_near_best_ratio_below_a_worse_one(0.2), 0.0); // within 20%
}

TEST_CASE(residual_says_how_far_the_line_misses_a_point) {
  LinearFit fit(LinearFit::Robust::median);
  CHECK_NEAR(fit.largest_relative_residual(), 0.0);
  for (const double x : {1.0, 4.0, 16.0}) {
    fit.add(x, 10.0 + 2.0 * x);
  }
  CHECK_LT(fit.largest_relative_residual(), 1e-12);
  fit.add(64.0, 0.5 * (10.0 + 2.0 * 64.0)); // per-sample cost halves at 64: off the line
  CHECK_GT(fit.largest_relative_residual(), 0.2);
}

TEST_CASE(high_fit_takes_the_max_of_the_last_three_values) {
  LinearFit fit(LinearFit::Robust::high);
  fit.add(1.0, 110.0);
  fit.add(2.0, 120.0);
  fit.add(2.0, 200.0); // a peak: memory must fit the largest recent one
  CHECK_NEAR(fit.slope(), 90.0);
  fit.add(2.0, 120.0);
  fit.add(2.0, 120.0);
  CHECK_NEAR(fit.slope(), 90.0); // 200 is still among the last 3 at x = 2
  fit.add(2.0, 120.0);           // now it is not
  CHECK_NEAR(fit.intercept(), 100.0);
  CHECK_NEAR(fit.slope(), 10.0);
  fit.add(1.0, 50.0); // a low value under the max does not move a high fit
  CHECK_NEAR(fit.slope(), 10.0);
}

TEST_CASE(point_not_readded_within_history_is_forgotten) {
  LinearFit fit(LinearFit::Robust::median, 4);
  fit.add(10.0, 1'000'000.0); // addition 1, far off the line y = 5 + 2 x
  fit.add(1.0, 7.0);          // 2
  fit.add(2.0, 9.0);          // 3
  fit.add(1.0, 7.0);          // 4: x = 10 was added 3 additions ago, still remembered
  CHECK(!near(fit.slope(), 2.0));
  fit.add(2.0, 9.0); // 5: 4 additions since x = 10: forgotten
  CHECK_NEAR(fit.intercept(), 5.0);
  CHECK_NEAR(fit.slope(), 2.0);
  CHECK_EQ(fit.count(), 5u); // count() is additions, not remembered points
  // Points that keep being re-added stay, however long it runs.
  for (int i = 0; i < 50; ++i) {
    fit.add(i % 2 == 0 ? 1.0 : 2.0, i % 2 == 0 ? 7.0 : 9.0);
  }
  CHECK(fit.has_line());
  CHECK_NEAR(fit.slope(), 2.0);
  // A workload that drifts is followed: once x = 4 stops being measured, the old line goes.
  LinearFit drift(LinearFit::Robust::high, 6);
  drift.add(4.0, 1'000.0);
  for (int i = 0; i < 6; ++i) {
    drift.add(i % 2 == 0 ? 1.0 : 2.0, i % 2 == 0 ? 30.0 : 50.0); // y = 10 + 20 x
  }
  CHECK_NEAR(drift.intercept(), 10.0);
  CHECK_NEAR(drift.slope(), 20.0);
}

TEST_CASE(a_size_measured_more_often_pulls_harder) {
  // y = 100 + 10 x, measured nine times at x = 1 and x = 10, and once at x = 5, 2x slow (a
  // pass's last, short batch in a slow moment). Counted once each, the three points would
  // pull the line alike; weighted by measurements, the lone one barely moves it.
  const auto fit_with = [](int repeats) {
    LinearFit fit(LinearFit::Robust::median);
    for (int i = 0; i < repeats; ++i) {
      fit.add(1.0, 110.0);
      fit.add(10.0, 200.0);
    }
    fit.add(5.0, 2.0 * 150.0);
    return fit;
  };
  CHECK_GT(fit_with(1).slope(), 11.5);
  CHECK_LT(fit_with(9).slope(), 10.3);
}

TEST_CASE(times_follow_the_hosts_speed) {
  // y = 100 + 10 x (a / b = 10): seven batches at the held size (100), then one probe at 1, in
  // rounds; from the fifth round on the host is 1.3x slower. Without following, the probe's
  // window mixes fast and slow times while the held size's holds slow ones, and a / b falls
  // to 7.3-8.6; following the speed, the times are compared at one speed.
  LinearFit fixed(LinearFit::Robust::median, 64, false, false);
  LinearFit following(LinearFit::Robust::median, 64, false, true);
  const auto knee_ratio = [](const LinearFit &fit) { return fit.intercept() / fit.slope(); };
  for (int round = 0; round < 8; ++round) {
    const double speed = round < 4 ? 1.0 : 1.3;
    for (LinearFit *fit : {&fixed, &following}) {
      for (int i = 0; i < 7; ++i) {
        fit->add(100.0, speed * 1'100.0);
      }
      fit->add(1.0, speed * 110.0);
    }
    if (round >= 4) {
      CHECK_GT(std::abs(knee_ratio(fixed) - 10.0), 1.3);
      CHECK_LT(std::abs(knee_ratio(following) - 10.0), 1.0);
    }
  }
  // The line reads back at the host's speed now: the held size costs about 1.3 x 1100.
  CHECK_GT(following.intercept() + 100.0 * following.slope(), 1.25 * 1'100.0);
  // One stall moves the speed by at most an eighth, and the medians outvote it.
  LinearFit stalled(LinearFit::Robust::median, 64, false, true);
  for (int i = 0; i < 5; ++i) {
    stalled.add(1.0, 110.0);
    stalled.add(100.0, 1'100.0);
  }
  stalled.add(100.0, 10.0 * 1'100.0);
  CHECK_LT(stalled.intercept() + 100.0 * stalled.slope(), 1.13 * 1'100.0);
  CHECK_NEAR(stalled.intercept() / stalled.slope(), 10.0);
  // A lasting 3x slowdown: the speed passes 2x, where the stored times are brought to it, and
  // once the windows hold only slow times the line is the old one at 3x.
  LinearFit slowed(LinearFit::Robust::median, 64, false, true);
  for (int round = 0; round < 24; ++round) {
    const double speed = round < 4 ? 1.0 : 3.0;
    for (int i = 0; i < 7; ++i) {
      slowed.add(100.0, speed * 1'100.0);
    }
    slowed.add(1.0, speed * 110.0);
  }
  CHECK_LT(std::abs(slowed.intercept() / slowed.slope() / 10.0 - 1.0), 0.01);
  CHECK_LT(std::abs((slowed.intercept() + 100.0 * slowed.slope()) / 3'300.0 - 1.0), 0.01);
}

TEST_CASE(restored_points_give_the_same_line) {
  LinearFit fit(LinearFit::Robust::median, 64, true, true);
  const double times[] = {1.0, 1.1, 0.9, 1.2, 1.0};
  for (int i = 0; i < 20; ++i) {
    const double x = i % 4 == 0 ? 150.0 : 1'200.0 + 10.0 * (i % 3);
    fit.add(x, (9e6 + 1.2e5 * x) * times[i % 5]);
  }
  LinearFit restored(LinearFit::Robust::median, 64, true, true);
  for (const LinearFit::Summary &point : fit.points()) {
    restored.restore(point);
  }
  CHECK_NEAR(restored.intercept(), fit.intercept());
  CHECK_NEAR(restored.slope(), fit.slope());
}

TEST_CASE(history_below_two_throws) {
  CHECK_THROWS_AS(LinearFit(LinearFit::Robust::median, 0), std::invalid_argument);
  CHECK_THROWS_AS(LinearFit(LinearFit::Robust::high, 1), std::invalid_argument);
  CHECK_THROWS_AS(CostModel(1), std::invalid_argument);
  LinearFit ok(LinearFit::Robust::median, 2);
  ok.add(1.0, 1.0);
  CHECK_EQ(ok.count(), 1u);
}

TEST_CASE(cost_model_times_are_medians_and_memory_is_high) {
  CostModel model(64);
  for (const double x : {1.0, 2.0}) {
    for (const double noise : {0.0, 40.0, 0.0}) {
      model.latency_ns.add(x, 100.0 + 10.0 * x + noise);
      model.memory_bytes.add(x, 1'000.0 + 100.0 * x - noise);
    }
  }
  model.latency_ns.add(2.0, 160.0); // a slow batch, then a normal one: the median is 120
  model.latency_ns.add(2.0, 120.0);
  model.memory_bytes.add(2.0, 1'300.0);
  CHECK_NEAR(model.latency_ns.intercept(), 100.0);
  CHECK_NEAR(model.latency_ns.slope(), 10.0);
  // Memory: the max at x = 1 is 1100; at x = 2 the last 3 are 1160, 1200, 1300.
  CHECK_NEAR(model.memory_bytes.intercept(), 900.0);
  CHECK_NEAR(model.memory_bytes.slope(), 200.0);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
