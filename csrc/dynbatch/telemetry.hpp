#pragma once
// Telemetry: where sizing decisions read memory headroom and utilization from.
//
// Contract
// - A TelemetrySource is read by one sampler thread at a time; read() may block briefly on
//   file I/O and never touches Python.
// - TelemetrySampler owns one thread that polls its source every period; latest() and the peak
//   counters are thread-safe and never block on I/O. The destructor stops and joins the thread.
//   Make it with make_fork_safe_shared: in a forked child its thread does not exist and it
//   must be leaked, not destroyed (fork_guard.hpp); forked() says so.
// - HostTelemetrySource reports host memory (the tighter of /proc/meminfo and the cgroup limit)
//   and whole-machine CPU utilization. ScriptedTelemetrySource returns what a test set.
//   NvmlTelemetrySource (nvml_telemetry.hpp) reads a GPU through NVML.

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "dynbatch/fork_guard.hpp"
#include "dynbatch/platform.hpp"

namespace dynbatch {

struct TelemetrySample {
  Nanoseconds time_ns = 0;
  std::uint64_t memory_total_bytes = 0;
  std::uint64_t memory_available_bytes = 0;
  std::uint64_t process_rss_bytes = 0;
  double utilization = 0.0; // 0..1 over the last sampling period
};

// This process's resident set size, from /proc/self/statm (0 where that is absent).
std::uint64_t host_process_rss_bytes();

class TelemetrySource {
public:
  virtual ~TelemetrySource() = default;
  virtual TelemetrySample read() = 0;
  virtual std::string name() const = 0;
};

class HostTelemetrySource final : public TelemetrySource {
public:
  TelemetrySample read() override;
  std::string name() const override { return "host"; }

private:
  std::uint64_t previous_busy_ = 0;
  std::uint64_t previous_total_ = 0;
};

class ScriptedTelemetrySource final : public TelemetrySource {
public:
  explicit ScriptedTelemetrySource(TelemetrySample sample) : sample_(sample) {}
  void set(const TelemetrySample &sample);
  TelemetrySample read() override;
  std::string name() const override { return "scripted"; }

private:
  std::mutex mutex_;
  TelemetrySample sample_;
};

class TelemetrySampler {
public:
  TelemetrySampler(std::shared_ptr<TelemetrySource> source, Nanoseconds period_ns);
  ~TelemetrySampler();
  TelemetrySampler(const TelemetrySampler &) = delete;
  TelemetrySampler &operator=(const TelemetrySampler &) = delete;

  TelemetrySample latest() const;
  // Highest process RSS seen since the last reset_peak(), sampled every period.
  std::uint64_t peak_rss_bytes() const;
  // Lowest available memory seen since the last reset_peak().
  std::uint64_t min_available_bytes() const;
  void reset_peak();
  // Takes a sample now, so a test that just changed a scripted source sees it at once.
  void refresh();
  std::string source_name() const { return source_->name(); }
  // True in a process forked after this sampler was made: it samples nothing there.
  bool forked() const noexcept { return stamp_.forked(); }

private:
  void run();
  void record(const TelemetrySample &sample);

  const ForkStamp stamp_;
  const std::shared_ptr<TelemetrySource> source_;
  const Nanoseconds period_ns_;
  mutable std::mutex mutex_;
  std::mutex read_mutex_; // one reader of source_ at a time
  std::condition_variable stop_requested_;
  bool stopping_ = false;
  TelemetrySample latest_;
  std::uint64_t peak_rss_ = 0;
  std::uint64_t min_available_ = UINT64_MAX;
  std::thread thread_;
};

} // namespace dynbatch
