#pragma once
// SizingPolicy: the one interface through which the batch former asks "how many next?".
//
// Contract
// - next_batch_size() is called before a batch is formed (possibly more than once per batch,
//   and from the former thread or the consumer); it must not change the policy's course.
//   on_feedback() is called once per batch the caller finished or failed with.
// - Implementations are deterministic functions of these inputs (no clock, no I/O), so they
//   are tested with made-up telemetry and timings; they serialise their own calls.
// - The returned size is always within [min_batch_size, max_batch_size].

#include <cstddef>
#include <cstdint>

#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct SizingInputs {
  std::uint64_t bucket = 0;         // input-shape bucket: costs are learned per bucket
  std::size_t queued = 0;           // requests waiting, a snapshot
  std::size_t bytes_per_sample = 0; // staged bytes one sample adds to a batch (at `longest`)
  std::size_t longest = 0;          // padded layouts: the longest padded length so far
  TelemetrySample telemetry;
};

struct BatchFeedback {
  std::uint64_t bucket = 0;
  std::size_t batch_size = 0;
  std::size_t tokens = 0;              // padded layouts: batch_size x padded length; 0: none
  Nanoseconds compute_ns = 0;          // the caller's time on the batch
  Nanoseconds collate_ns = 0;          // staging time (overlapped with compute)
  std::uint64_t peak_memory_bytes = 0; // memory the batch took above what was in use; 0: unknown
  std::uint64_t reclaimable_bytes = 0; // allocator memory reserved but unused after the batch
  bool out_of_memory = false;          // the batch failed for lack of memory
};

struct SizingState {
  std::size_t target = 0;         // what next_batch_size() returns now (before memory changes)
  std::size_t token_budget = 0;   // the budget settled on (a neighbour's one-batch probe aside);
                                  // 0: sizes are not in tokens
  std::size_t memory_ceiling = 0; // largest size the memory headroom allows
  std::size_t oom_ceiling = 0;    // largest size allowed since the last OOM (may be below min)
  std::size_t slo_ceiling = 0;    // largest size meeting the latency SLO (max without one)
  std::size_t knee = 0;           // where throughput is within the tolerance of its ceiling
  bool exploring = false;         // still growing from the minimum to learn the costs
  std::uint64_t ooms = 0;
  double latency_intercept_ns = 0.0; // L(n) = a + b*n of the last bucket used
  double latency_slope_ns = 0.0;
  double memory_intercept_bytes = 0.0; // M(n) = m0 + m1*n
  double memory_slope_bytes = 0.0;
  std::size_t observations = 0;
};

class SizingPolicy {
public:
  virtual ~SizingPolicy() = default;
  virtual std::size_t next_batch_size(const SizingInputs &inputs) = 0;
  // Padded layouts: the largest padded size (samples x padded length) of the next batch, which
  // also holds at most next_batch_size() samples; 0: no budget.
  virtual std::size_t token_budget(const SizingInputs &inputs) {
    (void)inputs;
    return 0;
  }
  // Padded layouts: the padded tokens a request may add to a batch before running it in a
  // batch of its own is cheaper (the learned fixed cost of a batch over the cost of a token);
  // negative: not known (no limit).
  virtual double padding_allowance() const { return -1.0; }
  virtual void on_feedback(const BatchFeedback &feedback) = 0;
  virtual SizingState state() const = 0;
};

} // namespace dynbatch
