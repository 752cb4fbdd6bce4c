#pragma once
// SizingPolicy: the one interface through which the batch former asks "how many next?".
//
// Contract
// - next_batch_size() is called by the batch former before it forms each batch;
//   on_feedback() once per delivered batch, after the caller is done with it. Implementations
//   are deterministic functions of these inputs (no clock, no I/O), so they are tested with
//   made-up telemetry and timings, and they serialise their own calls (thread-safe).
// - The returned size is always within [min_batch_size, max_batch_size].

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct SizingInputs {
  std::size_t queued = 0;           // requests waiting, a snapshot
  std::size_t bytes_per_sample = 0; // staged bytes one sample adds to a batch
  TelemetrySample telemetry;
};

struct BatchFeedback {
  std::size_t batch_size = 0;
  Nanoseconds compute_ns = 0; // the caller's time on the batch
  Nanoseconds collate_ns = 0; // the former's time to stage it (overlapped with compute)
};

struct SizingState {
  std::size_t target = 0;         // the size the policy is trying now
  std::size_t memory_ceiling = 0; // largest size the memory headroom allows
  bool converged = false;         // holding a size rather than probing
  std::size_t best_size = 0;
  double best_samples_per_second = 0.0;
};

class SizingPolicy {
public:
  virtual ~SizingPolicy() = default;
  virtual std::size_t next_batch_size(const SizingInputs &inputs) = 0;
  virtual void on_feedback(const BatchFeedback &feedback) = 0;
  virtual SizingState state() const = 0;
};

struct ThroughputClimbOptions {
  std::size_t min_batch_size = 1;
  std::size_t max_batch_size = 64;
  double memory_fraction = 0.25;     // share of available memory one staged batch may take
  double growth = 2.0;               // factor between sizes while expanding
  double tolerance = 0.03;           // a probe must beat the best size by this much to count
  double tight = 1.15;               // narrowing stops when the bracket's ends are this close
  std::size_t reprobe_after = 64;    // batches to hold a converged size before probing again
  std::size_t batches_per_probe = 2; // measurements of a size before judging it
};

// First sizing rule: maximises samples per second of the whole loop (the slower of caller and
// collation, which overlap), capped by host memory headroom. It grows the size geometrically
// from the minimum while throughput improves; once a size does worse, the best size is
// bracketed and the bracket is narrowed in log space until it is tight, then the size is held
// and re-checked now and then. A size is judged by the best of its probe's measurements: the
// first batch of a new shape often pays one-off costs (kernel selection, allocator growth).
class ThroughputClimb final : public SizingPolicy {
public:
  explicit ThroughputClimb(const ThroughputClimbOptions &options);

  std::size_t next_batch_size(const SizingInputs &inputs) override;
  void on_feedback(const BatchFeedback &feedback) override;
  SizingState state() const override;

private:
  enum class Phase { expanding, narrowing, holding };
  void judge(double cost);
  void probe(std::size_t size);
  void narrow();
  std::size_t clamp(double size) const;

  const ThroughputClimbOptions options_;
  mutable std::mutex mutex_;
  Phase phase_ = Phase::expanding;
  std::size_t current_;    // the size being probed or held
  std::size_t best_ = 0;   // best size judged so far, 0 before the first judgement
  double best_cost_ = 0.0; // its nanoseconds per sample
  std::size_t lower_ = 0;  // bracket around best_ while narrowing
  std::size_t upper_ = 0;
  std::size_t probe_batches_ = 0; // measurements of current_ in this probe
  double probe_cost_ = 0.0;       // the best of them, ns per sample
  std::size_t held_batches_ = 0;
  std::size_t memory_ceiling_;
  std::map<std::size_t, double> cost_per_sample_; // smoothed ns per sample, by batch size
};

} // namespace dynbatch
