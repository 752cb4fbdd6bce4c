#include "dynbatch/batch_former.hpp"

#include <bit>
#include <chrono>
#include <stdexcept>

namespace dynbatch {

BatchFormer::BatchFormer(BatchLayout layout, FormerOptions options,
                         std::shared_ptr<StagingPool> pool, std::shared_ptr<SizingPolicy> policy,
                         std::shared_ptr<TelemetrySampler> telemetry,
                         std::shared_ptr<StatsRecorder> stats)
    : layout_(std::make_shared<const BatchLayout>(std::move(layout))), options_(options),
      pool_(std::move(pool)), policy_(std::move(policy)), telemetry_(std::move(telemetry)),
      stats_(std::move(stats)), started_ns_(now_ns()),
      rows_(std::bit_ceil(std::max<std::size_t>(options.capacity, 1)) *
            std::max<std::size_t>(layout_->leaf_count(), 1)),
      free_rows_(std::bit_ceil(std::max<std::size_t>(options.capacity, 1))),
      requests_(std::bit_ceil(std::max<std::size_t>(options.capacity, 1))) {
  if (options.prefetch_depth < 1) {
    throw std::invalid_argument("BatchFormer: prefetch_depth must be at least 1");
  }
  for (std::uint32_t row = 0; row < free_rows_.capacity(); ++row) {
    free_rows_.try_push(row);
  }
  thread_ = std::thread([this] { run(); });
}

BatchFormer::~BatchFormer() {
  close();
}

std::size_t BatchFormer::push(std::span<const std::uint64_t> ids,
                              std::span<const void *const> sources) {
  const std::size_t leaves = layout_->leaf_count();
  if (sources.size() != ids.size() * leaves) {
    throw std::invalid_argument("BatchFormer::push: expected " +
                                std::to_string(ids.size() * leaves) + " source pointers, got " +
                                std::to_string(sources.size()));
  }
  const Nanoseconds now = now_ns();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    std::uint32_t row = 0;
    if (requests_.closed() || !free_rows_.try_pop(row)) {
      return i;
    }
    for (std::size_t j = 0; j < leaves; ++j) {
      rows_[row * leaves + j] = sources[i * leaves + j];
    }
    // Every request holds a row and the queue has as many slots as rows: this cannot be full.
    if (requests_.try_push(RequestDescriptor{ids[i], row, now}) != PushResult::ok) {
      free_rows_.try_push(row);
      return i;
    }
  }
  return ids.size();
}

void BatchFormer::close_input() {
  requests_.close();
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
      {
        std::lock_guard form_lock(form_mutex_);
        const FormResult result = form_one(true, &wait_until);
        if (result == FormResult::finished) {
          return;
        }
        if (result != FormResult::needs_input) {
          continue;
        }
        const std::size_t target = target_size();
        // With a delay, the first request's arrival starts its clock: wait for one at first.
        missing = options_.max_delay_ns > 0 && pending_.empty()
                      ? 1
                      : target - std::min(target, pending_.size());
      }
      requests_.wait_for_size(std::max<std::size_t>(missing, 1), wait_until);
    }
  } catch (...) {
    std::lock_guard lock(ready_mutex_);
    error_ = std::current_exception();
    ready_changed_.notify_all();
  }
}

std::size_t BatchFormer::target_size() {
  SizingInputs inputs;
  inputs.bucket = bucket();
  inputs.queued = requests_.was_size();
  inputs.bytes_per_sample = layout_->sample_bytes();
  inputs.telemetry = telemetry_->latest();
  return std::max<std::size_t>(policy_->next_batch_size(inputs), 1);
}

BatchFormer::FormResult BatchFormer::form_one(bool keep_prefetch_bound, Nanoseconds *wait_until) {
  {
    std::lock_guard lock(ready_mutex_);
    if (stopping_ || finished_ || error_) {
      return FormResult::skipped;
    }
    if (keep_prefetch_bound ? ready_.size() >= options_.prefetch_depth : !ready_.empty()) {
      return FormResult::skipped;
    }
  }
  const std::size_t target = target_size();
  if (pending_.size() < target) { // only this holder of form_mutex_ pops
    const std::size_t had = pending_.size();
    pending_.resize(target);
    pending_.resize(had + requests_.try_pop_bulk(pending_.data() + had, target - had));
  }
  const bool closed = requests_.closed();
  if (pending_.empty()) {
    if (!closed || requests_.was_size() != 0) {
      return FormResult::needs_input;
    }
    std::lock_guard lock(ready_mutex_); // closed and drained: the end of input
    finished_ = true;
    ready_changed_.notify_all();
    return FormResult::finished;
  }
  const Nanoseconds deadline =
      options_.max_delay_ns > 0 ? pending_.front().enqueue_ns + options_.max_delay_ns : no_deadline;
  if (pending_.size() < target && !closed && now_ns() < deadline) {
    if (wait_until != nullptr) {
      *wait_until = deadline;
    }
    // What the former thread waits for has changed if someone else took requests aside.
    requests_.wake_consumers();
    return FormResult::needs_input;
  }
  const std::size_t count = std::min(target, pending_.size());
  form(std::span(pending_.data(), count), target);
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(count));
  return FormResult::formed;
}

void BatchFormer::form(std::span<const RequestDescriptor> requests, std::size_t target) {
  const std::size_t count = requests.size();
  const std::size_t leaves = layout_->leaf_count();
  FormedBatch batch;
  batch.target = target;
  batch.first_enqueue_ns = requests.front().enqueue_ns;
  batch.ids.reserve(count);
  std::vector<const void *> sources(count * leaves);
  for (std::size_t i = 0; i < count; ++i) {
    batch.ids.push_back(requests[i].id);
    for (std::size_t j = 0; j < leaves; ++j) {
      sources[i * leaves + j] = rows_[requests[i].row * leaves + j];
    }
  }
  const Nanoseconds start = now_ns();
  batch.lease = pool_->acquire(layout_->batch_bytes(count));
  collate(*layout_, sources, count, batch.lease->data());
  batch.formed_ns = now_ns();
  batch.collate_ns = batch.formed_ns - start;
  batch.memory_available_bytes = telemetry_->latest().memory_available_bytes;
  batch.sequence = stats_->next_sequence();
  for (const RequestDescriptor &request : requests) {
    free_rows_.try_push(request.row); // cannot fail: rows never outnumber the ring
  }
  std::lock_guard lock(ready_mutex_);
  ready_.push_back(std::move(batch));
  ready_changed_.notify_all();
}

NextStatus BatchFormer::next_batch(FormedBatch &out, Nanoseconds deadline_ns) {
  const auto can_return = [&] {
    return !ready_.empty() || finished_ || stopping_ || error_ != nullptr;
  };
  for (bool helped = false;; helped = true) {
    {
      std::unique_lock lock(ready_mutex_);
      if (!ready_.empty()) {
        out = std::move(ready_.front());
        ready_.pop_front();
        ready_changed_.notify_all();
        break;
      }
      if (error_) {
        std::rethrow_exception(error_);
      }
      if (finished_ || stopping_) {
        return NextStatus::finished;
      }
    }
    if (!helped && form_mutex_.try_lock()) {
      std::lock_guard form_lock(form_mutex_, std::adopt_lock);
      FormResult result = FormResult::skipped;
      try {
        result = form_one(false);
      } catch (...) { // sticky, as when the thread fails: the stream cannot go on in order
        std::lock_guard lock(ready_mutex_);
        error_ = std::current_exception();
        ready_changed_.notify_all();
        throw;
      }
      if (result == FormResult::formed || result == FormResult::finished) {
        continue;
      }
    }
    std::unique_lock lock(ready_mutex_);
    if (deadline_ns == no_deadline) {
      ready_changed_.wait(lock, can_return);
    } else {
      const auto deadline = std::chrono::steady_clock::time_point(
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::nanoseconds(deadline_ns)));
      if (!ready_changed_.wait_until(lock, deadline, can_return)) {
        return NextStatus::timeout;
      }
    }
  }
  BatchRecord record;
  record.sequence = out.sequence;
  record.batch_size = out.ids.size();
  record.target = out.target;
  record.first_enqueue_ns = out.first_enqueue_ns;
  record.formed_ns = out.formed_ns;
  record.delivered_ns = now_ns();
  record.collate_ns = out.collate_ns;
  record.memory_available_bytes = out.memory_available_bytes;
  stats_->record_batch(record);
  return NextStatus::batch;
}

void BatchFormer::report_feedback(std::uint64_t sequence, BatchFeedback feedback) {
  feedback.bucket = bucket();
  policy_->on_feedback(feedback);
  stats_->record_compute(sequence, feedback.compute_ns);
}

void BatchFormer::close() {
  std::lock_guard close_lock(close_mutex_);
  if (!thread_.joinable()) {
    return;
  }
  {
    std::lock_guard lock(ready_mutex_);
    stopping_ = true;
    ready_changed_.notify_all();
  }
  requests_.close();
  thread_.join();
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
