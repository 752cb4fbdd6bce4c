#include "dynbatch/telemetry.hpp"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <unistd.h>

namespace dynbatch {
namespace {

// Returns 0 when the file is absent or holds no number ("max" in a cgroup file means no limit).
std::uint64_t read_number_file(const char *path) {
  std::ifstream file(path);
  std::uint64_t value = 0;
  if (file >> value) {
    return value;
  }
  return 0;
}

void read_meminfo(TelemetrySample &sample) {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemTotal:") {
      sample.memory_total_bytes = kib * 1024;
    } else if (key == "MemAvailable:") {
      sample.memory_available_bytes = kib * 1024;
    }
  }
}

// Inside a container the cgroup limit, not the machine, is what runs out first.
void apply_cgroup_limit(TelemetrySample &sample) {
  std::uint64_t limit = read_number_file("/sys/fs/cgroup/memory.max");
  std::uint64_t used = read_number_file("/sys/fs/cgroup/memory.current");
  if (limit == 0) {
    limit = read_number_file("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    used = read_number_file("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  }
  if (limit == 0 || limit >= sample.memory_total_bytes) {
    return;
  }
  sample.memory_total_bytes = limit;
  const std::uint64_t cgroup_available = used < limit ? limit - used : 0;
  sample.memory_available_bytes = std::min(sample.memory_available_bytes, cgroup_available);
}

} // namespace

std::uint64_t host_process_rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t size_pages = 0;
  std::uint64_t resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
}

TelemetrySample HostTelemetrySource::read() {
  TelemetrySample sample;
  sample.time_ns = now_ns();
  read_meminfo(sample);
  apply_cgroup_limit(sample);
  sample.process_rss_bytes = host_process_rss_bytes();

  std::ifstream stat("/proc/stat");
  std::string cpu;
  std::uint64_t total = 0;
  std::uint64_t idle = 0;
  stat >> cpu;
  for (int field = 0; field < 8; ++field) {
    std::uint64_t value = 0;
    stat >> value;
    total += value;
    if (field == 3 || field == 4) { // idle, iowait
      idle += value;
    }
  }
  const std::uint64_t busy = total - idle;
  if (previous_total_ != 0 && total > previous_total_) {
    sample.utilization =
        static_cast<double>(busy - previous_busy_) / static_cast<double>(total - previous_total_);
  }
  previous_busy_ = busy;
  previous_total_ = total;
  return sample;
}

void ScriptedTelemetrySource::set(const TelemetrySample &sample) {
  std::lock_guard lock(mutex_);
  sample_ = sample;
}

TelemetrySample ScriptedTelemetrySource::read() {
  std::lock_guard lock(mutex_);
  TelemetrySample sample = sample_;
  sample.time_ns = now_ns();
  return sample;
}

TelemetrySampler::TelemetrySampler(std::shared_ptr<TelemetrySource> source, Nanoseconds period_ns)
    : source_(std::move(source)), period_ns_(period_ns) {
  refresh(); // a first reading before anyone asks
  thread_ = std::thread([this] { run(); });
}

TelemetrySampler::~TelemetrySampler() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  stop_requested_.notify_all();
  thread_.join();
}

void TelemetrySampler::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (stop_requested_.wait_for(lock, std::chrono::nanoseconds(period_ns_),
                                 [this] { return stopping_; })) {
      return;
    }
    lock.unlock();
    refresh();
    lock.lock();
  }
}

void TelemetrySampler::refresh() {
  std::lock_guard read_lock(read_mutex_);
  try {
    record(source_->read());
  } catch (...) {
    // A failed reading keeps the last one: sizing must not die with a sensor.
  }
}

void TelemetrySampler::record(const TelemetrySample &sample) {
  std::lock_guard lock(mutex_);
  latest_ = sample;
  peak_rss_ = std::max(peak_rss_, sample.process_rss_bytes);
  min_available_ = std::min(min_available_, sample.memory_available_bytes);
}

TelemetrySample TelemetrySampler::latest() const {
  std::lock_guard lock(mutex_);
  return latest_;
}

std::uint64_t TelemetrySampler::peak_rss_bytes() const {
  std::lock_guard lock(mutex_);
  return peak_rss_;
}

std::uint64_t TelemetrySampler::min_available_bytes() const {
  std::lock_guard lock(mutex_);
  return min_available_;
}

void TelemetrySampler::reset_peak() {
  std::lock_guard lock(mutex_);
  peak_rss_ = latest_.process_rss_bytes;
  min_available_ = latest_.memory_available_bytes;
}

} // namespace dynbatch
