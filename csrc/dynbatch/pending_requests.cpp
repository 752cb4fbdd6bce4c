#include "dynbatch/pending_requests.hpp"

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>

namespace dynbatch {

PendingRequests::PendingRequests(std::size_t row_capacity, Nanoseconds aging_ns)
    : aging_ns_(aging_ns), live_id_(row_capacity, 0), live_length_(row_capacity, 0) {
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
  live_length_[request.row] = request.length;
  ++live_;
  tokens_ += request.length;
  if (request.deadline_ns != no_deadline) {
    deadlines_.push(request);
  }
}

void PendingRequests::forget(std::uint32_t row) noexcept {
  live_id_[row] = 0;
  --live_;
  tokens_ -= live_length_[row];
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

RequestDescriptor PendingRequests::pop_best(Nanoseconds now) {
  // Aging makes the choice depend on each head's wait, so pick one at a time: a batch is small
  // and distinct priorities are few.
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
  const RequestDescriptor request = queue.front();
  queue.pop_front();
  while (!queue.empty() && !is_live(queue.front().row, queue.front().id)) {
    queue.pop_front();
  }
  if (queue.empty()) {
    levels_.erase(best);
  }
  return request;
}

void PendingRequests::put_back(std::span<const RequestDescriptor> popped) {
  for (auto request = popped.rbegin(); request != popped.rend(); ++request) {
    levels_[request->priority].push_front(*request);
  }
}

namespace {

std::size_t round_up(std::size_t length, std::size_t multiple) {
  return (length + multiple - 1) / multiple * multiple;
}

} // namespace

void PendingRequests::take(const TakeLimits &limits, Nanoseconds now,
                           std::vector<RequestDescriptor> &out) {
  drop_dead_heads();
  const std::size_t first = out.size();
  std::size_t longest = 0;
  // Whether one more request of `length` keeps the batch within the token budget.
  const auto fits = [&](std::uint32_t length) {
    const std::size_t taken = out.size() - first;
    if (limits.max_tokens == 0 || taken == 0) {
      return true;
    }
    return (taken + 1) * round_up(std::max<std::size_t>(longest, length), limits.multiple) <=
           limits.max_tokens;
  };
  const auto keep = [&](const RequestDescriptor &request) {
    out.push_back(request);
    forget(request.row);
    longest = std::max<std::size_t>(longest, request.length);
  };
  if (limits.bucket_window <= 1) {
    while (out.size() - first < limits.count && live_ > 0) {
      const RequestDescriptor request = pop_best(now);
      if (!fits(request.length)) {
        put_back(std::span(&request, 1));
        break;
      }
      keep(request);
    }
    return;
  }
  if (live_ == 0 || limits.count == 0) {
    return;
  }
  const RequestDescriptor head = pop_best(now);
  keep(head);
  window_.clear();
  while (window_.size() + 1 < limits.bucket_window && !levels_.empty()) {
    window_.push_back(pop_best(now));
  }
  // Closest to the head's length first; ties in their order.
  std::vector<std::size_t> order(window_.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    order[i] = i;
  }
  const auto distance = [&](std::size_t i) {
    const auto length = static_cast<std::int64_t>(window_[i].length);
    return length > head.length ? length - head.length : head.length - length;
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return distance(a) < distance(b); });
  // The padded tokens one more request of `length` adds beyond its own length.
  const auto padding_added = [&](std::uint32_t length) {
    const std::size_t taken = out.size() - first;
    const std::size_t now_padded = round_up(longest, limits.multiple);
    const std::size_t padded = round_up(std::max<std::size_t>(longest, length), limits.multiple);
    return static_cast<double>((taken + 1) * padded - taken * now_padded - length);
  };
  std::vector<bool> chosen(window_.size(), false);
  for (const std::size_t i : order) {
    if (out.size() - first >= limits.count || !fits(window_[i].length)) {
      break;
    }
    if (limits.padding_allowance >= 0.0 &&
        padding_added(window_[i].length) > limits.padding_allowance) {
      continue; // cheaper in a batch of its own: it waits for one of its length
    }
    keep(window_[i]);
    chosen[i] = true;
  }
  std::vector<RequestDescriptor> rest;
  for (std::size_t i = 0; i < window_.size(); ++i) {
    if (!chosen[i]) {
      rest.push_back(window_[i]);
    }
  }
  put_back(rest);
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
