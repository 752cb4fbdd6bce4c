#pragma once
// BatchFormer: turns a stream of requests into collated batches on its own thread.
//
// Contract
// - Producers (any thread) push requests: an id, a priority, an optional timeout and one source
//   pointer per leaf. push() never blocks; it accepts a prefix and stops when `max_queued`
//   requests wait to be formed (wait_for_room() sleeps until one leaves). The sources must stay
//   valid until the request was formed into a batch or reported expired.
// - Requests leave by priority with aging (PendingRequests). A batch is released when it
//   reaches the size the SizingPolicy asks for (full), when its oldest request has waited
//   `max_delay_ns` (max_delay), before a waiting request's deadline by the measured time a
//   batch takes from release to dispatch (deadline; see report_dispatch()), or at
//   the end of input (drain); it is collated into a staging slot and queued for the consumer.
//   The former thread keeps up to `prefetch_depth` batches formed ahead.
// - A request whose timeout passes before it is formed is never formed: its id comes back
//   through next_batch()'s `expired_ids` (exactly once), and its row is free again.
// - The consumer calls next_batch() (one thread at a time); it waits without spinning and
//   without the GIL. When nothing is ready but a batch may be released, it forms the batch
//   itself instead of waiting for the former thread to be scheduled (a cross-thread wake-up
//   costs more than collating a small batch). Formation is serialised by one mutex.
// - With a bucket window (length grouping), a batch is released as full only once the whole
//   window waits (or at max_delay, a deadline or the end of input), so which requests are
//   grouped is a function of the input, not of how far the producer had got.
// - Padded layouts: the policy's token budget (SizingPolicy::token_budget, within the hard
//   `max_tokens`) caps a batch's padded size, and report_feedback() tells the policy the
//   batch's padded tokens.
// - The former thread forms full batches (and the last ones of a closed input) ahead of the
//   consumer; a partial batch (max_delay, deadline) is formed only when the consumer asks, so
//   requests arriving while the consumer is busy still join it.
// - report_feedback() feeds the caller's time on a batch back to the policy. report_dispatch()
//   tells when a batch was dispatched (claimed: its requests can no longer expire); the time
//   since its `released_ns` is the delay a deadline release allows for (DispatchDelay), as is
//   the time since a request was due for release, when it expired while the consumer asked.
// - wait_late() (one thread at a time, for a consumer busy with a batch) sleeps until a request
//   that has not reached the consumer passes its deadline: it reports the requests that expired
//   while waiting to be formed (exactly once, shared with next_batch's expired_ids) and those
//   in a formed batch not yet delivered (each once; the batch keeps them, its consumer drops
//   them). It wakes only at a deadline, or for a push whose deadline comes before the one it
//   sleeps for: no per-request wake-up.
// - close() is idempotent: it stops and joins the thread and drops undelivered batches (their
//   slots return to the pool); requests still waiting are simply never formed (their owner
//   fails them). The destructor calls it. An error inside the thread (e.g. no memory for a
//   slot) is rethrown by next_batch(), never lost.
// - Fork: make it with make_fork_safe_shared. In a forked child the former is inert: its
//   thread does not exist, so next_batch() and the other waits throw ForkedError, close()
//   and close_input() do nothing, and its owner's release leaks it (fork_guard.hpp). push() is not
//   checked (it is the per-request path): its caller must not push to an inherited former.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "dynbatch/blocking_queue.hpp"
#include "dynbatch/collator.hpp"
#include "dynbatch/dispatch_delay.hpp"
#include "dynbatch/event_count.hpp"
#include "dynbatch/fork_guard.hpp"
#include "dynbatch/pending_requests.hpp"
#include "dynbatch/sizing_policy.hpp"
#include "dynbatch/staging_pool.hpp"
#include "dynbatch/stats.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

struct FormedBatch {
  std::uint64_t sequence = 0;
  std::vector<std::uint64_t> ids;
  std::size_t target = 0;
  std::shared_ptr<SlotLease> lease;
  Nanoseconds first_enqueue_ns = 0;
  Nanoseconds formed_ns = 0;
  Nanoseconds collate_ns = 0;
  std::uint64_t memory_available_bytes = 0;
  ReleaseReason reason = ReleaseReason::full;
  std::vector<std::uint64_t> expired_ids; // requests whose timeout passed before forming
  // When the consumer could first have had this batch: when it was formed (a full batch) or
  // became due (a partial one: a late wake-up on a loaded machine counts), or when the
  // consumer began asking for its next batch (over several next_batch() calls), the later.
  Nanoseconds released_ns = 0;
  // Per request, its deadline, when any request of the batch has one (else empty); one that
  // wait_late() reported becomes no_deadline.
  std::vector<Nanoseconds> deadlines;
  // Padded leaves: each sample's length, and the batch's length (the longest, rounded up).
  std::vector<std::uint32_t> lengths;
  std::size_t padded_length = 0;
};

struct FormerOptions {
  std::size_t capacity = 1024; // requests waiting to be formed; the table rounds it up to 2^k
  std::size_t prefetch_depth = 1;
  // The longest the oldest waiting request waits for its batch to fill: a short queue is
  // dispatched as it is after this, a long one fills the target at once. 0: dispatch what is
  // there at once; no_deadline: wait for the target (or the end of input).
  Nanoseconds max_delay_ns = no_deadline;
  // A waiting request gains one priority level per aging_ns waited.
  Nanoseconds aging_ns = 100'000'000;
  // Padded leaves: a batch's padded length is a multiple of this (even when all samples have
  // one length); a batch's padded size (count x padded length) stays within max_tokens (0:
  // no budget); bucket_window > 1 groups waiting requests of similar lengths.
  std::size_t pad_to_multiple_of = 1;
  std::size_t max_tokens = 0;
  std::size_t bucket_window = 0;
  // Padded leaves without a bucket window (serving): a batch takes the head and, of every
  // request queued, those closest to its length whose padding costs less than a batch of
  // their own (SizingPolicy::padding_allowance); it does not wait for a window to fill.
  bool group_queued = false;
  // false: the caller collates (small samples the caller stacks faster than it could hand
  // over their addresses); batches are formed, sized and recorded as usual, but carry no
  // staging slot and push() takes no sources.
  bool collate = true;
  // false: no former thread; the consumer forms every batch in next_batch(), so it must push
  // a batch's worth of requests (or close the input) before asking: next_batch() throws
  // std::logic_error rather than wait for input nobody will push. For a consumer that feeds
  // itself when there is no copy to overlap: a cross-thread wake-up costs more than forming.
  bool own_thread = true;
};

// Per request in push(); the defaults make a plain FIFO request.
struct RequestOptions {
  std::int32_t priority = 0;
  Nanoseconds timeout_ns = no_deadline; // from the push; no_deadline: none
  std::uint32_t length = 0;             // rows of its padded leaves (layouts with any)
};

// batch: `out` holds a batch (and maybe expired ids); expired: only expired ids.
enum class NextStatus { batch, expired, finished, timeout };

class BatchFormer {
public:
  BatchFormer(BatchLayout layout, FormerOptions options, std::shared_ptr<StagingPool> pool,
              std::shared_ptr<SizingPolicy> policy, std::shared_ptr<TelemetrySampler> telemetry,
              std::shared_ptr<StatsRecorder> stats);
  ~BatchFormer();
  BatchFormer(const BatchFormer &) = delete;
  BatchFormer &operator=(const BatchFormer &) = delete;

  // `sources` holds leaf_count() pointers per request, request-major (none without
  // collation); `options` is empty (all defaults) or one per request. Returns how many of `ids`
  // were accepted (a prefix); fewer when `capacity` requests wait already or the input is closed.
  std::size_t push(std::span<const std::uint64_t> ids, std::span<const void *const> sources,
                   std::span<const RequestOptions> options = {});
  // Sleeps until a push could be accepted, the input is closed, or the deadline passes;
  // returns whether there is room.
  bool wait_for_room(Nanoseconds deadline_ns);
  void close_input();

  NextStatus next_batch(FormedBatch &out, Nanoseconds deadline_ns);
  // `batch` when `expired` or `late` got ids, `finished` once close() was called or the thread
  // failed, `timeout` when deadline_ns passed first. Appends to both vectors.
  NextStatus wait_late(std::vector<std::uint64_t> &expired, std::vector<std::uint64_t> &late,
                       Nanoseconds deadline_ns);
  // A batch (or expired ids) already there, else `timeout`: never waits, never forms, so it
  // may run with the GIL held (a release costs a GIL hand-off when other threads are busy).
  NextStatus try_next_batch(FormedBatch &out);
  // Fills in the bucket; `sequence` names the batch in the stats.
  void report_feedback(std::uint64_t sequence, BatchFeedback feedback);
  // The batch released at `released_ns` (FormedBatch::released_ns) is dispatched now.
  void report_dispatch(Nanoseconds released_ns);
  // How long before a waiting request's deadline its batch is released now.
  Nanoseconds deadline_slack() const noexcept { return dispatch_delay_.slack(); }
  // Costs are learned per input shape; a former's layout is one shape.
  std::uint64_t bucket() const noexcept { return layout_->shape_key(); }
  std::size_t sample_bytes() const noexcept { return layout_->sample_bytes(); }
  void close();

  const std::shared_ptr<const BatchLayout> &layout() const noexcept { return layout_; }
  std::size_t capacity() const noexcept { return options_.capacity; }
  // Requests pushed and not yet formed or expired (a snapshot).
  std::size_t queued() const noexcept { return waiting_.load(std::memory_order_relaxed); }
  // Requests not yet handed to the consumer: queued, or in batches formed ahead (a snapshot).
  std::size_t backlog();

private:
  enum class FormResult { formed, needs_input, finished, skipped };

  void run();
  struct Target {
    std::size_t count;  // samples
    std::size_t tokens; // padded layouts: the token budget (the policy's, within max_tokens)
  };
  Target target_size();
  // Whether the waiting requests make a full batch: `target` of them, or with a token budget
  // enough tokens to fill it; with length grouping, the whole window (else which requests are
  // grouped would depend on how far the producer had got, that is on thread timing).
  bool full(const Target &target);
  // How many more requests to wait for before looking again (at least 1).
  std::size_t missing(const Target &target);
  // Caller holds form_mutex_. Never blocks: forms one batch if one is due; otherwise
  // *wait_until says when to look again (no_deadline: on new input). `ahead` (the former
  // thread) keeps the prefetch bound and leaves partial batches to the consumer.
  FormResult form_one(bool ahead, Nanoseconds *wait_until = nullptr);
  // `due_ns`: when a partial batch became due (0: a full one, due when formed).
  void form(std::span<const RequestDescriptor> requests, std::size_t target, ReleaseReason reason,
            Nanoseconds due_ns);
  // Caller holds form_mutex_: moves every queued request into pending_ and expires the late.
  void gather_pending(Nanoseconds now);
  void release_rows(std::span<const RequestDescriptor> requests);
  void record_delivery(const FormedBatch &batch);
  // The consumer, holding ready_mutex_: moves the expired ids into `out`.
  void hand_over_expired(FormedBatch &out);

  const ForkStamp stamp_;
  const std::shared_ptr<const BatchLayout> layout_;
  const FormerOptions options_;
  const std::shared_ptr<StagingPool> pool_;
  const std::shared_ptr<SizingPolicy> policy_;
  const std::shared_ptr<TelemetrySampler> telemetry_;
  const std::shared_ptr<StatsRecorder> stats_;
  const Nanoseconds started_ns_;

  // Request table: one row of leaf pointers per request in flight, rows recycled via a ring.
  std::vector<const void *> rows_;
  std::vector<std::uint32_t> row_lengths_; // per row: the request's padded-leaf length
  // Padded layouts: the padded length of recent batches by sequence, so feedback can be read
  // in tokens. Guarded by padded_mutex_.
  std::mutex padded_mutex_;
  std::deque<std::pair<std::uint64_t, std::size_t>> padded_lengths_;
  std::atomic<std::uint32_t> longest_{1}; // the longest length pushed: sizes the staging
  MpmcRing<std::uint32_t> free_rows_;
  BlockingQueue<RequestDescriptor> requests_;
  std::atomic<std::size_t> waiting_{0}; // pushed, not yet formed or expired
  // Bumped when the consumer leaves gathered requests pending: what the thread waits for moved.
  std::atomic<std::uint64_t> taken_aside_{0};
  // Bumped by every push of a request with a deadline: the thread re-plans its wake-up.
  std::atomic<std::uint64_t> deadlines_pushed_{0};
  EventCount room_; // signalled when requests leave the table
  DispatchDelay dispatch_delay_;
  // wait_late(): when it next wakes (the minimum while it plans: every timed push wakes it),
  // and what a push with an earlier deadline, or close(), signals.
  std::atomic<Nanoseconds> watch_until_{no_deadline};
  EventCount deadline_watch_;

  std::mutex form_mutex_; // one batch formed at a time, by the thread or the consumer
  // Guarded by form_mutex_: popped and not yet formed, and scratch space for one batch.
  PendingRequests pending_;
  std::vector<RequestDescriptor> popped_;
  std::vector<RequestDescriptor> taken_;

  std::mutex ready_mutex_;
  std::condition_variable ready_changed_;
  std::deque<FormedBatch> ready_;
  std::vector<std::uint64_t> expired_; // ids not yet handed to the consumer
  Nanoseconds expired_due_ns_ = -1;    // when the last of them was due for release; -1: none
  bool partial_due_ = false;           // the thread found a partial batch due: consumer forms
  bool finished_ = false;              // input exhausted and every request formed
  bool stopping_ = false;
  std::exception_ptr error_;
  // The consumer's side only (one thread at a time): when it began asking for the batch it has
  // not got yet; -1: it has not asked since its last one.
  Nanoseconds asked_ns_ = -1;

  std::mutex close_mutex_;
  bool closed_ = false; // guarded by close_mutex_
  std::thread thread_;
};

} // namespace dynbatch
