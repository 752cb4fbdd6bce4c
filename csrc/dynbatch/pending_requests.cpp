#include "dynbatch/pending_requests.hpp"

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>

namespace dynbatch {

PendingRequests::PendingRequests(std::size_t row_capacity, Nanoseconds aging_ns)
    : aging_ns_(aging_ns), live_id_(row_capacity, 0) {
  if (aging_ns <= 0) {
    throw std::invalid_argument("PendingRequests: aging_ns must be positive");
  }
}

void PendingRequests::add(const RequestDescriptor &request) {
  if (request.row >= live_id_.size()) {
    throw std::out_of_range("PendingRequests: row " + std::to_string(request.row) +
                            " beyond the table");
  }
  levels_[request.priority].push_back(request);
  live_id_[request.row] = request.id + 1;
  ++live_;
  if (request.deadline_ns != no_deadline) {
    deadlines_.push(request);
  }
}

void PendingRequests::forget(std::uint32_t row) noexcept {
  live_id_[row] = 0;
  --live_;
}

void PendingRequests::drop_dead_heads() {
  for (auto level = levels_.begin(); level != levels_.end();) {
    auto &queue = level->second;
    while (!queue.empty() && !is_live(queue.front().row, queue.front().id)) {
      queue.pop_front();
    }
    level = queue.empty() ? levels_.erase(level) : std::next(level);
  }
}

void PendingRequests::take(std::size_t count, Nanoseconds now,
                           std::vector<RequestDescriptor> &out) {
  drop_dead_heads();
  // Aging makes the choice depend on each head's wait, so pick one at a time: a batch is small
  // and distinct priorities are few.
  for (std::size_t taken = 0; taken < count && live_ > 0; ++taken) {
    auto best = levels_.end();
    std::int64_t best_rank = 0;
    for (auto level = levels_.begin(); level != levels_.end(); ++level) {
      const RequestDescriptor &head = level->second.front();
      const std::int64_t rank = head.priority + (now - head.enqueue_ns) / aging_ns_;
      // Levels run from the largest priority down: a tie keeps the larger one, and within a
      // level the head is the oldest.
      if (best == levels_.end() || rank > best_rank) {
        best = level;
        best_rank = rank;
      }
    }
    auto &queue = best->second;
    out.push_back(queue.front());
    forget(queue.front().row);
    queue.pop_front();
    while (!queue.empty() && !is_live(queue.front().row, queue.front().id)) {
      queue.pop_front();
    }
    if (queue.empty()) {
      levels_.erase(best);
    }
  }
}

void PendingRequests::expire(Nanoseconds now, std::vector<RequestDescriptor> &out) {
  bool any = false;
  while (!deadlines_.empty() && deadlines_.top().deadline_ns <= now) {
    const RequestDescriptor request = deadlines_.top();
    deadlines_.pop();
    if (!is_live(request.row, request.id)) {
      continue; // taken into a batch before its deadline
    }
    // Its copy in its level stays until it surfaces; the row says it is gone.
    out.push_back(request);
    forget(request.row);
    any = true;
  }
  if (any) {
    drop_dead_heads();
  }
}

Nanoseconds PendingRequests::oldest_enqueue_ns() {
  drop_dead_heads();
  Nanoseconds oldest = no_deadline;
  for (const auto &[priority, queue] : levels_) {
    oldest = std::min(oldest, queue.front().enqueue_ns);
  }
  return oldest;
}

Nanoseconds PendingRequests::earliest_deadline_ns() {
  while (!deadlines_.empty() && !is_live(deadlines_.top().row, deadlines_.top().id)) {
    deadlines_.pop();
  }
  return deadlines_.empty() ? no_deadline : deadlines_.top().deadline_ns;
}

} // namespace dynbatch
