// DeviceScheduler: concurrency limit, no barging, task priority order with aging, the memory
// budget shared by concurrent batches (checked under contention), exclusive grants, close(),
// and holds (a task with more queued keeps the device between its batches: on a fake clock,
// then two backlogged worker threads counted by grants).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
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

SchedulerOptions options(std::size_t concurrency, Nanoseconds aging_ns = 10'000 * ms,
                         Nanoseconds max_hold_ns = 50 * ms) {
  SchedulerOptions out;
  out.concurrency = concurrency;
  out.aging_ns = aging_ns;
  out.margin_fraction = 0.0;
  out.max_hold_ns = max_hold_ns;
  return out;
}

// A clock the test moves by hand (the scheduler's calls that never wait read only this).
struct FakeClock {
  std::shared_ptr<std::atomic<Nanoseconds>> now = std::make_shared<std::atomic<Nanoseconds>>(0);
  std::function<Nanoseconds()> function() const {
    return [now = now] { return now->load(); };
  }
  void set(Nanoseconds t) const { now->store(t); }
};

// H (task 1, priority 5) has run one batch and measured one release-to-ask gap of 0.5 ms (its
// holds last 4 x 0.5 = 2 ms from then on); it holds the device again when this returns, at 10
// ms.
void warm_up_gap(DeviceScheduler &scheduler, const FakeClock &clock, const GrantRequest &high) {
  clock.set(0);
  REQUIRE(scheduler.try_acquire(high));
  clock.set(1 * ms);
  scheduler.release(high, true); // nothing measured yet: no hold
  CHECK_EQ(scheduler.state().holding, 0u);
  clock.set(1 * ms + ms / 2);
  REQUIRE(scheduler.try_acquire(high)); // the gap: 0.5 ms
  clock.set(10 * ms);
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

TEST_CASE(a_hold_keeps_the_device_for_the_higher_task_between_its_batches) {
  FakeClock clock;
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000), clock.function());
  const GrantRequest high{1, 5, 1};
  const GrantRequest low{2, 0, 1};
  // Before any gap is measured a release with more queued holds nothing: the old behaviour.
  clock.set(0);
  REQUIRE(scheduler.try_acquire(high));
  clock.set(1 * ms);
  scheduler.release(high, true);
  clock.set(1 * ms + 200'000);
  CHECK(scheduler.try_acquire(low));
  clock.set(1 * ms + 500'000);
  CHECK(!scheduler.try_acquire(high)); // asks 0.5 ms after its release: the gap is measured
  clock.set(2 * ms);
  scheduler.release(low);
  REQUIRE(scheduler.try_acquire(high));
  // From now on every grant goes to the high task while it says it has more queued.
  Nanoseconds t = 3 * ms;
  for (int batch = 0; batch < 20; ++batch) {
    clock.set(t);
    scheduler.release(high, true);
    CHECK_EQ(scheduler.state().holding, 1u);
    clock.set(t + 200'000);
    CHECK(!scheduler.try_acquire(low)); // the device is idle, but held for the high task
    clock.set(t + 400'000);
    CHECK(scheduler.try_acquire(high));
    t += 1 * ms;
  }
  const auto state = scheduler.state();
  CHECK_EQ(state.grants_by_task.at(1), 22u);
  CHECK_EQ(state.grants_by_task.at(2), 1u);
  CHECK_EQ(state.holds, 20u);
  scheduler.release(high);
}

TEST_CASE(a_hold_ends_when_it_expires_or_the_backlog_is_gone) {
  FakeClock clock;
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000), clock.function());
  const GrantRequest high{1, 5, 1};
  const GrantRequest low{2, 0, 1};
  warm_up_gap(scheduler, clock, high);
  static_assert(DeviceScheduler::hold_gap_factor == 4);
  // 4x the longest measured gap (0.5 ms): the hold ends 2 ms after the release.
  scheduler.release(high, true);
  clock.set(11 * ms + 999'999);
  CHECK(!scheduler.try_acquire(low));
  clock.set(12 * ms);
  CHECK(scheduler.try_acquire(low)); // the high task never came back: the hold expired
  CHECK_EQ(scheduler.state().holding, 0u);
  scheduler.release(low);
  clock.set(13 * ms);
  REQUIRE(scheduler.try_acquire(high)); // asked 3 ms after its release: now holds last 12 ms
  clock.set(14 * ms);
  scheduler.release(high, true);
  clock.set(25 * ms + 999'999);
  CHECK(!scheduler.try_acquire(low));
  clock.set(26 * ms);
  CHECK(scheduler.try_acquire(low));
  scheduler.release(low);
  // A release without more queued (the backlog is gone) holds nothing.
  REQUIRE(scheduler.try_acquire(high));
  scheduler.release(high, false);
  CHECK(scheduler.try_acquire(low));
  scheduler.release(low);
  // A release right after closing holds nothing either.
  REQUIRE(scheduler.try_acquire(high));
  scheduler.close();
  scheduler.release(high, true);
  CHECK_EQ(scheduler.state().holding, 0u);
}

TEST_CASE(a_refused_ask_keeps_the_hold_until_the_task_waits) {
  // Between a refused try_acquire and its acquire_until a worker is not waiting yet (in
  // Python: the GIL hand-off into the wait); a lower waiter must not slip in there.
  FakeClock clock;
  DeviceScheduler scheduler(options(1), telemetry_with(1000, 1000), clock.function());
  const GrantRequest high{1, 5, 1};
  const GrantRequest low{2, 0, 1};
  const GrantRequest urgent{3, 10, 1};
  warm_up_gap(scheduler, clock, high);
  scheduler.release(high, true);
  REQUIRE(scheduler.try_acquire(urgent)); // outranks the hold
  clock.set(10 * ms + ms / 4);
  CHECK(!scheduler.try_acquire(high)); // refused: the urgent batch runs
  scheduler.release(urgent);
  CHECK(!scheduler.try_acquire(low)); // still held for the high task
  CHECK(scheduler.try_acquire(high));
  scheduler.release(high);
}

TEST_CASE(a_hold_is_bounded_by_max_hold) {
  FakeClock clock;
  DeviceScheduler scheduler(options(1, 10'000 * ms, 3 * ms), telemetry_with(1000, 1000),
                            clock.function());
  const GrantRequest high{1, 5, 1};
  const GrantRequest low{2, 0, 1};
  clock.set(0);
  REQUIRE(scheduler.try_acquire(high));
  scheduler.release(high, true);
  clock.set(100 * ms);
  REQUIRE(scheduler.try_acquire(high)); // a 100 ms gap: the hold would be 400 ms unbounded
  scheduler.release(high, true);
  clock.set(100 * ms + 3 * ms - 1);
  CHECK(!scheduler.try_acquire(low));
  clock.set(103 * ms);
  CHECK(scheduler.try_acquire(low));
  scheduler.release(low);
  // max_hold_ns = 0: no holds at all.
  DeviceScheduler plain(options(1, 10'000 * ms, 0), telemetry_with(1000, 1000), clock.function());
  for (int batch = 0; batch < 3; ++batch) {
    REQUIRE(plain.try_acquire(high));
    plain.release(high, true);
  }
  CHECK(plain.try_acquire(low));
  CHECK_EQ(plain.state().holds, 0u);
  plain.release(low);
}

TEST_CASE(a_hold_yields_to_aging_and_to_an_earlier_equal_waiter) {
  FakeClock clock;
  DeviceScheduler scheduler(options(1, 1 * ms), telemetry_with(1000, 1000), clock.function());
  const GrantRequest high{1, 5, 1};
  const GrantRequest low{2, 0, 1};
  warm_up_gap(scheduler, clock, high);
  scheduler.release(high, true); // held until 12 ms
  CHECK(!scheduler.try_acquire(low));
  // A low batch that has waited 10 ms is 10 levels up: above the hold's 5 (aging lets it in).
  // It fits at once, so the fake clock never has to move while it waits.
  CHECK(scheduler.acquire_until(low, no_deadline, 0));
  scheduler.release(low);
  CHECK_EQ(scheduler.state().grants_by_task.at(2), 1u);
  // A waiter of the same priority that waited since before the release goes first (FIFO).
  const GrantRequest peer{3, 5, 1};
  clock.set(20 * ms);
  REQUIRE(scheduler.try_acquire(high));
  clock.set(20 * ms + ms / 2);
  scheduler.release(high, true);
  CHECK(!scheduler.try_acquire(peer)); // asked after the release: the hold is earlier
  CHECK(scheduler.acquire_until(peer, no_deadline, 20 * ms));
  scheduler.release(peer);
}

TEST_CASE(a_hold_keeps_one_batch_of_room) {
  FakeClock clock;
  DeviceScheduler scheduler(options(2), telemetry_with(1000, 1000), clock.function());
  const GrantRequest high{1, 5, 600};
  warm_up_gap(scheduler, clock, high);
  scheduler.release(high, true);
  // Two batches may run: the hold keeps one slot and its 600 bytes, the rest is free.
  const GrantRequest big{2, 0, 500};
  const GrantRequest small{3, 0, 300};
  const GrantRequest other{4, 0, 10};
  CHECK(!scheduler.try_acquire(big)); // 600 + 500 > 1000
  CHECK(scheduler.try_acquire(small));
  CHECK(!scheduler.try_acquire(other)); // one running + one held: no slot left
  scheduler.release(small);
  // The held task asks again: its hold ends and it runs next to another batch as before.
  CHECK(scheduler.try_acquire(high));
  CHECK(scheduler.try_acquire(small));
  scheduler.release(small);
  scheduler.release(high);
}

namespace {

// Two workers with a backlog each: run a batch (sleep), release saying whether more is
// queued, then finish it (sleep: splitting outputs, completing futures) before asking again.
// Returns the low task's grants while the high one still had batches to run.
std::uint64_t low_grants_during_high_backlog(Nanoseconds max_hold_ns, int high_batches) {
  DeviceScheduler scheduler(options(1, 10'000 * ms, max_hold_ns), telemetry_with(1000, 1000));
  std::atomic<bool> high_started{false};
  std::atomic<bool> high_done{false};
  std::atomic<std::uint64_t> low_during{0};
  const auto work = [&](const GrantRequest request, int batches) {
    for (int batch = 0; batch < batches && !(request.task == 2 && high_done); ++batch) {
      CHECK(scheduler.acquire_until(request, now_ns() + 10'000 * ms));
      if (request.task == 2 && high_started && !high_done) {
        ++low_during;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(300));
      scheduler.release(request, batch + 1 < batches);
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  };
  std::thread low([&] { work(GrantRequest{2, 0, 1}, 1'000'000); });
  REQUIRE(eventually([&] { return scheduler.state().grants > 0; }));
  std::thread high([&] {
    high_started = true;
    work(GrantRequest{1, 5, 1}, high_batches);
    high_done = true;
  });
  high.join();
  low.join();
  return low_during.load();
}

} // namespace

TEST_CASE(two_backlogged_tasks_the_higher_gets_every_grant) {
  const int batches = 60;
  const std::uint64_t held = low_grants_during_high_backlog(50 * ms, batches);
  const std::uint64_t unheld = low_grants_during_high_backlog(0, batches);
  std::printf("low-priority grants while the high task had a backlog of %d batches: %llu with "
              "holds, %llu without\n",
              batches, static_cast<unsigned long long>(held),
              static_cast<unsigned long long>(unheld));
  // Without holds the low task takes the device in (nearly) every gap of the high one. With
  // them it gets the first gap (nothing measured yet), maybe one granted as the high task
  // started, and one per gap far beyond 4x the longest recent one: on a loaded 2-core machine
  // the thread sometimes waits milliseconds for a core. Counted in the same run: at least
  // five times fewer (typically 2 against 60; the fake-clock tests show the exact rule).
  CHECK_GE(unheld, static_cast<std::uint64_t>(batches / 3));
  CHECK_LE(held * 5, unheld);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
