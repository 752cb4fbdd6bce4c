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
// - Memory: one deque per distinct priority present, a deadline heap, and two words per row of
//   the former's request table (rows identify requests in flight; `row_capacity` of them).

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <queue>
#include <vector>

#include "dynbatch/platform.hpp"

namespace dynbatch {

struct RequestDescriptor {
  std::uint64_t id;
  std::uint32_t row; // where its source pointers wait in the request table
  std::int32_t priority;
  Nanoseconds enqueue_ns;
  Nanoseconds deadline_ns; // no_deadline: none
};

class PendingRequests {
public:
  PendingRequests(std::size_t row_capacity, Nanoseconds aging_ns);

  void add(const RequestDescriptor &request);
  std::size_t size() const noexcept { return live_; }
  bool empty() const noexcept { return live_ == 0; }

  // Appends up to `count` requests to `out`, best effective priority at `now` first.
  void take(std::size_t count, Nanoseconds now, std::vector<RequestDescriptor> &out);
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
  // Drops requests that expired while queued behind others from the front of each level.
  void drop_dead_heads();

  const Nanoseconds aging_ns_;
  std::map<std::int32_t, std::deque<RequestDescriptor>, std::greater<>> levels_;
  std::priority_queue<RequestDescriptor, std::vector<RequestDescriptor>, LaterDeadline> deadlines_;
  // Per row: the id of its pending request + 1, or 0. Entries of requests that expired stay in
  // their level and the heap until they surface; this says they are gone.
  std::vector<std::uint64_t> live_id_;
  std::size_t live_ = 0;
};

} // namespace dynbatch
