// Telemetry: the host source reads real numbers on Linux; the sampler publishes scripted values
// on refresh() and on its own period, tracks peak RSS and minimum available memory, and joins
// promptly on destruction.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"
#include "test_support.hpp"

using dynbatch::testing::eventually;

using dynbatch::HostTelemetrySource;
using dynbatch::Nanoseconds;
using dynbatch::now_ns;
using dynbatch::ScriptedTelemetrySource;
using dynbatch::TelemetrySample;
using dynbatch::TelemetrySampler;

namespace {

constexpr Nanoseconds ms = 1'000'000;
constexpr Nanoseconds one_hour = 3'600'000 * ms; // a period that never elapses in a test
constexpr Nanoseconds hang_bound_ns = 5'000 * ms;

TelemetrySample sample(std::uint64_t available, std::uint64_t rss) {
  TelemetrySample result;
  result.memory_total_bytes = 1'000'000;
  result.memory_available_bytes = available;
  result.process_rss_bytes = rss;
  result.utilization = 0.5;
  return result;
}

} // namespace

TEST_CASE(host_source_reads_memory_and_rss) {
#if defined(__linux__)
  HostTelemetrySource source;
  CHECK_EQ(source.name(), std::string("host"));
  const Nanoseconds before = now_ns();
  const TelemetrySample first = source.read();
  CHECK_GE(first.time_ns, before);
  CHECK_LE(first.time_ns, now_ns());
  CHECK_GT(first.memory_total_bytes, 16u * 1024 * 1024);
  CHECK_GT(first.memory_available_bytes, 0u);
  CHECK_LE(first.memory_available_bytes, first.memory_total_bytes);
  CHECK_GT(first.process_rss_bytes, 0u);
  CHECK_LT(first.process_rss_bytes, first.memory_total_bytes);
  CHECK_EQ(first.utilization, 0.0); // no previous reading to compare with

  // RSS follows what this process touches: 64 MiB written shows up.
  std::vector<char> touched(64u << 20);
  for (std::size_t i = 0; i < touched.size(); i += 4096) {
    touched[i] = static_cast<char>(i);
  }
  volatile char sink = touched[touched.size() / 2];
  static_cast<void>(sink);
  // Burn some CPU so the busy counters move.
  const Nanoseconds spin_until = now_ns() + 30 * ms;
  volatile std::uint64_t work = 0;
  while (now_ns() < spin_until) {
    work = work + 1;
  }
  const TelemetrySample second = source.read();
  CHECK_GE(second.process_rss_bytes, first.process_rss_bytes + (32u << 20));
  CHECK_GE(second.utilization, 0.0);
  CHECK_LE(second.utilization, 1.0);
  CHECK_GE(second.time_ns, first.time_ns);
#else
  CHECK(true); // host telemetry is read from /proc: Linux only
#endif
}

TEST_CASE(scripted_source_returns_what_was_set) {
  ScriptedTelemetrySource source(sample(100, 7));
  CHECK_EQ(source.name(), std::string("scripted"));
  TelemetrySample read = source.read();
  CHECK_EQ(read.memory_available_bytes, 100u);
  CHECK_EQ(read.process_rss_bytes, 7u);
  CHECK_GT(read.time_ns, 0); // stamped at read time
  source.set(sample(55, 8));
  read = source.read();
  CHECK_EQ(read.memory_available_bytes, 55u);
  CHECK_EQ(read.process_rss_bytes, 8u);
}

TEST_CASE(sampler_refresh_publishes_new_value) {
  auto source = std::make_shared<ScriptedTelemetrySource>(sample(1000, 10));
  TelemetrySampler sampler(source, one_hour);
  CHECK_EQ(sampler.source_name(), std::string("scripted"));
  // The constructor takes a first reading.
  CHECK_EQ(sampler.latest().memory_available_bytes, 1000u);
  CHECK_EQ(sampler.latest().process_rss_bytes, 10u);
  const Nanoseconds first_time = sampler.latest().time_ns;

  source->set(sample(400, 20));
  // Not sampled yet: the period is an hour.
  CHECK_EQ(sampler.latest().memory_available_bytes, 1000u);
  sampler.refresh();
  CHECK_EQ(sampler.latest().memory_available_bytes, 400u);
  CHECK_EQ(sampler.latest().process_rss_bytes, 20u);
  CHECK_GE(sampler.latest().time_ns, first_time);
}

TEST_CASE(sampler_tracks_peak_rss_and_min_available) {
  auto source = std::make_shared<ScriptedTelemetrySource>(sample(1000, 100));
  TelemetrySampler sampler(source, one_hour);
  CHECK_EQ(sampler.peak_rss_bytes(), 100u);
  CHECK_EQ(sampler.min_available_bytes(), 1000u);

  const std::uint64_t rss[] = {300, 200, 250};
  const std::uint64_t available[] = {700, 900, 800};
  for (int i = 0; i < 3; ++i) {
    source->set(sample(available[i], rss[i]));
    sampler.refresh();
  }
  CHECK_EQ(sampler.peak_rss_bytes(), 300u);
  CHECK_EQ(sampler.min_available_bytes(), 700u);
  CHECK_EQ(sampler.latest().process_rss_bytes, 250u);

  // reset_peak restarts both from the latest sample.
  sampler.reset_peak();
  CHECK_EQ(sampler.peak_rss_bytes(), 250u);
  CHECK_EQ(sampler.min_available_bytes(), 800u);
  source->set(sample(850, 240));
  sampler.refresh();
  CHECK_EQ(sampler.peak_rss_bytes(), 250u);
  CHECK_EQ(sampler.min_available_bytes(), 800u);
  source->set(sample(600, 260));
  sampler.refresh();
  CHECK_EQ(sampler.peak_rss_bytes(), 260u);
  CHECK_EQ(sampler.min_available_bytes(), 600u);
}

TEST_CASE(sampler_thread_polls_on_its_period) {
  auto source = std::make_shared<ScriptedTelemetrySource>(sample(1000, 1));
  TelemetrySampler sampler(source, 1 * ms);
  source->set(sample(123, 2));
  // No refresh(): the sampler's own thread must pick the change up.
  CHECK(eventually([&] { return sampler.latest().memory_available_bytes == 123u; }));
  CHECK(eventually([&] { return sampler.min_available_bytes() == 123u; }));
}

TEST_CASE(sampler_with_host_source) {
  TelemetrySampler sampler(std::make_shared<HostTelemetrySource>(), 5 * ms);
  CHECK_EQ(sampler.source_name(), std::string("host"));
#if defined(__linux__)
  CHECK_GT(sampler.latest().memory_available_bytes, 0u);
  CHECK_GT(sampler.peak_rss_bytes(), 0u);
  const Nanoseconds first = sampler.latest().time_ns;
  CHECK(eventually([&] { return sampler.latest().time_ns > first; }));
#endif
}

TEST_CASE(concurrent_readers_and_refreshers) {
  auto source = std::make_shared<ScriptedTelemetrySource>(sample(1000, 1));
  TelemetrySampler sampler(source, 1 * ms);
  std::atomic<bool> stop{false};
  std::atomic<std::size_t> inconsistent{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        const TelemetrySample latest = sampler.latest();
        // Every sample written has available + rss == 2000: a torn read breaks that.
        if (latest.memory_available_bytes + latest.process_rss_bytes != 2000 &&
            latest.memory_available_bytes != 1000) {
          inconsistent.fetch_add(1);
        }
        static_cast<void>(sampler.peak_rss_bytes());
      }
    });
  }
  for (std::uint64_t i = 0; i < 300; ++i) {
    source->set(sample(1000 - i, 1000 + i));
    sampler.refresh();
    if (i % 50 == 0) {
      sampler.reset_peak();
    }
  }
  stop.store(true);
  for (std::thread &thread : threads) {
    thread.join();
  }
  CHECK_EQ(inconsistent.load(), 0u);
  CHECK_EQ(sampler.latest().memory_available_bytes, 701u);
}

TEST_CASE(destructor_joins_promptly) {
  for (const Nanoseconds period : {one_hour, 1 * ms, 50 * ms}) {
    auto source = std::make_shared<ScriptedTelemetrySource>(sample(1, 1));
    std::weak_ptr<ScriptedTelemetrySource> watcher = source;
    auto sampler = std::make_unique<TelemetrySampler>(source, period);
    source.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const Nanoseconds start = now_ns();
    sampler.reset(); // stops and joins the thread, even in the middle of an hour-long wait
    CHECK_LT(now_ns() - start, hang_bound_ns);
    CHECK(watcher.expired()); // the thread and its source are gone
  }
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
