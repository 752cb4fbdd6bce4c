#pragma once
// BatchFormer: turns a stream of requests into collated batches on its own thread.
//
// Contract
// - Producers (any thread) push requests: an id plus one source pointer per leaf. push() never
//   blocks; it returns PushResult::full when `capacity` requests are already in flight. The
//   sources must stay valid until the batch holding the request has been formed (the Python
//   layer keeps them alive until then).
// - A batch closes at the size the SizingPolicy asks for, when its first request has waited
//   `max_delay_ns`, or at the end of input (close_input()); it is collated into a staging slot and
//   queued for the consumer. The former thread keeps up to `prefetch_depth` batches formed ahead,
//   so the next batch is ready while the caller computes on the current one.
// - The consumer calls next_batch() (one thread at a time); it waits without spinning and
//   without the GIL. When nothing is ready but the input for a batch is, it forms the batch
//   itself instead of waiting for the former thread to be scheduled (a cross-thread wake-up
//   costs more than collating a small batch). Formation is serialised by one mutex, so batches
//   stay in input order whoever forms them.
// - report_feedback() feeds the caller's time on a batch back to the policy.
// - close() is idempotent: it stops and joins the thread and drops undelivered batches (their
//   slots return to the pool). The destructor calls it. An error inside the thread (e.g. no
//   memory for a slot) is rethrown by next_batch(), never lost.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "dynbatch/blocking_queue.hpp"
#include "dynbatch/collator.hpp"
#include "dynbatch/sizing_policy.hpp"
#include "dynbatch/staging_pool.hpp"
#include "dynbatch/stats.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct RequestDescriptor {
  std::uint64_t id;
  std::uint32_t row; // where its source pointers wait in the request table
  Nanoseconds enqueue_ns;
};

struct FormedBatch {
  std::uint64_t sequence = 0;
  std::vector<std::uint64_t> ids;
  std::size_t target = 0;
  std::shared_ptr<SlotLease> lease;
  Nanoseconds first_enqueue_ns = 0;
  Nanoseconds formed_ns = 0;
  Nanoseconds collate_ns = 0;
  std::uint64_t memory_available_bytes = 0;
};

struct FormerOptions {
  std::size_t capacity = 1024; // requests in flight; rounded up to a power of two
  std::size_t prefetch_depth = 1;
  // The longest the first request of a batch waits for the batch to fill: a short queue is
  // dispatched as it is after this, a long one fills the target at once. 0: wait for the
  // target (or the end of input).
  Nanoseconds max_delay_ns = 0;
};

enum class NextStatus { batch, finished, timeout };

class BatchFormer {
public:
  BatchFormer(BatchLayout layout, FormerOptions options, std::shared_ptr<StagingPool> pool,
              std::shared_ptr<SizingPolicy> policy, std::shared_ptr<TelemetrySampler> telemetry,
              std::shared_ptr<StatsRecorder> stats);
  ~BatchFormer();
  BatchFormer(const BatchFormer &) = delete;
  BatchFormer &operator=(const BatchFormer &) = delete;

  // `sources` holds leaf_count() pointers per request, request-major.
  // Returns how many of `ids` were accepted (a prefix); fewer when the table is full or closed.
  std::size_t push(std::span<const std::uint64_t> ids, std::span<const void *const> sources);
  void close_input();

  NextStatus next_batch(FormedBatch &out, Nanoseconds deadline_ns);
  // Fills in the bucket; `sequence` names the batch in the stats.
  void report_feedback(std::uint64_t sequence, BatchFeedback feedback);
  // Costs are learned per input shape; a former's layout is one shape.
  std::uint64_t bucket() const noexcept { return layout_->shape_key(); }
  std::size_t sample_bytes() const noexcept { return layout_->sample_bytes(); }
  void close();

  const std::shared_ptr<const BatchLayout> &layout() const noexcept { return layout_; }
  std::size_t capacity() const noexcept { return requests_.capacity(); }
  std::size_t queued() const noexcept { return requests_.was_size(); }

private:
  enum class FormResult { formed, needs_input, finished, skipped };

  void run();
  std::size_t target_size();
  // Caller holds form_mutex_. Never blocks: forms one batch if its input is there; otherwise
  // *wait_until says until when its pending requests may wait for more (no_deadline: none).
  FormResult form_one(bool keep_prefetch_bound, Nanoseconds *wait_until = nullptr);
  void form(std::span<const RequestDescriptor> requests, std::size_t target);

  const std::shared_ptr<const BatchLayout> layout_;
  const FormerOptions options_;
  const std::shared_ptr<StagingPool> pool_;
  const std::shared_ptr<SizingPolicy> policy_;
  const std::shared_ptr<TelemetrySampler> telemetry_;
  const std::shared_ptr<StatsRecorder> stats_;
  const Nanoseconds started_ns_;

  // Request table: one row of leaf pointers per request in flight, rows recycled via a ring.
  std::vector<const void *> rows_;
  MpmcRing<std::uint32_t> free_rows_;
  BlockingQueue<RequestDescriptor> requests_;

  std::mutex form_mutex_; // one batch formed at a time, by the thread or the consumer
  std::vector<RequestDescriptor> pending_; // popped, not yet formed; guarded by form_mutex_

  std::mutex ready_mutex_;
  std::condition_variable ready_changed_;
  std::deque<FormedBatch> ready_;
  bool finished_ = false; // input exhausted and every request formed
  bool stopping_ = false;
  std::exception_ptr error_;

  std::mutex close_mutex_;
  std::thread thread_;
};

} // namespace dynbatch
