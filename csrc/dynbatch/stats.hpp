#pragma once
// StatsRecorder: counters plus a fixed-size ring of per-batch records, rendered in Python.
//
// Contract: every call is thread-safe (a short mutex, once per batch, never per request).
// Memory is bounded: the ring keeps the last `ring_capacity` batches, the histogram one entry
// per distinct batch size (at most max_batch_size entries).

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "dynbatch/platform.hpp"

namespace dynbatch {

struct BatchRecord {
  std::uint64_t sequence = 0;
  std::size_t batch_size = 0;
  std::size_t target = 0;
  Nanoseconds first_enqueue_ns = 0; // when the batch's first sample entered the queue
  Nanoseconds formed_ns = 0;        // when its collation finished
  Nanoseconds delivered_ns = 0;     // when the caller received it
  Nanoseconds collate_ns = 0;
  Nanoseconds compute_ns = -1; // the caller's time on it; -1 until reported
  std::uint64_t memory_available_bytes = 0;
};

struct StatsSnapshot {
  std::uint64_t batches = 0;
  std::uint64_t samples = 0;
  Nanoseconds collate_ns = 0;
  Nanoseconds compute_ns = 0;
  Nanoseconds active_ns = 0; // wall time during which some iteration was running
  std::map<std::size_t, std::uint64_t> histogram;
  std::vector<BatchRecord> recent; // oldest first
};

class StatsRecorder {
public:
  explicit StatsRecorder(std::size_t ring_capacity = 4096);

  void record_batch(const BatchRecord &record);
  void record_compute(std::uint64_t sequence, Nanoseconds compute_ns);
  void add_active_time(Nanoseconds active_ns);
  std::uint64_t next_sequence();
  StatsSnapshot snapshot() const;
  void reset();

private:
  mutable std::mutex mutex_;
  const std::size_t ring_capacity_;
  std::vector<BatchRecord> ring_;
  std::size_t ring_next_ = 0;
  std::uint64_t sequence_ = 0;
  StatsSnapshot totals_; // `recent` unused here; the ring holds the records
};

} // namespace dynbatch
