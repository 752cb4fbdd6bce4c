// DeviceScheduler: concurrency limit, no barging, task priority order with aging, the memory
// budget shared by concurrent batches (checked under contention), exclusive grants, close().

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dynbatch/device_scheduler.hpp"
#include "test_support.hpp"

using dynbatch::DeviceScheduler;
using dynbatch::GrantRequest;
using dynbatch::Nanoseconds;
using dynbatch::no_deadline;
using dynbatch::now_ns;
using dynbatch::SchedulerOptions;
using dynbatch::ScriptedTelemetrySource;
using dynbatch::TelemetrySample;
using dynbatch::TelemetrySampler;
using dynbatch::testing::eventually;

namespace {

constexpr Nanoseconds ms = 1'000'000;

std::shared_ptr<TelemetrySampler> telemetry_with(std::uint64_t available, std::uint64_t total) {
  TelemetrySample sample;
  sample.memory_total_bytes = total;
  sample.memory_available_bytes = available;
  auto source = std::make_shared<ScriptedTelemetrySource>(sample);
  return std::make_shared<TelemetrySampler>(source, 5 * ms);
}

SchedulerOptions options(std::size_t concurrency, Nanoseconds aging_ns = 10'000 * ms) {
  SchedulerOptions out;
  out.concurrency = concurrency;
  out.aging_ns = aging_ns;
  out.margin_fraction = 0.0;
  return out;
}

} // namespace

TEST_CASE(one_at_a_time_without_barging) {
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000));
  const GrantRequest a{1, 0, 10};
  CHECK(scheduler.try_acquire(a));
  CHECK(!scheduler.try_acquire(a));
  std::atomic<bool> granted{false};
  std::thread waiter(
      [&] { granted = scheduler.acquire_until(GrantRequest{2, 0, 10}, now_ns() + 5'000 * ms); });
  REQUIRE(eventually([&] { return scheduler.state().waiting == 1; }));
  scheduler.release(a);
  // Someone waits: a newcomer does not jump the queue even when there is room.
  waiter.join();
  CHECK(granted.load());
  CHECK(!scheduler.try_acquire(a)); // the waiter holds the only slot now
  scheduler.release(GrantRequest{2, 0, 10});
  CHECK(scheduler.try_acquire(a));
  scheduler.release(a);
  const auto state = scheduler.state();
  CHECK_EQ(state.grants, 3u);
  CHECK_EQ(state.waited_grants, 1u);
  CHECK_EQ(state.grants_by_task.at(1), 2u);
}

TEST_CASE(waiting_batches_granted_by_task_priority) {
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000));
  const GrantRequest holder{0, 0, 1};
  REQUIRE(scheduler.try_acquire(holder));
  std::mutex order_mutex;
  std::vector<std::uint64_t> order;
  std::vector<std::thread> threads;
  const std::int32_t priorities[3] = {0, 5, 1};
  for (std::uint64_t task = 1; task <= 3; ++task) {
    threads.emplace_back([&, task] {
      const GrantRequest request{task, priorities[task - 1], 1};
      REQUIRE(scheduler.acquire_until(request, now_ns() + 5'000 * ms));
      {
        std::lock_guard lock(order_mutex);
        order.push_back(task);
      }
      scheduler.release(request);
    });
    REQUIRE(eventually([&] { return scheduler.state().waiting == task; }));
  }
  scheduler.release(holder);
  for (auto &thread : threads) {
    thread.join();
  }
  CHECK(order == (std::vector<std::uint64_t>{2, 3, 1}));
}

TEST_CASE(aging_gets_a_low_priority_task_through_a_saturating_one) {
  DeviceScheduler scheduler(options(1, 5 * ms), telemetry_with(1000, 1000));
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> high_grants{0};
  // Two high-priority workers always have a batch waiting: the device is never idle for low.
  std::vector<std::thread> high;
  for (int worker = 0; worker < 2; ++worker) {
    high.emplace_back([&] {
      const GrantRequest request{1, 50, 1};
      while (!stop) {
        if (scheduler.acquire_until(request, now_ns() + 5'000 * ms)) {
          std::this_thread::sleep_for(std::chrono::microseconds(500));
          ++high_grants;
          scheduler.release(request);
        }
      }
    });
  }
  REQUIRE(eventually([&] { return high_grants.load() > 10; }));
  const Nanoseconds asked = now_ns();
  const GrantRequest low{2, 0, 1};
  // 50 levels at one per 5 ms: about 250 ms, far below the 5 s bound.
  CHECK(scheduler.acquire_until(low, now_ns() + 5'000 * ms));
  CHECK_GE(now_ns() - asked, 100 * ms); // it did have to age
  scheduler.release(low);
  stop = true;
  for (auto &thread : high) {
    thread.join();
  }
}

TEST_CASE(waiting_in_slices_keeps_the_batch_age) {
  // A waiter that retries (as the bindings do every 100 ms) passes its first wait's time, so
  // its rank keeps growing: it overtakes a newer, higher-priority waiter once aged enough.
  DeviceScheduler scheduler(options(1, 10 * ms), telemetry_with(1000, 1000));
  const GrantRequest holder{0, 0, 1};
  REQUIRE(scheduler.try_acquire(holder));
  const Nanoseconds since = now_ns() - 100 * ms; // waited 100 ms already: 10 levels
  std::atomic<int> first{0};
  std::thread old_low([&] {
    REQUIRE(scheduler.acquire_until(GrantRequest{1, 0, 1}, now_ns() + 5'000 * ms, since));
    int expected = 0;
    first.compare_exchange_strong(expected, 1);
    scheduler.release(GrantRequest{1, 0, 1});
  });
  REQUIRE(eventually([&] { return scheduler.state().waiting == 1; }));
  std::thread new_high([&] {
    REQUIRE(scheduler.acquire_until(GrantRequest{2, 5, 1}, now_ns() + 5'000 * ms));
    int expected = 0;
    first.compare_exchange_strong(expected, 2);
    scheduler.release(GrantRequest{2, 5, 1});
  });
  REQUIRE(eventually([&] { return scheduler.state().waiting == 2; }));
  scheduler.release(holder);
  old_low.join();
  new_high.join();
  CHECK_EQ(first.load(), 1); // 0 + 10 levels beats 5 + 0
}

TEST_CASE(concurrent_batches_share_the_memory_budget) {
  DeviceScheduler scheduler(options(4), telemetry_with(1000, 1000));
  const GrantRequest a{1, 0, 600};
  const GrantRequest b{2, 0, 500};
  const GrantRequest c{3, 0, 300};
  REQUIRE(scheduler.try_acquire(a));
  CHECK(!scheduler.try_acquire(b)); // 1100 > 1000
  CHECK(scheduler.try_acquire(c));  // 900
  CHECK(!scheduler.acquire_until(b, now_ns() + 20 * ms));
  scheduler.release(a);
  CHECK(scheduler.try_acquire(b)); // 800
  scheduler.release(b);
  scheduler.release(c);
  // Without a memory model a batch runs alone, both ways.
  const GrantRequest unknown{4, 0, DeviceScheduler::exclusive};
  REQUIRE(scheduler.try_acquire(unknown));
  CHECK(!scheduler.try_acquire(c));
  scheduler.release(unknown);
  REQUIRE(scheduler.try_acquire(c));
  CHECK(!scheduler.try_acquire(unknown));
  scheduler.release(c);
}

TEST_CASE(stress_reservations_never_exceed_the_budget) {
  constexpr std::uint64_t budget = 1000;
  DeviceScheduler scheduler(options(3, 2 * ms), telemetry_with(budget, budget));
  std::atomic<std::uint64_t> in_use{0};
  std::atomic<std::uint64_t> worst{0};
  std::atomic<std::size_t> running{0};
  std::atomic<std::size_t> worst_running{0};
  std::vector<std::thread> workers;
  const int rounds = dynbatch::testing::under_tsan ? 100 : 400;
  for (std::uint64_t task = 0; task < 6; ++task) {
    workers.emplace_back([&, task] {
      const GrantRequest request{task, static_cast<std::int32_t>(task % 3), 150 + task * 70};
      for (int round = 0; round < rounds; ++round) {
        REQUIRE(scheduler.acquire_until(request, now_ns() + 10'000 * ms));
        const std::uint64_t now = in_use += request.reservation_bytes;
        const std::size_t together = ++running;
        std::uint64_t seen = worst.load();
        while (now > seen && !worst.compare_exchange_weak(seen, now)) {
        }
        std::size_t most = worst_running.load();
        while (together > most && !worst_running.compare_exchange_weak(most, together)) {
        }
        std::this_thread::yield();
        --running;
        in_use -= request.reservation_bytes;
        scheduler.release(request);
      }
    });
  }
  for (auto &worker : workers) {
    worker.join();
  }
  CHECK_LE(worst.load(), budget);
  CHECK_LE(worst_running.load(), 3u);
  CHECK_EQ(scheduler.state().grants, 6u * static_cast<std::uint64_t>(rounds));
  CHECK_EQ(scheduler.state().running, 0u);
}

TEST_CASE(close_wakes_waiters) {
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000));
  const GrantRequest a{1, 0, 1};
  REQUIRE(scheduler.try_acquire(a));
  std::atomic<int> result{-1};
  std::thread waiter([&] { result = scheduler.acquire_until(a, no_deadline) ? 1 : 0; });
  REQUIRE(eventually([&] { return scheduler.state().waiting == 1; }));
  scheduler.close();
  waiter.join();
  CHECK_EQ(result.load(), 0);
  CHECK(!scheduler.try_acquire(a));
  scheduler.release(a);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
