#pragma once
// PendingRequests: requests a BatchFormer has taken off its queue and not yet formed into a
// batch, ordered for the next batch by priority with aging, with their deadlines tracked.
//
// Contract
// - Not thread-safe: only the holder of the former's formation mutex touches it.
// - Requests of one priority leave in arrival order. Across priorities the next request is the
//   head with the largest effective priority, `priority + waited / aging_ns` (ties: the larger
//   base priority, then the older), so a low priority is never starved: its oldest request
//   gains one level per `aging_ns` waited until it outranks a saturating stream.
// - expire(now) removes every request whose deadline has passed; take() never returns one.
// - Variable-length requests (padding): a token budget caps a batch by its padded size
//   (count x longest, the longest rounded up to a multiple), stopping at the first request
//   that would exceed it; a bucket window groups similar lengths: the best request always
//   goes first (nothing is starved), then of the next `window` requests in order, those
//   closest to its length; the others stay where they were.
// - A padding allowance (serving: the learned fixed cost of a batch, in padded tokens) makes
//   the grouping cost-aware: a request joins the batch only if the padding it adds (its own,
//   and the others' when it is the new longest) is within the allowance, i.e. costs less than
//   running it in a batch of its own; the others are skipped and stay where they were.
// - Memory: one deque per distinct priority present, a deadline heap, and two words per row of
//   the former's request table (rows identify requests in flight; `row_capacity` of them).

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <queue>
#include <span>
#include <vector>

#include "dynbatch/platform.hpp"

namespace dynbatch {

struct RequestDescriptor {
  std::uint64_t id;
  std::uint32_t row; // where its source pointers wait in the request table
  std::int32_t priority;
  Nanoseconds enqueue_ns;
  Nanoseconds deadline_ns; // no_deadline: none
  std::uint32_t length;    // rows of its padded leaves (0 without)
};

struct TakeLimits {
  std::size_t count = 0;
  std::size_t max_tokens = 0;    // 0: no budget
  std::size_t multiple = 1;      // the padded length is a multiple of this
  std::size_t bucket_window = 0; // 0 or 1: in order
  // Padded tokens a request may add to the batch; no_allowance: no limit. Applies with a
  // bucket window (the closest lengths are looked at first).
  static constexpr double no_allowance = -1.0;
  double padding_allowance = no_allowance;
};

class PendingRequests {
public:
  PendingRequests(std::size_t row_capacity, Nanoseconds aging_ns);

  void add(const RequestDescriptor &request);
  std::size_t size() const noexcept { return live_; }
  // The lengths of the waiting requests, summed (padded layouts: tokens before padding).
  std::size_t tokens() const noexcept { return tokens_; }
  bool empty() const noexcept { return live_ == 0; }

  // Appends up to `limits.count` requests to `out`, best effective priority at `now` first,
  // within the token budget and grouped by length (see the contract). Takes at least one.
  void take(const TakeLimits &limits, Nanoseconds now, std::vector<RequestDescriptor> &out);
  // Appends every request whose deadline is at or before `now` to `out` and forgets it.
  void expire(Nanoseconds now, std::vector<RequestDescriptor> &out);

  // The enqueue time of the longest-waiting request; no_deadline when empty.
  Nanoseconds oldest_enqueue_ns();
  // The earliest deadline of a waiting request; no_deadline when none has one.
  Nanoseconds earliest_deadline_ns();

private:
  struct LaterDeadline {
    bool operator()(const RequestDescriptor &a, const RequestDescriptor &b) const noexcept {
      return a.deadline_ns > b.deadline_ns;
    }
  };

  bool is_live(std::uint32_t row, std::uint64_t id) const noexcept {
    return live_id_[row] == id + 1;
  }
  void forget(std::uint32_t row) noexcept;
  // Removes and returns the best waiting request (the caller forgets it or puts it back).
  RequestDescriptor pop_best(Nanoseconds now);
  // Puts requests popped by pop_best back where they were; `popped` in pop order.
  void put_back(std::span<const RequestDescriptor> popped);
  // Drops requests that expired while queued behind others from the front of each level.
  void drop_dead_heads();

  const Nanoseconds aging_ns_;
  std::map<std::int32_t, std::deque<RequestDescriptor>, std::greater<>> levels_;
  std::priority_queue<RequestDescriptor, std::vector<RequestDescriptor>, LaterDeadline> deadlines_;
  // Per row: the id of its pending request + 1, or 0. Entries of requests that expired stay in
  // their level and the heap until they surface; this says they are gone.
  std::vector<std::uint64_t> live_id_;
  std::vector<std::uint32_t> live_length_; // per row: its pending request's length
  std::size_t live_ = 0;
  std::size_t tokens_ = 0;
  std::vector<RequestDescriptor> window_; // scratch for bucketing
};

} // namespace dynbatch
