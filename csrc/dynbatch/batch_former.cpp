#include "dynbatch/batch_former.hpp"

#include <algorithm>
#include <bit>
#include <chrono>
#include <stdexcept>

namespace dynbatch {

namespace {

Nanoseconds saturating_add(Nanoseconds a, Nanoseconds b) noexcept {
  return b >= no_deadline - a ? no_deadline : a + b;
}

std::size_t table_size(std::size_t capacity) {
  return std::bit_ceil(std::max<std::size_t>(capacity, 1));
}

} // namespace

BatchFormer::BatchFormer(BatchLayout layout, FormerOptions options,
                         std::shared_ptr<StagingPool> pool, std::shared_ptr<SizingPolicy> policy,
                         std::shared_ptr<TelemetrySampler> telemetry,
                         std::shared_ptr<StatsRecorder> stats)
    : layout_(std::make_shared<const BatchLayout>(std::move(layout))), options_(options),
      pool_(std::move(pool)), policy_(std::move(policy)), telemetry_(std::move(telemetry)),
      stats_(std::move(stats)), started_ns_(now_ns()),
      rows_(table_size(options.capacity) * std::max<std::size_t>(layout_->leaf_count(), 1)),
      row_lengths_(table_size(options.capacity), 0), free_rows_(table_size(options.capacity)),
      requests_(table_size(options.capacity)),
      pending_(table_size(options.capacity), options.aging_ns) {
  if (options.prefetch_depth < 1) {
    throw std::invalid_argument("BatchFormer: prefetch_depth must be at least 1");
  }
  if (telemetry_->forked()) {
    throw ForkedError("the telemetry of this batch former");
  }
  if (pool_->forked()) {
    throw ForkedError("the staging pool of this batch former");
  }
  if (options.capacity < 1 || options.max_delay_ns < 0 || options.pad_to_multiple_of < 1) {
    throw std::invalid_argument(
        "BatchFormer: capacity and pad_to_multiple_of must be positive, max_delay_ns >= 0");
  }
  for (std::uint32_t row = 0; row < free_rows_.capacity(); ++row) {
    free_rows_.try_push(row);
  }
  if (options.own_thread) {
    thread_ = std::thread([this] { run(); });
  }
}

BatchFormer::~BatchFormer() {
  close();
}

std::size_t BatchFormer::push(std::span<const std::uint64_t> ids,
                              std::span<const void *const> sources,
                              std::span<const RequestOptions> options) {
  const std::size_t leaves = options_.collate ? layout_->leaf_count() : 0;
  if (sources.size() != ids.size() * leaves) {
    throw std::invalid_argument("BatchFormer::push: expected " +
                                std::to_string(ids.size() * leaves) + " source pointers, got " +
                                std::to_string(sources.size()));
  }
  if (!options.empty() && options.size() != ids.size()) {
    throw std::invalid_argument("BatchFormer::push: expected one RequestOptions per request");
  }
  const Nanoseconds now = now_ns();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    // Admission first: `capacity` is exact even though the table is a power of two.
    if (waiting_.fetch_add(1, std::memory_order_relaxed) >= options_.capacity) { // counter only
      waiting_.fetch_sub(1, std::memory_order_relaxed);
      return i;
    }
    std::uint32_t row = 0;
    if (requests_.closed() || !free_rows_.try_pop(row)) {
      waiting_.fetch_sub(1, std::memory_order_relaxed);
      return i;
    }
    for (std::size_t j = 0; j < leaves; ++j) {
      rows_[row * leaves + j] = sources[i * leaves + j];
    }
    const RequestOptions request = options.empty() ? RequestOptions{} : options[i];
    row_lengths_[row] = request.length;
    for (std::uint32_t longest = longest_.load(std::memory_order_relaxed);
         request.length > longest &&
         !longest_.compare_exchange_weak(longest, request.length, std::memory_order_relaxed);) {
      // a statistic for sizing only: relaxed
    }
    const Nanoseconds deadline =
        request.timeout_ns == no_deadline
            ? no_deadline
            : saturating_add(now, std::max<Nanoseconds>(request.timeout_ns, 0));
    // Every request holds a row and the queue has as many slots as rows: this cannot be full.
    if (requests_.try_push(RequestDescriptor{ids[i], row, request.priority, now, deadline,
                                             request.length}) != PushResult::ok) {
      free_rows_.try_push(row);
      waiting_.fetch_sub(1, std::memory_order_relaxed);
      return i;
    }
    if (deadline != no_deadline) {
      // The former thread may sleep past this deadline: it re-plans when this count moves.
      deadlines_pushed_.fetch_add(1, std::memory_order_release); // pairs with acquire in run()
      requests_.wake_consumers();
      // Dekker with wait_late(): either its gathering sees this request, or this load sees
      // its planning value (the minimum, or a plan made after the fence) and wakes it.
      std::atomic_thread_fence(std::memory_order_seq_cst); // pairs with the fence in wait_late
      if (deadline < watch_until_.load(std::memory_order_relaxed)) { // ordered by the fences
        deadline_watch_.notify();
      }
    }
  }
  return ids.size();
}

bool BatchFormer::wait_for_room(Nanoseconds deadline_ns) {
  if (stamp_.forked()) {
    throw ForkedError("this batch former");
  }
  for (;;) {
    const EventCount::Key key = room_.prepare_wait();
    if (requests_.closed()) {
      room_.cancel_wait();
      return false;
    }
    if (waiting_.load(std::memory_order_relaxed) < options_.capacity) {
      room_.cancel_wait();
      return true;
    }
    if (!room_.wait_until(key, deadline_ns)) {
      return waiting_.load(std::memory_order_relaxed) < options_.capacity;
    }
  }
}

void BatchFormer::close_input() {
  if (stamp_.forked()) {
    return; // waking the parent's waiters could block on their condition variables
  }
  requests_.close();
  room_.notify();
}

void BatchFormer::release_rows(std::span<const RequestDescriptor> requests) {
  for (const RequestDescriptor &request : requests) {
    free_rows_.try_push(request.row); // cannot fail: rows never outnumber the ring
  }
  waiting_.fetch_sub(requests.size(), std::memory_order_relaxed);
  room_.notify();
}

void BatchFormer::gather_pending(Nanoseconds now) {
  // In slices: a full-capacity scratch buffer per call would cost more than the requests.
  constexpr std::size_t slice = 256;
  for (;;) {
    popped_.resize(slice);
    const std::size_t count = requests_.try_pop_bulk(popped_.data(), slice);
    for (std::size_t i = 0; i < count; ++i) {
      pending_.add(popped_[i]);
    }
    if (count < slice) {
      break;
    }
  }
  popped_.clear();
  pending_.expire(now, popped_);
  if (popped_.empty()) {
    return;
  }
  release_rows(popped_);
  stats_->record_outcomes(popped_, RequestOutcome::timed_out);
  const Nanoseconds slack = dispatch_delay_.slack();
  std::lock_guard lock(ready_mutex_);
  for (const RequestDescriptor &request : popped_) {
    expired_.push_back(request.id);
    expired_due_ns_ = std::max(expired_due_ns_, request.deadline_ns - slack);
  }
  ready_changed_.notify_all();
}

void BatchFormer::run() {
  try {
    for (;;) {
      {
        std::unique_lock lock(ready_mutex_);
        ready_changed_.wait(lock, [&] {
          return stopping_ || finished_ || error_ || ready_.size() < options_.prefetch_depth;
        });
        if (stopping_ || finished_ || error_) { // an error on the consumer's side ends it too
          return;
        }
      }
      Nanoseconds wait_until = no_deadline;
      std::size_t missing = 0;
      std::uint64_t taken_aside = 0;
      std::uint64_t deadlines_pushed = 0;
      {
        std::lock_guard form_lock(form_mutex_);
        taken_aside = taken_aside_.load(std::memory_order_acquire); // pairs with release above
        deadlines_pushed = deadlines_pushed_.load(std::memory_order_acquire); // pairs: push()
        const FormResult result = form_one(true, &wait_until);
        if (result == FormResult::finished) {
          return;
        }
        if (result != FormResult::needs_input) {
          continue;
        }
        // With a delay, the first request's arrival starts its clock: wait for one at first.
        missing = options_.max_delay_ns != no_deadline && pending_.empty()
                      ? 1
                      : this->missing(target_size());
      }
      requests_.wait_for_size_or(std::max<std::size_t>(missing, 1), wait_until, [&] {
        // A new deadline may come before wait_until; moved requests change what is missing.
        return taken_aside_.load(std::memory_order_acquire) != taken_aside || // pairs: release
               deadlines_pushed_.load(std::memory_order_acquire) != deadlines_pushed;
      });
    }
  } catch (...) {
    std::lock_guard lock(ready_mutex_);
    error_ = std::current_exception();
    ready_changed_.notify_all();
  }
}

BatchFormer::Target BatchFormer::target_size() {
  SizingInputs inputs;
  inputs.bucket = bucket();
  inputs.queued = requests_.was_size();
  const std::size_t longest = longest_.load(std::memory_order_relaxed);
  inputs.bytes_per_sample = layout_->sample_bytes(longest);
  if (layout_->has_padded_leaves()) {
    const std::size_t multiple = options_.pad_to_multiple_of;
    inputs.longest = (longest + multiple - 1) / multiple * multiple;
  }
  inputs.telemetry = telemetry_->latest();
  Target target{std::max<std::size_t>(policy_->next_batch_size(inputs), 1), 0};
  if (layout_->has_padded_leaves()) {
    const std::size_t budget = policy_->token_budget(inputs);
    target.tokens = budget == 0                ? options_.max_tokens
                    : options_.max_tokens == 0 ? budget
                                               : std::min(budget, options_.max_tokens);
  } else {
    target.tokens = options_.max_tokens;
  }
  return target;
}

bool BatchFormer::full(const Target &target) {
  if (options_.bucket_window > 1) {
    // The window decides which requests go together: form only from all of it.
    return pending_.size() >=
           std::max(options_.bucket_window, target.tokens == 0 ? target.count : std::size_t{1});
  }
  return pending_.size() >= target.count ||
         (target.tokens > 0 && pending_.tokens() >= target.tokens);
}

std::size_t BatchFormer::missing(const Target &target) {
  if (options_.bucket_window > 1) {
    const std::size_t due =
        std::max(options_.bucket_window, target.tokens == 0 ? target.count : std::size_t{1});
    return std::max<std::size_t>(due - std::min(due, pending_.size()), 1);
  }
  if (target.tokens > 0) {
    return 1; // how many more fill the budget depends on their lengths: look at each
  }
  return std::max<std::size_t>(target.count - std::min(target.count, pending_.size()), 1);
}

BatchFormer::FormResult BatchFormer::form_one(bool ahead, Nanoseconds *wait_until) {
  {
    std::lock_guard lock(ready_mutex_);
    if (stopping_ || finished_ || error_) {
      return FormResult::skipped;
    }
    if (ahead ? ready_.size() >= options_.prefetch_depth : !ready_.empty()) {
      return FormResult::skipped;
    }
  }
  const Nanoseconds now = now_ns();
  // Closed before the gathering: then every request that made it in is gathered below.
  const bool closed = requests_.closed();
  gather_pending(now);
  const Target target = target_size();
  if (pending_.empty()) {
    if (!closed || requests_.was_size() != 0) {
      return FormResult::needs_input;
    }
    std::lock_guard lock(ready_mutex_); // closed and drained: the end of input
    finished_ = true;
    ready_changed_.notify_all();
    return FormResult::finished;
  }
  ReleaseReason reason = ReleaseReason::full;
  Nanoseconds due = 0; // a partial batch: when it became due; 0: when it is formed
  if (!full(target)) {
    const Nanoseconds delay_at =
        saturating_add(pending_.oldest_enqueue_ns(), options_.max_delay_ns);
    const Nanoseconds deadline = pending_.earliest_deadline_ns();
    // Released early enough to be dispatched in time rather than found late (DispatchDelay).
    const Nanoseconds deadline_at =
        deadline == no_deadline ? no_deadline : deadline - dispatch_delay_.slack();
    if (closed) {
      reason = ReleaseReason::drain;
    } else if (now < std::min(delay_at, deadline_at)) {
      if (wait_until != nullptr) {
        *wait_until = std::min(delay_at, deadline_at);
      }
      // What the former thread waits for has changed if someone else took requests aside.
      requests_.wake_consumers();
      return FormResult::needs_input;
    } else if (ahead) {
      // A partial batch is formed when the consumer asks for it, so that it keeps growing
      // while the consumer is busy: wake a waiting consumer, and wake again only for input
      // or for the next deadline to expire.
      if (wait_until != nullptr) {
        *wait_until = deadline;
      }
      std::lock_guard lock(ready_mutex_);
      partial_due_ = true; // the consumer sees it even if it is not waiting yet
      ready_changed_.notify_all();
      return FormResult::needs_input;
    } else {
      reason = now >= delay_at ? ReleaseReason::max_delay : ReleaseReason::deadline;
      due = std::min(delay_at, deadline_at);
    }
  }
  taken_.clear();
  TakeLimits limits{std::min(target.count, pending_.size()), target.tokens,
                    options_.pad_to_multiple_of, options_.bucket_window};
  if (options_.group_queued && options_.bucket_window <= 1 && layout_->has_padded_leaves()) {
    limits.bucket_window = pending_.size();
    limits.padding_allowance = policy_->padding_allowance();
  }
  pending_.take(limits, now, taken_);
  form(taken_, target.count, reason, due);
  return FormResult::formed;
}

void BatchFormer::form(std::span<const RequestDescriptor> requests, std::size_t target,
                       ReleaseReason reason, Nanoseconds due_ns) {
  const std::size_t count = requests.size();
  const std::size_t leaves = options_.collate ? layout_->leaf_count() : 0;
  FormedBatch batch;
  batch.target = target;
  batch.reason = reason;
  batch.first_enqueue_ns =
      std::min_element(requests.begin(), requests.end(), [](const auto &a, const auto &b) {
        return a.enqueue_ns < b.enqueue_ns;
      })->enqueue_ns;
  batch.ids.reserve(count);
  std::vector<const void *> sources(count * leaves);
  if (std::any_of(requests.begin(), requests.end(),
                  [](const RequestDescriptor &r) { return r.deadline_ns != no_deadline; })) {
    batch.deadlines.reserve(count);
    for (const RequestDescriptor &request : requests) {
      batch.deadlines.push_back(request.deadline_ns);
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    batch.ids.push_back(requests[i].id);
    for (std::size_t j = 0; j < leaves; ++j) {
      sources[i * leaves + j] = rows_[requests[i].row * leaves + j];
    }
  }
  if (layout_->has_padded_leaves()) {
    batch.lengths.reserve(count);
    std::size_t longest = 0;
    for (const RequestDescriptor &request : requests) {
      batch.lengths.push_back(row_lengths_[request.row]);
      longest = std::max<std::size_t>(longest, row_lengths_[request.row]);
    }
    const std::size_t multiple = options_.pad_to_multiple_of;
    batch.padded_length = (longest + multiple - 1) / multiple * multiple;
  }
  const Nanoseconds start = now_ns();
  stats_->record_dispatch(requests, start);
  if (options_.collate) {
    batch.lease = pool_->acquire(layout_->batch_bytes(count, batch.padded_length));
    collate(*layout_, sources, count, batch.lease->data(), batch.lengths, batch.padded_length,
            &CopyWorkers::shared());
  }
  batch.formed_ns = now_ns();
  batch.collate_ns = batch.formed_ns - start;
  batch.released_ns = due_ns != 0 ? due_ns : batch.formed_ns; // see FormedBatch::released_ns
  batch.memory_available_bytes = telemetry_->latest().memory_available_bytes;
  batch.sequence = stats_->next_sequence();
  if (layout_->has_padded_leaves()) {
    constexpr std::size_t remembered = 64; // batches in flight are far fewer
    std::lock_guard lock(padded_mutex_);
    padded_lengths_.emplace_back(batch.sequence, batch.padded_length);
    if (padded_lengths_.size() > remembered) {
      padded_lengths_.pop_front();
    }
  }
  release_rows(requests);
  std::lock_guard lock(ready_mutex_);
  ready_.push_back(std::move(batch));
  ready_changed_.notify_all();
}

NextStatus BatchFormer::next_batch(FormedBatch &out, Nanoseconds deadline_ns) {
  if (stamp_.forked()) {
    throw ForkedError("this batch former");
  }
  const auto can_return = [&] {
    return !ready_.empty() || !expired_.empty() || finished_ || stopping_ || error_ != nullptr;
  };
  if (asked_ns_ < 0) {
    asked_ns_ = now_ns(); // kept across calls until a delivery: see FormedBatch::released_ns
  }
  for (;;) {
    {
      std::unique_lock lock(ready_mutex_);
      if (!ready_.empty()) {
        out = std::move(ready_.front());
        ready_.pop_front();
        hand_over_expired(out);
        ready_changed_.notify_all();
        break;
      }
      if (!expired_.empty()) {
        out = FormedBatch{};
        hand_over_expired(out);
        return NextStatus::expired;
      }
      if (error_) {
        std::rethrow_exception(error_);
      }
      if (finished_ || stopping_) {
        return NextStatus::finished;
      }
    }
    bool due = false;
    {
      std::lock_guard lock(ready_mutex_);
      due = partial_due_;
    }
    Nanoseconds release_at = no_deadline; // when a partial batch is due
    // A due partial batch is this consumer's to form: wait for the thread's formation to end.
    std::unique_lock form_lock(form_mutex_, std::defer_lock);
    if (due) {
      form_lock.lock();
    } else {
      (void)form_lock.try_lock();
    }
    if (form_lock.owns_lock()) {
      FormResult result = FormResult::skipped;
      try {
        {
          std::lock_guard lock(ready_mutex_);
          partial_due_ = false; // looked at now
        }
        result = form_one(false, &release_at);
        // What the former thread waits for (queued and pending requests) may have moved.
        taken_aside_.fetch_add(1, std::memory_order_release); // pairs with acquire in run()
        requests_.wake_consumers();
      } catch (...) { // sticky, as when the thread fails: the stream cannot go on in order
        std::lock_guard lock(ready_mutex_);
        error_ = std::current_exception();
        ready_changed_.notify_all();
        throw;
      }
      form_lock.unlock();
      if (result == FormResult::formed || result == FormResult::finished) {
        continue;
      }
      if (!options_.own_thread && result == FormResult::needs_input) {
        // Nobody else forms or pushes for this consumer: waiting would never end.
        throw std::logic_error("BatchFormer without a thread: next_batch() needs a batch's "
                               "worth of requests pushed, or the input closed");
      }
    }
    std::unique_lock lock(ready_mutex_);
    if (can_return() || partial_due_) {
      continue;
    }
    const Nanoseconds wake_at = std::min(deadline_ns, release_at);
    if (wake_at == no_deadline) {
      ready_changed_.wait(lock); // then look again: a partial batch may be due
      continue;
    }
    ready_changed_.wait_until(lock,
                              std::chrono::steady_clock::time_point(
                                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                      std::chrono::nanoseconds(wake_at))));
    if (now_ns() >= deadline_ns && !can_return() && !partial_due_) {
      return NextStatus::timeout;
    }
  }
  out.released_ns = std::max(out.released_ns, asked_ns_);
  asked_ns_ = -1;
  record_delivery(out);
  return NextStatus::batch;
}

NextStatus BatchFormer::try_next_batch(FormedBatch &out) {
  if (stamp_.forked()) {
    throw ForkedError("this batch former");
  }
  {
    std::lock_guard lock(ready_mutex_);
    if (!ready_.empty()) {
      out = std::move(ready_.front());
      ready_.pop_front();
      hand_over_expired(out);
      out.released_ns = std::max(out.released_ns, asked_ns_ < 0 ? now_ns() : asked_ns_);
      asked_ns_ = -1;
      ready_changed_.notify_all();
    } else if (!expired_.empty()) {
      out = FormedBatch{};
      hand_over_expired(out);
      return NextStatus::expired;
    } else {
      return NextStatus::timeout;
    }
  }
  record_delivery(out);
  return NextStatus::batch;
}

void BatchFormer::hand_over_expired(FormedBatch &out) {
  out.expired_ids.swap(expired_);
  // They expired while the consumer was asking for them: released too late by at least the
  // time since they were due (when every request expires, the only delay there is to learn).
  if (expired_due_ns_ >= 0 && asked_ns_ >= 0 && asked_ns_ <= expired_due_ns_) {
    dispatch_delay_.record(now_ns() - expired_due_ns_);
  }
  expired_due_ns_ = -1;
}

void BatchFormer::record_delivery(const FormedBatch &batch) {
  BatchRecord record;
  record.sequence = batch.sequence;
  record.batch_size = batch.ids.size();
  record.target = batch.target;
  record.first_enqueue_ns = batch.first_enqueue_ns;
  record.formed_ns = batch.formed_ns;
  record.delivered_ns = now_ns();
  record.collate_ns = batch.collate_ns;
  record.memory_available_bytes = batch.memory_available_bytes;
  record.reason = batch.reason;
  for (const std::uint32_t length : batch.lengths) {
    record.real_rows += length;
  }
  record.padded_rows = batch.lengths.size() * batch.padded_length;
  stats_->record_batch(record);
}

NextStatus BatchFormer::wait_late(std::vector<std::uint64_t> &expired,
                                  std::vector<std::uint64_t> &late, Nanoseconds deadline_ns) {
  if (stamp_.forked()) {
    throw ForkedError("this batch former");
  }
  for (;;) {
    {
      std::lock_guard lock(ready_mutex_);
      if (stopping_ || error_) {
        return NextStatus::finished;
      }
    }
    // Planning: until the plan is stored, every push with a deadline wakes this wait.
    watch_until_.store(std::numeric_limits<Nanoseconds>::min(), std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst); // pairs with the fence in push()
    const EventCount::Key key = deadline_watch_.prepare_wait();
    const Nanoseconds now = now_ns();
    Nanoseconds next = no_deadline;
    {
      std::lock_guard form_lock(form_mutex_);
      gather_pending(now); // expires the late into expired_
      next = pending_.earliest_deadline_ns();
    }
    {
      std::lock_guard lock(ready_mutex_);
      if (stopping_ || error_) { // checked again: close() may have signalled before the key
        deadline_watch_.cancel_wait();
        return NextStatus::finished;
      }
      expired.insert(expired.end(), expired_.begin(), expired_.end());
      expired_.clear();
      for (FormedBatch &batch : ready_) {
        for (std::size_t i = 0; i < batch.deadlines.size(); ++i) {
          if (batch.deadlines[i] <= now) {
            late.push_back(batch.ids[i]);
            batch.deadlines[i] = no_deadline; // reported once
          } else {
            next = std::min(next, batch.deadlines[i]);
          }
        }
      }
    }
    if (!expired.empty() || !late.empty()) {
      deadline_watch_.cancel_wait();
      return NextStatus::batch;
    }
    if (now >= deadline_ns) {
      deadline_watch_.cancel_wait();
      return NextStatus::timeout;
    }
    const Nanoseconds wake_at = std::min(next, deadline_ns);
    watch_until_.store(wake_at, std::memory_order_relaxed); // read by push after its fence
    std::atomic_thread_fence(std::memory_order_seq_cst);    // pairs with the fence in push()
    deadline_watch_.wait_until(key, wake_at);
  }
}

void BatchFormer::report_feedback(std::uint64_t sequence, BatchFeedback feedback) {
  feedback.bucket = bucket();
  if (layout_->has_padded_leaves() && feedback.tokens == 0) {
    std::lock_guard lock(padded_mutex_);
    for (const auto &[batch, padded_length] : padded_lengths_) {
      if (batch == sequence) { // a part of a split batch keeps the batch's padded length
        feedback.tokens = feedback.batch_size * padded_length;
        break;
      }
    }
  }
  policy_->on_feedback(feedback);
  stats_->record_compute(sequence, feedback.compute_ns);
}

void BatchFormer::report_dispatch(Nanoseconds released_ns) {
  dispatch_delay_.record(now_ns() - released_ns);
}

std::size_t BatchFormer::backlog() {
  std::size_t formed = 0;
  {
    std::lock_guard lock(ready_mutex_);
    for (const FormedBatch &batch : ready_) {
      formed += batch.ids.size();
    }
  }
  return queued() + formed;
}

void BatchFormer::close() {
  if (stamp_.forked()) {
    return; // the parent's thread and locks: never touched here
  }
  std::lock_guard close_lock(close_mutex_);
  if (closed_) {
    return;
  }
  closed_ = true;
  {
    std::lock_guard lock(ready_mutex_);
    stopping_ = true;
    ready_changed_.notify_all();
  }
  requests_.close();
  room_.notify();
  deadline_watch_.notify();
  if (thread_.joinable()) {
    thread_.join();
  }
  // A consumer may be forming a batch on its own thread: its sources must stay alive until
  // it is done, so close() returns only after that formation.
  std::lock_guard form_lock(form_mutex_);
  stats_->add_active_time(now_ns() - started_ns_);
  std::deque<FormedBatch> undelivered;
  {
    std::lock_guard lock(ready_mutex_);
    undelivered.swap(ready_);
  }
}

} // namespace dynbatch
