#include "dynbatch/sizing_controller.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace dynbatch {
namespace {
constexpr double boost_step = 1.25;
constexpr double max_boost = 8.0;
constexpr std::size_t knee_evidence = 3;  // distinct sizes measured before exploring may stop
constexpr std::size_t start_evidence = 3; // times the first size is learned before growing
// Exploring starts where a batch stages this much (small samples: a batch of one would pay the
// model's whole fixed cost for a few bytes of work) and grows 4x per measured size: with a
// batch formed ahead, every size runs twice before its feedback arrives, and on a short pass
// the small sizes cost more than they teach.
// At most explore_start_cap (and max / explore_start_share): three sizes must still be measured
// below the maximum, or the knee of a cheap model would never be seen.
constexpr std::size_t explore_start_bytes = 256 * 1024;
constexpr std::size_t explore_start_cap = 64;
constexpr std::size_t explore_start_share = 16;
constexpr double explore_growth = 4.0;
constexpr std::size_t intercept_rung = 16; // the neighbour below sits at or below knee / this
constexpr std::size_t verify_patience = 4; // batches a planned neighbour may wait for its turn
constexpr double knee_hold_band = 0.1;     // settled: a knee estimate this close keeps the size
// Token budgets verify this many times as often: batches at one budget mix lengths, so a time
// says less, and the neighbour below (one sample of the longest) sits nearer the knee, so it
// pins the intercept less; the knee, 19 a / b at 5%, is as noisy as that intercept. One batch
// in three is a probe, half of them below (about a fixed cost a each): ~2% of the time on a
// MiniLM-shaped simulation, for budgets that spread ~0.8x as much as at half this rate.
constexpr std::size_t token_verify_share = 8;
} // namespace

SizingController::SizingController(const ControllerOptions &options)
    : options_(options), explore_size_(options.min_batch_size),
      oom_ceiling_(options.tokens ? std::numeric_limits<std::size_t>::max()
                                  : options.max_batch_size),
      probe_wait_(options.probe_after) {
  if (options.min_batch_size < 1 || options.max_batch_size < options.min_batch_size) {
    throw std::invalid_argument("SizingController: need 1 <= min_batch_size <= max_batch_size");
  }
  if (!(options.knee_tolerance > 0.0 && options.knee_tolerance < 1.0)) {
    throw std::invalid_argument("SizingController: knee_tolerance must be in (0, 1)");
  }
  if (options.latency_slo_ns < 0 || options.max_buckets < 1 || options.probe_after < 1 ||
      options.verify_every < 1) {
    throw std::invalid_argument("SizingController: invalid options");
  }
}

std::size_t SizingController::max_units() const noexcept {
  // Tokens: a batch holds at most max_batch_size samples of the longest length seen.
  return options_.tokens ? options_.max_batch_size * std::max<std::size_t>(longest_, 1)
                         : options_.max_batch_size;
}

std::size_t SizingController::min_units() const noexcept {
  // Tokens: min_batch_size samples of the longest length always fit the budget.
  return options_.tokens ? options_.min_batch_size * std::max<std::size_t>(longest_, 1)
                         : options_.min_batch_size;
}

std::size_t SizingController::ladder_base() const noexcept {
  // Tokens: powers of two, which do not move as longer samples arrive.
  return options_.tokens ? 1 : options_.min_batch_size;
}

std::size_t SizingController::bytes_per_unit(const SizingInputs &inputs) const noexcept {
  return options_.tokens ? inputs.bytes_per_sample / std::max<std::size_t>(longest_, 1)
                         : inputs.bytes_per_sample;
}

std::size_t SizingController::units_of(const BatchFeedback &feedback) const noexcept {
  if (!options_.tokens) {
    return feedback.batch_size;
  }
  // A report without tokens (an out-of-memory error reported by sample count): estimated from
  // the tokens per sample of the batches so far.
  return feedback.tokens > 0 ? feedback.tokens
                             : static_cast<std::size_t>(std::ceil(
                                   static_cast<double>(feedback.batch_size) * tokens_per_sample_));
}

bool SizingController::reached(std::size_t units, std::size_t wanted) const noexcept {
  // A token budget is filled by whole samples: a batch within 3/4 of it counts as its size.
  return options_.tokens ? 4 * units >= 3 * wanted : units >= wanted;
}

bool SizingController::matches(std::size_t units, std::size_t wanted) const noexcept {
  return options_.tokens ? 4 * units >= 3 * wanted && units <= wanted : units == wanted;
}

std::size_t SizingController::clamp(double size) const {
  const double low = static_cast<double>(min_units());
  const double high = static_cast<double>(max_units());
  if (std::isnan(size)) {
    return min_units();
  }
  // A limit computed as exactly n comes out a rounding error below it: keep n.
  constexpr double rounding = 1e-9;
  return static_cast<std::size_t>(std::clamp(std::floor(size * (1.0 + rounding)), low, high));
}

SizingController::Bucket &SizingController::bucket(std::uint64_t key) {
  auto found = buckets_.find(key);
  if (found == buckets_.end()) {
    if (buckets_.size() >= options_.max_buckets) {
      buckets_.erase(std::min_element(buckets_.begin(), buckets_.end(), [](auto &a, auto &b) {
        return a.second.last_used < b.second.last_used;
      }));
    }
    found = buckets_.emplace(key, Bucket{CostModel(options_.history, options_.tokens), 0}).first;
  }
  found->second.last_used = ++uses_;
  return found->second;
}

SizingController::Ceilings SizingController::ceilings(const Bucket &entry,
                                                      const SizingInputs &inputs) const {
  const double unbounded = static_cast<double>(max_units());
  const LinearFit &memory = entry.model.memory_bytes;
  const LinearFit &latency = entry.model.latency_ns;
  const TelemetrySample &telemetry = inputs.telemetry;

  double memory_limit = unbounded;
  if (telemetry.memory_available_bytes > 0) {
    const double margin =
        options_.memory_margin_fraction * static_cast<double>(telemetry.memory_total_bytes);
    const double usable = static_cast<double>(telemetry.memory_available_bytes) +
                          static_cast<double>(reclaimable_bytes_) - margin;
    if (memory.count() > 0) {
      const double per_sample = std::max(memory.slope(), 0.0);
      const double fixed = std::max(memory.intercept(), 0.0);
      memory_limit = per_sample > 0.0 ? (usable - fixed) / per_sample : unbounded;
    } else if (bytes_per_unit(inputs) > 0) {
      memory_limit = static_cast<double>(telemetry.memory_available_bytes) *
                     options_.staged_memory_fraction / static_cast<double>(bytes_per_unit(inputs));
    }
  }

  const double a = std::max(latency.intercept(), 0.0);
  const double b = latency.slope();
  double slo_limit = unbounded;
  if (options_.latency_slo_ns > 0 && latency.count() > 0 && b > 0.0) {
    slo_limit = (static_cast<double>(options_.latency_slo_ns) - a) / b;
  }
  double knee = unbounded;
  if (latency.has_line() && b > 0.0) {
    const double tol = options_.knee_tolerance;
    // A knee computed as exactly n comes out a rounding error above it: keep n.
    constexpr double rounding = 1e-9;
    knee = std::ceil((1.0 - tol) * a / (tol * b) * (1.0 - rounding));
    // The line is trusted where it explains every measured size within the tolerance and the
    // noise. Where it does not (per-sample cost that keeps falling with size, as a CPU GEMM's,
    // or two sizes only), the knee is never below what was measured: the smallest size whose
    // throughput is near the best measured one.
    const bool line_explains =
        latency.distinct_x() >= knee_evidence &&
        latency.largest_relative_residual() <= tol + 2.0 * latency.relative_spread();
    if (!line_explains) {
      knee = std::max(knee, latency.smallest_x_near_best_ratio(tol));
    }
    // Nor above a size that measured best where a larger one measured worse (a CPU's caches:
    // the MLP's 1024 ran at 0.89x the throughput of 512 in one run): the line, which only
    // flattens, would put the knee at the larger size or past it. Not for token budgets: their
    // bins mix lengths and the curve is flat for thousands of tokens, so the largest bin near
    // the best is noise (MiniLM's budgets spread 1.55-1.80x over a triple with it, 1.19x without).
    const double worse_above =
        options_.tokens ? 0.0 : latency.largest_x_near_best_ratio_below_a_worse_one(tol);
    if (worse_above > 0.0) {
      knee = std::min(knee, worse_above);
    }
  }
  std::size_t knee_size = clamp(knee);
  const std::size_t held = entry.held_knee;
  if (held != 0 &&
      static_cast<double>(knee_size) * (1.0 + knee_hold_band) >= static_cast<double>(held) &&
      static_cast<double>(knee_size) <= static_cast<double>(held) * (1.0 + knee_hold_band)) {
    knee_size = held;
  }
  return Ceilings{clamp(memory_limit), clamp(slo_limit), knee_size};
}

std::size_t SizingController::next_batch_size(const SizingInputs &inputs) {
  std::lock_guard lock(mutex_);
  const std::size_t units = ask(inputs);
  return options_.tokens ? options_.max_batch_size : units;
}

std::size_t SizingController::token_budget(const SizingInputs &inputs) {
  std::lock_guard lock(mutex_);
  const std::size_t units = ask(inputs);
  return options_.tokens ? units : 0;
}

double SizingController::padding_allowance() const {
  std::lock_guard lock(mutex_);
  const auto found = buckets_.find(last_bucket_);
  if (!options_.tokens || found == buckets_.end()) {
    return -1.0;
  }
  const LinearFit &latency = found->second.model.latency_ns;
  if (!latency.has_line() || !(latency.slope() > 0.0)) {
    return -1.0;
  }
  return std::max(latency.intercept(), 0.0) / latency.slope();
}

std::size_t SizingController::ask(const SizingInputs &inputs) {
  Bucket &entry = bucket(inputs.bucket);
  last_bucket_ = inputs.bucket;
  last_inputs_ = inputs;
  longest_ = std::max(longest_, inputs.longest);
  last_utilization_ = inputs.telemetry.utilization;
  return decide(ceilings(entry, inputs), entry.verify.size);
}

std::size_t SizingController::explore_start(std::size_t unit_bytes) const {
  if (options_.tokens) {
    // From the minimum: a padded token (an 8-byte id) costs a transformer tens of MFLOP, so
    // 256 KiB of them (32,768 tokens, hundreds of sentences) would start past a CPU's knee,
    // and the wide batches it takes from a length-grouped window pad most. 4x growth reaches
    // a GPU's knee in a few batches all the same.
    return min_units();
  }
  const std::size_t cap = std::min(explore_start_cap, max_units() / explore_start_share);
  std::size_t size = ladder_base();
  while (unit_bytes > 0 && size * 2 <= cap && size * 2 * unit_bytes <= explore_start_bytes) {
    size *= 2;
  }
  return std::max(size, min_units());
}

std::size_t SizingController::decide(const Ceilings &limit, std::size_t probe) const {
  const std::size_t hard = std::min({limit.memory, limit.slo, oom_ceiling_});
  const std::size_t explore =
      measured_ ? explore_size_ : explore_start(bytes_per_unit(last_inputs_));
  std::size_t wanted = exploring_ ? explore : clamp(static_cast<double>(limit.knee) * boost_);
  if (probe != 0 && !exploring_) {
    wanted = probe;
  }
  return std::max(min_units(), std::min(wanted, hard));
}

std::size_t SizingController::neighbour(std::size_t knee, std::size_t hard, bool above_next) const {
  // Rungs of the exploring ladder, so each neighbour is a size measured before and again.
  std::size_t below = ladder_base();
  while (below * 2 <= knee / intercept_rung) {
    below *= 2;
  }
  below = std::max(below, min_units());
  std::size_t above = ladder_base();
  while (above * 2 <= 2 * knee && above * 2 <= max_units()) {
    above *= 2;
  }
  above = std::min({above, hard, max_units()});
  const bool below_useful = below < knee;
  const bool above_useful = above > knee;
  if (above_next ? above_useful : !below_useful) {
    return above_useful ? above : 0;
  }
  return below;
}

void SizingController::plan_verification(const Ceilings &limit, std::size_t hard, std::size_t size,
                                         Verification &verify) {
  if (verify.size != 0) {
    // Measured (or it waited long enough behind batches formed ahead): back to the knee.
    // Not any batch at least as large: a batch at the knee that was formed ahead of the
    // neighbour below must not count as its measurement.
    if (matches(size, std::min(verify.size, hard)) || ++verify.waited > verify_patience) {
      verify = Verification{0, 0, 0, !verify.above};
    }
    return;
  }
  // Only where the knee is what sets the size: a memory, SLO or OOM limit is not estimated
  // from the line, and the utilization boost moves away from the knee on purpose.
  const std::size_t every =
      options_.tokens ? std::max<std::size_t>(1, options_.verify_every / token_verify_share)
                      : options_.verify_every;
  if (boost_ != 1.0 || limit.knee >= hard || ++verify.since < every) {
    return;
  }
  verify.size = neighbour(limit.knee, hard, verify.above);
  if (verify.size == 0) {
    verify.since = 0;
    verify.above = !verify.above;
  }
}

void SizingController::on_feedback(const BatchFeedback &feedback) {
  std::lock_guard lock(mutex_);
  if (feedback.batch_size == 0) {
    return;
  }
  const std::size_t size = units_of(feedback);
  if (options_.tokens && feedback.tokens > 0 && !feedback.out_of_memory) {
    tokens_per_sample_ =
        static_cast<double>(feedback.tokens) / static_cast<double>(feedback.batch_size);
  }
  if (feedback.out_of_memory) {
    ++ooms_;
    if (largest_success_ > 0 && largest_success_ < size) {
      if (ooms_ > 1) {
        probe_wait_ *= 2; // a probe failed: wait longer before the next one
      }
      oom_ceiling_ = std::min(oom_ceiling_, largest_success_);
    } else { // nothing smaller is known to work (or memory shrank since): halve
      largest_success_ = 0;
      // Below min_batch_size if need be: memory wins over a preference.
      oom_ceiling_ = std::max<std::size_t>(1, std::min(oom_ceiling_, size / 2));
    }
    failed_size_ = failed_size_ == 0 ? size : std::min(failed_size_, size);
    good_batches_at_ceiling_ = 0;
    exploring_ = false;
    boost_ = 1.0;
    return;
  }
  if (failed_size_ == 0 || size < failed_size_) {
    largest_success_ = std::max(largest_success_, size);
  }
  Bucket &entry = bucket(feedback.bucket);
  // The first batch's time pays for what starts with the run (the pipeline filling on other
  // threads, first-call setup): a real model's first batch took 3.5x its later time in two
  // of three passes, and as the only point at its size it pulled the intercept, so the knee,
  // up for 64 batches. Its size is measured again instead; its memory counts.
  const bool warm_up = !timed_ && feedback.compute_ns > 0;
  if (warm_up) {
    timed_ = true;
  } else if (feedback.compute_ns > 0) {
    entry.model.latency_ns.add(static_cast<double>(size), static_cast<double>(feedback.compute_ns));
  }
  if (feedback.peak_memory_bytes > 0) {
    entry.model.memory_bytes.add(static_cast<double>(size),
                                 static_cast<double>(feedback.peak_memory_bytes));
  }
  reclaimable_bytes_ = feedback.reclaimable_bytes;

  const Ceilings limit = ceilings(entry, last_inputs_);
  const std::size_t hard = std::min({limit.memory, limit.slo, oom_ceiling_});
  if (!measured_) {
    // Exploring goes on from the first size (a token budget is filled to within a sample).
    const std::size_t start = explore_start(bytes_per_unit(last_inputs_));
    explore_size_ = std::max(explore_size_, reached(size, start) ? start : size);
    measured_ = true;
  }
  // A batch of max_batch_size samples is as large as a token budget can make it.
  const bool full = options_.tokens && feedback.batch_size >= options_.max_batch_size;
  const LinearFit &latency = entry.model.latency_ns;
  // The first size pins the intercept, so the knee (19 a / b): one lucky batch there (0.65x
  // its usual time, in a replay of the MLP's measured times) put a near 0 and the knee at a
  // tenth of the truth for the rest of a cold pass. Learned three times, its median outvotes
  // one outlier (two: their mean is still pulled), for two more of the cheapest batches.
  const bool start_unsure = latency.distinct_x() == 1 && latency.count() < start_evidence;
  if (exploring_ && !warm_up && !start_unsure &&
      (full || reached(size, std::min(explore_size_, hard)))) {
    // Three sizes at least: with two, one noisy batch (one that ran while another thread held
    // the GIL) can put the knee at the smallest size, and nothing bigger is ever measured.
    const bool knee_found = latency.distinct_x() >= knee_evidence && explore_size_ >= limit.knee;
    if (knee_found || full || explore_size_ >= hard) {
      exploring_ = false;
    } else {
      explore_size_ = clamp(static_cast<double>(explore_size_) * explore_growth);
    }
  }
  if (!exploring_) {
    plan_verification(limit, hard, size, entry.verify);
    if (!options_.tokens) {
      entry.held_knee = limit.knee; // the estimate, or the size it stayed near
    }
  }
  if (oom_ceiling_ < max_units() && reached(size, oom_ceiling_) &&
      ++good_batches_at_ceiling_ >= probe_wait_) {
    // Creep back up, but never to a size that has failed.
    const double grown = std::ceil(static_cast<double>(oom_ceiling_) * (1.0 + options_.probe_step));
    // Not clamp(): the OOM ceiling may sit below min_batch_size and must creep up from there.
    std::size_t next =
        std::min(max_units(), static_cast<std::size_t>(std::max(grown, oom_ceiling_ + 1.0)));
    if (failed_size_ != 0) {
      next = std::min(next, failed_size_ - 1);
    }
    oom_ceiling_ = std::max(oom_ceiling_, next);
    good_batches_at_ceiling_ = 0;
  }
  if (options_.utilization_target > 0.0 && last_utilization_ > 0.0 && !exploring_) {
    if (last_utilization_ < options_.utilization_target && size < hard) {
      boost_ = std::min(boost_ * boost_step, max_boost);
    } else if (last_utilization_ >= options_.utilization_target) {
      boost_ = std::max(1.0, boost_ / boost_step);
    }
  }
}

LearnedState SizingController::export_state() const {
  std::lock_guard lock(mutex_);
  LearnedState learned;
  for (const auto &[key, entry] : buckets_) {
    learned.buckets.push_back(
        {key, entry.model.latency_ns.points(), entry.model.memory_bytes.points()});
  }
  const bool has_ceiling = oom_ceiling_ < (options_.tokens ? std::numeric_limits<std::size_t>::max()
                                                           : options_.max_batch_size);
  learned.oom_ceiling = has_ceiling ? oom_ceiling_ : 0;
  learned.failed_size = failed_size_;
  learned.longest = longest_;
  return learned;
}

void SizingController::import_state(const LearnedState &learned) {
  std::lock_guard lock(mutex_);
  if (learned.buckets.size() > options_.max_buckets) {
    throw std::invalid_argument(
        "SizingController::import_state: " + std::to_string(learned.buckets.size()) +
        " buckets, more than max_buckets");
  }
  buckets_.clear();
  for (const LearnedState::Bucket &saved : learned.buckets) {
    Bucket &entry =
        buckets_.emplace(saved.key, Bucket{CostModel(options_.history, options_.tokens), 0})
            .first->second;
    entry.last_used = ++uses_;
    const auto restore = [](const std::vector<LinearFit::Summary> &points, LinearFit &fit,
                            const char *line) {
      for (const LinearFit::Summary &point : points) {
        if (!(point.x > 0.0 && point.y > 0.0) || point.count < 1) {
          throw std::invalid_argument(std::string("SizingController::import_state: ") + line +
                                      " points must be positive");
        }
        fit.restore(point);
      }
    };
    restore(saved.latency, entry.model.latency_ns, "latency");
    restore(saved.memory, entry.model.memory_bytes, "memory");
  }
  if (learned.oom_ceiling != 0) {
    oom_ceiling_ = learned.oom_ceiling;
    largest_success_ = learned.oom_ceiling;
  }
  failed_size_ = learned.failed_size;
  longest_ = std::max(longest_, learned.longest);
  // Start where the lines say and verify from there (the knee's neighbours, as usual).
  exploring_ = false;
  measured_ = true;
}

SizingState SizingController::state() const {
  std::lock_guard lock(mutex_);
  SizingState state;
  // Tokens: ceilings as samples of the longest length seen (what a batch split after an
  // out-of-memory error must fit), the budget itself in tokens.
  const std::size_t per_sample = options_.tokens ? std::max<std::size_t>(longest_, 1) : 1;
  const auto samples = [&](std::size_t units) {
    return std::min(options_.max_batch_size, std::max<std::size_t>(units / per_sample, 1));
  };
  state.oom_ceiling = options_.tokens ? samples(oom_ceiling_) : oom_ceiling_;
  state.exploring = exploring_;
  state.ooms = ooms_;
  const auto found = buckets_.find(last_bucket_);
  if (found != buckets_.end()) {
    const Ceilings limit = ceilings(found->second, last_inputs_);
    state.memory_ceiling = samples(limit.memory);
    state.slo_ceiling = samples(limit.slo);
    state.knee = samples(limit.knee);
    const CostModel &model = found->second.model;
    state.latency_intercept_ns = std::max(model.latency_ns.intercept(), 0.0);
    state.latency_slope_ns = model.latency_ns.slope();
    state.memory_intercept_bytes = std::max(model.memory_bytes.intercept(), 0.0);
    state.memory_slope_bytes = std::max(model.memory_bytes.slope(), 0.0);
    state.observations = model.latency_ns.count();
    const std::size_t units = decide(limit, found->second.verify.size);
    state.target = options_.tokens ? options_.max_batch_size : units;
    // The budget it settles on: a verification probe at a neighbour lasts one batch.
    state.token_budget = options_.tokens ? decide(limit) : 0;
  } else {
    const std::size_t units = explore_start(bytes_per_unit(last_inputs_));
    state.target = options_.tokens ? options_.max_batch_size : units;
    state.token_budget = options_.tokens ? units : 0;
    state.memory_ceiling = state.slo_ceiling = state.knee = options_.max_batch_size;
  }
  return state;
}

} // namespace dynbatch
