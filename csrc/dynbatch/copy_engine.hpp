#pragma once
// CopyEngine: host-to-device copies of collated batches on the core's own stream, with the
// staging slot held until the copy ran. Written once against the device seam (device.hpp).
//
// Contract
// - enqueue() puts one copy per leaf on the engine's stream, records a fresh event after them
//   and returns a Transfer. It does not wait for the copies. The `hold` it is given (the slot's
//   SlotLease, shared with the batch and any host tensors exported from it) is kept until the
//   event completed, so the slot cannot return to its pool, and be rewritten, while the device
//   may still read it. A releaser thread waits for transfers in order and drops their holds.
// - The consumer of a transfer makes its own stream wait on the event (make_stream_wait) or
//   waits on the host (synchronize); the engine never blocks its caller.
// - Thread-safe. The destructor waits for every copy still in flight (so no hold outlives its
//   copy) and joins the releaser; with a lost device those waits fail at once, never hang.
// - Errors: a device failure while enqueueing throws DeviceError; one seen by the releaser is
//   kept on the transfer (done/synchronize rethrow it) and in the engine (first_error), and
//   the hold is dropped (nothing will read the slot any more).

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "dynbatch/collator.hpp"
#include "dynbatch/device.hpp"

namespace dynbatch {

struct LeafCopy {
  void *destination = nullptr;  // device memory
  const void *source = nullptr; // host memory, pinned for an asynchronous copy
  std::size_t bytes = 0;
};

// One copy per leaf of a batch collated into `slot`: leaf j from its region of the slot to
// destinations[j]. Throws std::invalid_argument when the counts differ.
std::vector<LeafCopy> batch_leaf_copies(const BatchLayout &layout, const std::byte *slot,
                                        std::size_t batch_size, std::size_t padded_length,
                                        std::span<void *const> destinations);

class Transfer {
public:
  Transfer(std::shared_ptr<Device> device, std::uint64_t sequence,
           std::shared_ptr<const void> hold);
  Transfer(const Transfer &) = delete;
  Transfer &operator=(const Transfer &) = delete;

  std::uint64_t sequence() const noexcept { return sequence_; }
  EventView event() const noexcept { return event_.view(); }
  // Whether the copies ran (never blocks). Throws the transfer's DeviceError.
  bool done();
  // Blocks the calling thread until the copies ran. Throws the transfer's DeviceError.
  void synchronize();
  // Work enqueued on `consumer` after this call waits for the copies.
  void make_stream_wait(StreamView consumer);
  // Whether the hold (the slot lease) is still kept; false once the copies ran.
  bool holding() const noexcept {
    return holding_.load(std::memory_order_acquire); // pairs with the release in release_hold
  }

private:
  friend class CopyEngine;
  void release_hold(std::string error) noexcept; // the releaser thread, once
  void throw_if_failed() const;

  std::shared_ptr<Device> device_;
  std::uint64_t sequence_;
  OwnedEvent event_;
  std::shared_ptr<const void> hold_; // written by the creator before publishing, then the releaser
  std::atomic<bool> holding_{true};
  mutable std::mutex mutex_;
  std::string error_;
};

struct CopyEngineStats {
  std::uint64_t transfers = 0;
  std::uint64_t copies = 0;
  std::uint64_t bytes = 0;
  std::uint64_t released = 0; // transfers whose hold was dropped
  std::size_t in_flight = 0;  // enqueued, hold not yet dropped
  std::uint64_t failures = 0;
};

class CopyEngine {
public:
  explicit CopyEngine(std::shared_ptr<Device> device);
  ~CopyEngine();
  CopyEngine(const CopyEngine &) = delete;
  CopyEngine &operator=(const CopyEngine &) = delete;

  const std::shared_ptr<Device> &device() const noexcept { return device_; }
  StreamView stream() const noexcept { return stream_.view(); }

  std::shared_ptr<Transfer> enqueue(std::span<const LeafCopy> copies,
                                    std::shared_ptr<const void> hold);
  CopyEngineStats stats() const;
  std::string first_error() const; // "" while no transfer failed

private:
  void release_in_order();

  std::shared_ptr<Device> device_;
  OwnedStream stream_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::shared_ptr<Transfer>> in_flight_;
  std::uint64_t next_sequence_ = 0;
  bool stopping_ = false;
  CopyEngineStats stats_;
  std::string first_error_;
  std::thread releaser_; // last: started once everything above exists
};

} // namespace dynbatch
