// ThroughputClimb against simulated workloads: bounds under random feedback, climbing a linear
// cost curve to max, settling at the knee of a curve that turns up, and the memory ceiling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <stdexcept>
#include <vector>

#include "dynbatch/sizing_policy.hpp"
#include "test_support.hpp"

using dynbatch::BatchFeedback;
using dynbatch::Nanoseconds;
using dynbatch::SizingInputs;
using dynbatch::ThroughputClimb;
using dynbatch::ThroughputClimbOptions;

namespace {

constexpr std::uint64_t gib = std::uint64_t{1} << 30;

ThroughputClimbOptions options(std::size_t min, std::size_t max) {
  ThroughputClimbOptions result;
  result.min_batch_size = min;
  result.max_batch_size = max;
  return result;
}

SizingInputs plenty_of_memory() {
  SizingInputs inputs;
  inputs.queued = 10'000;
  inputs.bytes_per_sample = 1024;
  inputs.telemetry.memory_total_bytes = 64 * gib;
  inputs.telemetry.memory_available_bytes = 32 * gib;
  return inputs;
}

using Workload = std::function<Nanoseconds(std::size_t)>; // batch time for n samples

// Runs the loop the batch former runs: ask for a size, "compute" that batch, report its time.
// Returns the sizes it was asked to run, in order.
std::vector<std::size_t> simulate(ThroughputClimb &policy, const Workload &batch_time,
                                  int batches) {
  std::vector<std::size_t> sizes;
  const SizingInputs inputs = plenty_of_memory();
  for (int b = 0; b < batches; ++b) {
    const std::size_t n = policy.next_batch_size(inputs);
    sizes.push_back(n);
    BatchFeedback feedback;
    feedback.batch_size = n;
    feedback.compute_ns = batch_time(n);
    feedback.collate_ns = batch_time(n) / 10; // overlapped, smaller: compute is the period
    policy.on_feedback(feedback);
  }
  return sizes;
}

double cost_per_sample(const Workload &batch_time, std::size_t n) {
  return static_cast<double>(batch_time(n)) / static_cast<double>(n);
}

std::size_t best_size(const Workload &batch_time, std::size_t min, std::size_t max) {
  std::size_t best = min;
  for (std::size_t n = min; n <= max; ++n) {
    if (cost_per_sample(batch_time, n) < cost_per_sample(batch_time, best)) {
      best = n;
    }
  }
  return best;
}

// 2 ms fixed cost per batch plus 10 us per sample: bigger is always better.
Nanoseconds linear_workload(std::size_t n) {
  return 2'000'000 + 10'000 * static_cast<Nanoseconds>(n);
}

// The same, plus a penalty that grows quadratically past 48 samples (cache spill, swapping):
// samples per second peak at n = sqrt(48^2 + a/c) = 64.
Nanoseconds knee_workload(std::size_t n) {
  const double over = std::max(0.0, static_cast<double>(n) - 48.0);
  constexpr double c = 2'000'000.0 / (64.0 * 64.0 - 48.0 * 48.0);
  return linear_workload(n) + static_cast<Nanoseconds>(c * over * over);
}

} // namespace

TEST_CASE(constructor_rejects_bad_bounds) {
  CHECK_THROWS_AS(ThroughputClimb(options(0, 8)), std::invalid_argument);
  CHECK_THROWS_AS(ThroughputClimb(options(0, 0)), std::invalid_argument);
  CHECK_THROWS_AS(ThroughputClimb(options(9, 8)), std::invalid_argument);
  CHECK_THROWS_AS(ThroughputClimb(options(2, 1)), std::invalid_argument);
  ThroughputClimbOptions bad = options(1, 8);
  bad.growth = 1.0;
  CHECK_THROWS_AS(ThroughputClimb(bad), std::invalid_argument);
  bad = options(1, 8);
  bad.tight = 1.0;
  CHECK_THROWS_AS(ThroughputClimb(bad), std::invalid_argument);
  bad = options(1, 8);
  bad.batches_per_probe = 0;
  CHECK_THROWS_AS(ThroughputClimb(bad), std::invalid_argument);
  ThroughputClimb fixed(options(7, 7));
  CHECK_EQ(fixed.next_batch_size(plenty_of_memory()), 7u);
}

TEST_CASE(starts_at_min) {
  ThroughputClimb policy(options(3, 100));
  CHECK_EQ(policy.next_batch_size(plenty_of_memory()), 3u);
  CHECK_EQ(policy.state().target, 3u);
  CHECK(!policy.state().converged);
}

TEST_CASE(stays_within_bounds_under_random_feedback) {
  std::mt19937_64 random(20240611);
  for (const auto &[min, max] : std::vector<std::pair<std::size_t, std::size_t>>{
           {1, 1}, {1, 2}, {1, 64}, {4, 16}, {16, 1024}, {100, 101}}) {
    ThroughputClimb policy(options(min, max));
    std::uniform_int_distribution<std::size_t> any_size(0, 2 * max + 3);
    std::uniform_int_distribution<Nanoseconds> any_time(-1'000, 50'000'000);
    std::uniform_int_distribution<std::uint64_t> any_memory(0, 4 * gib);
    std::size_t out_of_bounds = 0;
    for (int step = 0; step < 5000; ++step) {
      SizingInputs inputs;
      inputs.queued = any_size(random);
      inputs.bytes_per_sample = random() % 4 == 0 ? 0 : random() % (64 * 1024 * 1024);
      inputs.telemetry.memory_available_bytes = random() % 3 == 0 ? 0 : any_memory(random);
      const std::size_t n = policy.next_batch_size(inputs);
      out_of_bounds += (n < min || n > max) ? 1 : 0;
      const auto state = policy.state();
      out_of_bounds += (state.target < min || state.target > max) ? 1 : 0;
      out_of_bounds += (state.memory_ceiling < min || state.memory_ceiling > max) ? 1 : 0;
      BatchFeedback feedback;
      // Mostly the size it asked for (so the climb acts), sometimes stale or nonsense sizes.
      feedback.batch_size = random() % 4 == 0 ? any_size(random) : n;
      feedback.compute_ns = any_time(random);
      feedback.collate_ns = any_time(random);
      policy.on_feedback(feedback);
    }
    CHECK_EQ(out_of_bounds, 0u);
  }
}

TEST_CASE(climbs_from_min_to_max_on_linear_workload) {
  ThroughputClimb policy(options(1, 256));
  const std::vector<std::size_t> sizes = simulate(policy, linear_workload, 60);
  CHECK_EQ(sizes.front(), 1u);
  // It moves up: the size never drops while the climb is still finding better sizes (each size
  // is measured batches_per_probe times before it is judged)...
  std::size_t first_max = sizes.size();
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 256) {
      first_max = i;
      break;
    }
  }
  REQUIRE(first_max < sizes.size());
  std::size_t distinct = 1;
  for (std::size_t i = 1; i <= first_max; ++i) {
    CHECK_GE(sizes[i], sizes[i - 1]);
    distinct += sizes[i] != sizes[i - 1] ? 1 : 0;
  }
  // ...reaches max within a handful of growth steps, and stays there.
  CHECK_LE(distinct, 10u);
  CHECK_LE(first_max, 10u * ThroughputClimbOptions{}.batches_per_probe);
  for (std::size_t i = first_max; i < sizes.size(); ++i) {
    CHECK_EQ(sizes[i], 256u);
  }
  CHECK_EQ(sizes.back(), 256u);
  const auto state = policy.state();
  CHECK_EQ(state.target, 256u);
  CHECK_EQ(state.best_size, 256u);
  CHECK(state.converged);
  CHECK_GT(state.best_samples_per_second, 0.99 * 1e9 / cost_per_sample(linear_workload, 256));
  CHECK_LT(state.best_samples_per_second, 1.01 * 1e9 / cost_per_sample(linear_workload, 256));
}

TEST_CASE(climb_also_works_with_non_power_of_two_bounds) {
  ThroughputClimb policy(options(3, 100));
  const std::vector<std::size_t> sizes = simulate(policy, linear_workload, 60);
  CHECK_EQ(sizes.front(), 3u);
  // Growth 3, 6, .., 96, then 100 (clamped): 100 beats 96 by less than the 3 % tolerance, so
  // either may be kept; both are within tolerance of the best throughput.
  const std::size_t target = policy.state().target;
  CHECK_GE(target, 96u);
  CHECK_LE(target, 100u);
  CHECK_EQ(sizes.back(), target);
  CHECK(policy.state().converged);
  CHECK_LT(cost_per_sample(linear_workload, target), 1.03 * cost_per_sample(linear_workload, 100));
}

TEST_CASE(settles_near_the_knee_instead_of_max) {
  constexpr std::size_t max = 512;
  const std::size_t best = best_size(knee_workload, 1, max);
  CHECK(best >= 60 && best <= 68); // the workload is what this test thinks it is

  ThroughputClimb policy(options(1, max));
  // Long enough to converge, hold, and re-probe a few times (reprobe_after = 64).
  const std::vector<std::size_t> sizes = simulate(policy, knee_workload, 400);
  const auto state = policy.state();
  CHECK(state.target != max);
  CHECK_GE(state.target, 48u);
  CHECK_LE(state.target, 96u);
  // Within a few percent of the best achievable throughput...
  CHECK_LT(cost_per_sample(knee_workload, state.target),
           1.05 * cost_per_sample(knee_workload, best));
  // ...and most of the late batches ran there, not at the bounds.
  std::size_t near_best_late = 0;
  for (std::size_t i = sizes.size() - 200; i < sizes.size(); ++i) {
    near_best_late += (sizes[i] >= 48 && sizes[i] <= 96) ? 1 : 0;
  }
  CHECK_GE(near_best_late, 180u);
  CHECK_GE(state.best_size, 48u);
  CHECK_LE(state.best_size, 96u);
}

TEST_CASE(settles_near_the_knee_with_measurement_noise) {
  constexpr std::size_t max = 512;
  const std::size_t best = best_size(knee_workload, 1, max);
  std::mt19937 random(7);
  std::uniform_real_distribution<double> jitter(0.98, 1.02);
  const Workload noisy = [&](std::size_t n) {
    return static_cast<Nanoseconds>(static_cast<double>(knee_workload(n)) * jitter(random));
  };
  ThroughputClimb policy(options(1, max));
  simulate(policy, noisy, 600);
  const std::size_t target = policy.state().target;
  CHECK_GE(target, 32u);
  CHECK_LE(target, 128u);
  CHECK_LT(cost_per_sample(knee_workload, target), 1.15 * cost_per_sample(knee_workload, best));
}

TEST_CASE(feedback_for_another_size_does_not_move_the_climb) {
  ThroughputClimb policy(options(1, 64));
  const SizingInputs inputs = plenty_of_memory();
  CHECK_EQ(policy.next_batch_size(inputs), 1u);
  for (const std::size_t stale : {5u, 9u, 33u}) {
    BatchFeedback feedback;
    feedback.batch_size = stale;
    feedback.compute_ns = 1'000;
    policy.on_feedback(feedback);
  }
  CHECK_EQ(policy.next_batch_size(inputs), 1u);
  BatchFeedback zero;
  zero.batch_size = 1;
  zero.compute_ns = 0; // no time measured: ignored
  policy.on_feedback(zero);
  CHECK_EQ(policy.next_batch_size(inputs), 1u);
  BatchFeedback real;
  real.batch_size = 1;
  real.compute_ns = linear_workload(1);
  // A size is judged after batches_per_probe measurements of it, not before.
  for (std::size_t i = 1; i < ThroughputClimbOptions{}.batches_per_probe; ++i) {
    policy.on_feedback(real);
    CHECK_EQ(policy.next_batch_size(inputs), 1u);
  }
  policy.on_feedback(real);
  CHECK_GT(policy.next_batch_size(inputs), 1u);
}

TEST_CASE(memory_ceiling_caps_the_size_but_never_below_min) {
  ThroughputClimb policy(options(4, 64));
  simulate(policy, linear_workload, 40);
  REQUIRE(policy.state().target == 64u); // climbed to max with plenty of memory

  // 10 samples of 1000 bytes fit in a quarter of 40'000 bytes.
  SizingInputs tight = plenty_of_memory();
  tight.bytes_per_sample = 1000;
  tight.telemetry.memory_available_bytes = 40'000;
  CHECK_EQ(policy.next_batch_size(tight), 10u);
  CHECK_EQ(policy.state().memory_ceiling, 10u);
  tight.telemetry.memory_available_bytes = 40'000 + 3'999; // still floor(10.99) = 10
  CHECK_EQ(policy.next_batch_size(tight), 10u);

  // So little memory that not even min fits: min, never less.
  tight.telemetry.memory_available_bytes = 1'000;
  CHECK_EQ(policy.next_batch_size(tight), 4u);
  tight.telemetry.memory_available_bytes = 1;
  CHECK_EQ(policy.next_batch_size(tight), 4u);

  // The ceiling is re-read every time: memory back, size back.
  CHECK_EQ(policy.next_batch_size(plenty_of_memory()), 64u);
  CHECK_EQ(policy.state().memory_ceiling, 64u);

  // Unknown memory (0) or unknown sample size (0) means no ceiling.
  SizingInputs unknown = tight;
  unknown.telemetry.memory_available_bytes = 0;
  CHECK_EQ(policy.next_batch_size(unknown), 64u);
  unknown = tight;
  unknown.bytes_per_sample = 0;
  CHECK_EQ(policy.next_batch_size(unknown), 64u);

  // A different memory_fraction moves the ceiling proportionally.
  ThroughputClimbOptions half = options(1, 64);
  half.memory_fraction = 0.5;
  ThroughputClimb wider(half);
  simulate(wider, linear_workload, 40);
  SizingInputs same = plenty_of_memory();
  same.bytes_per_sample = 1000;
  same.telemetry.memory_available_bytes = 40'000;
  CHECK_EQ(wider.next_batch_size(same), 20u);
}

TEST_CASE(memory_ceiling_does_not_raise_a_small_target) {
  ThroughputClimb policy(options(2, 64));
  SizingInputs roomy = plenty_of_memory();
  roomy.bytes_per_sample = 1000;
  roomy.telemetry.memory_available_bytes = 40'000; // ceiling 10, target still 2
  CHECK_EQ(policy.next_batch_size(roomy), 2u);
  CHECK_EQ(policy.state().memory_ceiling, 10u);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
