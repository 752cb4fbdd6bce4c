#include "dynbatch/stats.hpp"

#include <algorithm>
#include <stdexcept>

namespace dynbatch {

StatsRecorder::StatsRecorder(std::size_t ring_capacity) : ring_capacity_(ring_capacity) {
  if (ring_capacity == 0) {
    throw std::invalid_argument("StatsRecorder: ring_capacity must be positive");
  }
  ring_.reserve(ring_capacity);
}

std::uint64_t StatsRecorder::next_sequence() {
  std::lock_guard lock(mutex_);
  return sequence_++;
}

void StatsRecorder::record_batch(const BatchRecord &record) {
  std::lock_guard lock(mutex_);
  ++totals_.batches;
  totals_.samples += record.batch_size;
  totals_.collate_ns += record.collate_ns;
  totals_.real_rows += record.real_rows;
  totals_.padded_rows += record.padded_rows;
  ++totals_.histogram[record.batch_size];
  ++totals_.released_by[static_cast<std::size_t>(record.reason)];
  if (ring_.size() < ring_capacity_) {
    ring_.push_back(record);
  } else {
    ring_[ring_next_] = record;
  }
  ring_next_ = (ring_next_ + 1) % ring_capacity_;
}

void StatsRecorder::record_compute(std::uint64_t sequence, Nanoseconds compute_ns) {
  std::lock_guard lock(mutex_);
  totals_.compute_ns += compute_ns;
  totals_.compute_time.add(compute_ns);
  // The batch is almost always the newest record: search backwards.
  for (std::size_t back = 1; back <= ring_.size(); ++back) {
    BatchRecord &record = ring_[(ring_next_ + ring_.size() - back) % ring_.size()];
    if (record.sequence == sequence) { // parts of a split batch add up
      record.compute_ns = std::max<Nanoseconds>(record.compute_ns, 0) + compute_ns;
      return;
    }
  }
}

void StatsRecorder::add_active_time(Nanoseconds active_ns) {
  std::lock_guard lock(mutex_);
  totals_.active_ns += active_ns;
}

void StatsRecorder::record_dispatch(std::span<const RequestDescriptor> requests,
                                    Nanoseconds taken_ns) {
  std::lock_guard lock(mutex_);
  PriorityStats *current = nullptr;
  std::int32_t current_priority = 0;
  for (const RequestDescriptor &request : requests) {
    if (current == nullptr || request.priority != current_priority) { // runs of one priority
      current = &totals_.priorities[request.priority];
      current_priority = request.priority;
    }
    ++current->dispatched;
    current->queue_wait.add(taken_ns - request.enqueue_ns);
  }
}

namespace {

void add_outcome(PriorityStats &stats, RequestOutcome outcome, std::uint64_t count) {
  switch (outcome) {
  case RequestOutcome::timed_out:
    stats.timed_out += count;
    break;
  case RequestOutcome::cancelled:
    stats.cancelled += count;
    break;
  case RequestOutcome::failed:
    stats.failed += count;
    break;
  }
}

} // namespace

void StatsRecorder::record_outcome(std::int32_t priority, RequestOutcome outcome,
                                   std::uint64_t count) {
  std::lock_guard lock(mutex_);
  add_outcome(totals_.priorities[priority], outcome, count);
}

void StatsRecorder::record_outcomes(std::span<const RequestDescriptor> requests,
                                    RequestOutcome outcome) {
  std::lock_guard lock(mutex_);
  for (const RequestDescriptor &request : requests) {
    add_outcome(totals_.priorities[request.priority], outcome, 1);
  }
}

StatsSnapshot StatsRecorder::snapshot() const {
  std::lock_guard lock(mutex_);
  StatsSnapshot snapshot = totals_;
  snapshot.recent.reserve(ring_.size());
  const std::size_t start = ring_.size() < ring_capacity_ ? 0 : ring_next_;
  for (std::size_t i = 0; i < ring_.size(); ++i) {
    snapshot.recent.push_back(ring_[(start + i) % ring_.size()]);
  }
  return snapshot;
}

void StatsRecorder::reset() {
  std::lock_guard lock(mutex_);
  ring_.clear();
  ring_next_ = 0;
  totals_ = StatsSnapshot{};
}

} // namespace dynbatch
