#pragma once
// StatsRecorder: counters plus a fixed-size ring of per-batch records, rendered in Python.
//
// Contract: every call is thread-safe (a short mutex, once per batch, never per request).
// Memory is bounded: the ring keeps the last `ring_capacity` batches, the histogram one entry
// per distinct batch size (at most max_batch_size entries), one fixed-size entry per distinct
// request priority.

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <vector>

#include "dynbatch/latency_histogram.hpp"
#include "dynbatch/pending_requests.hpp"
#include "dynbatch/platform.hpp"

namespace dynbatch {

// Why a batch left the former: it reached its target size, its oldest request had waited
// max_delay, a request's deadline was near, or the input was closed (the rest drains).
enum class ReleaseReason : std::uint8_t { full, max_delay, deadline, drain };
inline constexpr std::size_t release_reason_count = 4;

// How requests ended, other than with a result: counted per priority.
enum class RequestOutcome : std::uint8_t { timed_out, cancelled, failed };

struct PriorityStats {
  std::uint64_t dispatched = 0; // taken into a batch
  std::uint64_t timed_out = 0;
  std::uint64_t cancelled = 0;
  std::uint64_t failed = 0;    // ended with their own error (isolated model errors)
  LatencyHistogram queue_wait; // enqueue to being taken into a batch
};

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
  ReleaseReason reason = ReleaseReason::full;
  std::uint64_t real_rows = 0;   // padded leaves: rows the samples brought
  std::uint64_t padded_rows = 0; // and rows after padding (batch size x padded length)
};

struct StatsSnapshot {
  std::uint64_t batches = 0;
  std::uint64_t samples = 0;
  Nanoseconds collate_ns = 0;
  Nanoseconds compute_ns = 0;
  Nanoseconds active_ns = 0;   // wall time during which some iteration was running
  std::uint64_t real_rows = 0; // padded leaves: real / padded is the padding efficiency
  std::uint64_t padded_rows = 0;
  std::map<std::size_t, std::uint64_t> histogram;
  std::array<std::uint64_t, release_reason_count> released_by{}; // indexed by ReleaseReason
  std::map<std::int32_t, PriorityStats> priorities;              // one entry per priority seen
  LatencyHistogram compute_time;   // the caller's (or model's) time per batch
  std::vector<BatchRecord> recent; // oldest first
};

class StatsRecorder {
public:
  explicit StatsRecorder(std::size_t ring_capacity = 4096);

  void record_batch(const BatchRecord &record);
  // The caller's time on batch `sequence`, or on one part of it (parts add up).
  void record_compute(std::uint64_t sequence, Nanoseconds compute_ns);
  void add_active_time(Nanoseconds active_ns);
  // The requests of one batch, taken at `taken_ns`: their queue waits, per priority.
  void record_dispatch(std::span<const RequestDescriptor> requests, Nanoseconds taken_ns);
  void record_outcome(std::int32_t priority, RequestOutcome outcome, std::uint64_t count = 1);
  void record_outcomes(std::span<const RequestDescriptor> requests, RequestOutcome outcome);
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
