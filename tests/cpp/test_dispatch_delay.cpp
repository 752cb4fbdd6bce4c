// DispatchDelay: the slack a deadline release allows, from the measured release-to-dispatch
// delays (the longest of the recent ones, x1.5, within [1 ms, 100 ms]).

#include "dynbatch/dispatch_delay.hpp"
#include "test_support.hpp"

using dynbatch::DispatchDelay;
using dynbatch::Nanoseconds;

namespace {

constexpr Nanoseconds ms = 1'000'000;

} // namespace

TEST_CASE(nothing_measured_allows_ten_milliseconds) {
  const DispatchDelay delay;
  CHECK_EQ(delay.slack(), 10 * ms);
}

TEST_CASE(slack_follows_the_longest_recent_delay) {
  DispatchDelay delay;
  delay.record(10 * ms);
  CHECK_EQ(delay.slack(), 15 * ms);
  delay.record(2 * ms);
  CHECK_EQ(delay.slack(), 15 * ms); // the longer one still counts
  delay.record(20 * ms);
  CHECK_EQ(delay.slack(), 30 * ms); // a longer one counts at once
  for (std::size_t i = 0; i + 1 < DispatchDelay::window; ++i) {
    delay.record(4 * ms);
  }
  CHECK_EQ(delay.slack(), 30 * ms); // still in the window
  delay.record(4 * ms);
  CHECK_EQ(delay.slack(), 6 * ms); // the old delays left it
}

TEST_CASE(slack_is_bounded_both_ways) {
  DispatchDelay delay;
  delay.record(-5 * ms); // a clock read out of order counts as no delay
  CHECK_EQ(delay.slack(), DispatchDelay::min_slack_ns);
  delay.record(100'000);
  CHECK_EQ(delay.slack(), DispatchDelay::min_slack_ns);
  delay.record(2'000 * ms);
  CHECK_EQ(delay.slack(), DispatchDelay::max_slack_ns);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
