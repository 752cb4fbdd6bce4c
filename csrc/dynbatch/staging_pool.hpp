#pragma once
// StagingPool: reusable page-aligned host buffers that batches are collated into.
// allocate_aligned() maps fresh pages (see AlignedFree); freeing one unmaps it.
//
// Contract
// - acquire() never blocks: it hands out a pooled slot when one is free (growing it to the
//   requested size if needed) and otherwise a one-off buffer that is freed, not pooled, on
//   release. So a caller that keeps every batch alive costs memory, never a deadlock, and the
//   pool itself stays at a fixed number of slots.
// - A SlotLease returns its buffer when the last reference to it goes: the lease is shared by
//   the batch and by every tensor exported from it (DLPack deleters hold a reference).
// - A lease keeps its pool alive, so a tensor may outlive the processor that made it.
// - All calls are thread-safe; acquire/release take a short mutex once per batch.
// - Pinned: a pool created with a device takes its buffers from the device's page-locked
//   allocator (what an asynchronous host-to-device copy needs). When pinning fails the buffer
//   is pageable instead, counted in stats (pinned_fallbacks, pinned_error): a warning, never an
//   error. Whether a slot may be rewritten is the lease's business: a CopyEngine holds the
//   lease until the copy from it ran.
// - Fork: in a forked child, acquire() on the parent's pool throws ForkedError (its mutex may be
//   held by a thread that does not exist there), a lease of the parent's pool frees its buffer
//   without touching the pool, and the pool is leaked rather than destroyed.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dynbatch/fork_guard.hpp"

namespace dynbatch {

class Device;
class StagingPool;

// Buffers are mapped pages of their own (mmap), not malloc'ed: a slot is freed by whichever
// thread drops the last tensor of its batch, and glibc would keep a large malloc'ed chunk
// cached in that thread's arena (processors come and go with their threads, each thread gets
// an arena) and raise its mmap threshold so that later large allocations stay in arenas too.
// A pinned buffer is freed through the device that allocated it.
struct AlignedFree {
  Device *pinned_by = nullptr;
  std::size_t bytes = 0; // the mapping's length
  void operator()(std::byte *pointer) const noexcept;
};
using AlignedBuffer = std::unique_ptr<std::byte[], AlignedFree>;
AlignedBuffer allocate_aligned(std::size_t bytes);

class SlotLease {
public:
  SlotLease(std::shared_ptr<StagingPool> pool, int slot, AlignedBuffer buffer, std::size_t bytes);
  ~SlotLease();
  SlotLease(const SlotLease &) = delete;
  SlotLease &operator=(const SlotLease &) = delete;

  std::byte *data() const noexcept { return buffer_.get(); }
  std::size_t capacity() const noexcept { return capacity_; }
  bool pooled() const noexcept { return slot_ >= 0; }

private:
  std::shared_ptr<StagingPool> pool_;
  int slot_; // -1: a one-off buffer
  AlignedBuffer buffer_;
  std::size_t capacity_;
};

struct StagingPoolStats {
  std::size_t pooled_slots = 0;
  std::size_t slots_in_use = 0;
  std::size_t pooled_bytes = 0;
  std::size_t one_off_in_use = 0;
  std::uint64_t acquisitions = 0;
  std::uint64_t one_off_allocations = 0;
  std::uint64_t slot_growths = 0;
  std::size_t pinned_bytes = 0;       // live buffers from the device's pinned allocator
  std::uint64_t pinned_fallbacks = 0; // buffers that are pageable because pinning failed
  std::string pinned_error;           // why the latest pinning failed
};

class StagingPool : public std::enable_shared_from_this<StagingPool> {
public:
  // pinned_by: the device whose page-locked memory the buffers come from; null: pageable.
  static std::shared_ptr<StagingPool> create(std::size_t slots,
                                             std::shared_ptr<Device> pinned_by = nullptr);

  std::shared_ptr<SlotLease> acquire(std::size_t bytes);
  StagingPoolStats stats() const;
  // True in a process forked after the pool was made.
  bool forked() const noexcept { return stamp_.forked(); }

private:
  friend class SlotLease;
  StagingPool(std::size_t slots, std::shared_ptr<Device> pinned_by);
  AlignedBuffer allocate(std::size_t bytes); // pinned when it can be; never under the lock
  void release(int slot, AlignedBuffer buffer, std::size_t capacity) noexcept;
  void release_one_off(AlignedBuffer buffer, std::size_t capacity) noexcept;

  struct Slot {
    AlignedBuffer buffer;
    std::size_t capacity = 0;
    bool in_use = false;
  };
  const std::shared_ptr<Device> pinned_by_; // outlives every buffer: destroyed after slots_
  const ForkStamp stamp_;
  mutable std::mutex mutex_;
  std::vector<Slot> slots_;
  StagingPoolStats stats_;
};

} // namespace dynbatch
