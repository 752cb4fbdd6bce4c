#pragma once
// SizingController: picks the batch size from learned costs, memory headroom, an optional
// latency SLO, out-of-memory history and utilization.
//
// The size is the largest n in [min, max] that
//   - fits memory: M(n) = m0 + m1*n <= available + reclaimable - margin (before a memory model
//     exists: the staged bytes of n samples within `staged_memory_fraction` of available);
//   - meets the SLO when one is set: L(n) = a + b*n <= slo;
//   - stays below the OOM ceiling: after an out-of-memory error at n the ceiling drops to the
//     largest size that has worked below n (n/2 when none has), then creeps back up by
//     `probe_step` after `probe_after` good batches at it, never to a size that failed; every
//     failed probe doubles the wait before the next, so OOMs thin out instead of looping;
//   - is not past the throughput knee: n / L(n) within `knee_tolerance` of its limit 1/b,
//     i.e. n >= (1 - tol) * a / (tol * b), and never below the smallest measured size whose
//     throughput is within tol of the best measured (a noisy fit must not undo what was
//     measured); with `utilization_target` set, a
//     device that stays below it lets the size grow past the knee while memory allows.
// It explores first: from the ladder rung (min * 2^k) whose batch stages about 256 KiB (min for
// large samples; at most 64 and max/16; a token budget: from min_units(), since the bytes of
// token ids say nothing of their compute) it grows 4x after each batch of the current size, until
// the latency line, fitted through three sizes at least, puts the knee at or below that size or a
// memory/SLO/OOM limit stops it. The first batch's time is not learned (it pays for the run's
// start), so the first size is measured twice.
// Once settled where the knee is the limit, it keeps the line honest: every `verify_every`
// batches one batch goes to a neighbour of the knee on the exploring ladder (min * 2^k), in
// turn the rung at or below knee/16 (where the fixed cost is most of the time, so it pins the
// intercept that places the knee) and the highest rung up to 2 * knee (within the limits). The
// same sizes come back, so their medians firm up, and the points that place the knee are never
// forgotten. Under timing noise the knee is thus estimated, not ratcheted by lucky samples.
// A token budget verifies eight times as often (every verify_every / 8 batches).
// Settled (sample counts), the size holds while the estimated knee stays within
// `knee_hold_band` (10%) of it: a size 10% off the knee costs about tol * 10% of throughput,
// while a new size every batch (each one noisy measurement, the line refitted through them)
// lets the knee wander off, far below it on a CPU's short pass.

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "dynbatch/cost_model.hpp"
#include "dynbatch/sizing_policy.hpp"

namespace dynbatch {

struct ControllerOptions {
  std::size_t min_batch_size = 1;
  std::size_t max_batch_size = 1024;
  Nanoseconds latency_slo_ns = 0; // 0: no SLO
  double knee_tolerance = 0.05;
  double memory_margin_fraction = 0.05; // of total memory, kept free
  double staged_memory_fraction = 0.25; // before a memory model: share of available for staging
  double utilization_target = 0.0;      // 0: utilization does not move the size
  std::size_t history = 64;             // observations before an unrevisited size is forgotten
  std::size_t probe_after = 16;
  double probe_step = 0.1;
  std::size_t max_buckets = 16;
  std::size_t verify_every = 16; // batches at the knee between two neighbour measurements
  // Padded layouts: costs are learned over the padded tokens of a batch (samples x padded
  // length) and the controller chooses a token budget (token_budget()); next_batch_size()
  // then returns max_batch_size, the cap on samples. Sizes below (ceilings, the ladder of
  // powers of two) are in tokens, and a budget always fits min_batch_size samples of the
  // longest length seen (min == max: no budget below the fixed size).
  bool tokens = false;
};

// What a controller has learned, to start another one from it (a profile of a past run).
struct LearnedState {
  struct Bucket {
    std::uint64_t key = 0;
    std::vector<LinearFit::Summary> latency; // (size, ns, measurements): the latency line's points
    std::vector<LinearFit::Summary> memory;  // (size, bytes, measurements)
  };
  std::vector<Bucket> buckets;
  std::size_t oom_ceiling = 0; // 0: none
  std::size_t failed_size = 0; // smallest size that ran out of memory; 0: none
  std::size_t longest = 0;     // tokens: the longest length seen
};

class SizingController final : public SizingPolicy {
public:
  explicit SizingController(const ControllerOptions &options);

  std::size_t next_batch_size(const SizingInputs &inputs) override;
  std::size_t token_budget(const SizingInputs &inputs) override;
  // Tokens: intercept / slope of the last bucket's latency line once it has one (0 when the
  // intercept is not positive); negative before, or when sizes are not in tokens.
  double padding_allowance() const override;
  void on_feedback(const BatchFeedback &feedback) override;
  SizingState state() const override;

  // Thread-safe. import_state() replaces what was learned: the controller then starts at the
  // size the imported lines give and only verifies it (no exploring); an OOM ceiling and a
  // failed size are kept, so a past out-of-memory error is not repeated.
  LearnedState export_state() const;
  void import_state(const LearnedState &learned);

private:
  // Settled, one batch in verify_every measures a neighbour of the bucket's own knee.
  struct Verification {
    std::size_t since = 0;  // batches since the last neighbour measurement
    std::size_t size = 0;   // a neighbour to measure next; 0: none
    std::size_t waited = 0; // batches that came back at another size meanwhile
    bool above = false;     // which neighbour comes next
  };
  struct Bucket {
    CostModel model;
    std::uint64_t last_used = 0;
    std::size_t held_knee = 0; // sample counts, settled: the knee the size holds to; 0: none
    Verification verify{};
  };
  struct Ceilings {
    std::size_t memory;
    std::size_t slo;
    std::size_t knee;
  };

  Bucket &bucket(std::uint64_t key);
  // next_batch_size() and token_budget(): the size in units (samples, or tokens).
  std::size_t ask(const SizingInputs &inputs);
  std::size_t max_units() const noexcept;
  std::size_t min_units() const noexcept;
  std::size_t ladder_base() const noexcept; // the exploring ladder is ladder_base() * 2^k
  std::size_t bytes_per_unit(const SizingInputs &inputs) const noexcept;
  std::size_t units_of(const BatchFeedback &feedback) const noexcept;
  // Whether a batch of `units` counts as one of `wanted` (a token budget is filled by whole
  // samples, so within 3/4 of it).
  bool reached(std::size_t units, std::size_t wanted) const noexcept;
  // Whether a batch of `units` is a measurement of size `wanted` (equal; tokens: within 3/4).
  bool matches(std::size_t units, std::size_t wanted) const noexcept;
  Ceilings ceilings(const Bucket &bucket, const SizingInputs &inputs) const;
  // probe: a planned verification of the knee's neighbour, which replaces the knee's size
  // (0: none).
  std::size_t decide(const Ceilings &limit, std::size_t probe = 0) const;
  // The first size to explore: the ladder rung whose batch stages about 256 KiB, within caps;
  // tokens: min_units().
  std::size_t explore_start(std::size_t bytes_per_sample) const;
  // The next neighbour of `knee` to measure (alternating below and above), or 0 for none.
  std::size_t neighbour(std::size_t knee, std::size_t hard, bool above_next) const;
  void plan_verification(const Ceilings &limit, std::size_t hard, std::size_t size,
                         Verification &verify);
  std::size_t clamp(double size) const;

  const ControllerOptions options_;
  mutable std::mutex mutex_;
  std::map<std::uint64_t, Bucket> buckets_;
  std::uint64_t uses_ = 0;
  std::uint64_t last_bucket_ = 0;

  bool exploring_ = true;
  bool measured_ = false; // a batch came back: exploring goes on from its size
  bool timed_ = false;    // a batch's time came back (the first one is not learned)
  std::size_t explore_size_;
  std::size_t oom_ceiling_;
  std::size_t failed_size_ = 0;     // smallest size that ran out of memory; 0: none
  std::size_t largest_success_ = 0; // largest size that worked (reset when memory shrank)
  std::size_t good_batches_at_ceiling_ = 0;
  std::size_t probe_wait_;
  std::uint64_t ooms_ = 0;
  std::uint64_t reclaimable_bytes_ = 0;
  double boost_ = 1.0; // growth past the knee while utilization stays low
  double last_utilization_ = 0.0;
  SizingInputs last_inputs_;
  std::size_t longest_ = 0;        // tokens: the longest sample length asked with
  double tokens_per_sample_ = 1.0; // tokens: of the last batch, to read reports without tokens
};

} // namespace dynbatch
