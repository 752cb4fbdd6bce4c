#include "dynbatch/staging_pool.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <new>

#include "dynbatch/device.hpp"
#include "dynbatch/platform.hpp"

namespace dynbatch {
namespace {
// Slots grow in 64 KiB steps so that batches of slowly rising size do not reallocate each time.
constexpr std::size_t growth_granularity = 64 * 1024;
} // namespace

void AlignedFree::operator()(std::byte *pointer) const noexcept {
  if (pinned_by != nullptr) {
    pinned_by->free_pinned(pointer);
  } else if (pointer != nullptr) {
    munmap(pointer, bytes);
  }
}

AlignedBuffer allocate_aligned(std::size_t bytes) {
  const std::size_t size = align_up(bytes == 0 ? 1 : bytes, page_size);
  void *pointer = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pointer == MAP_FAILED) {
    throw std::bad_alloc();
  }
  return AlignedBuffer(static_cast<std::byte *>(pointer), AlignedFree{nullptr, size});
}

SlotLease::SlotLease(std::shared_ptr<StagingPool> pool, int slot, AlignedBuffer buffer,
                     std::size_t bytes)
    : pool_(std::move(pool)), slot_(slot), buffer_(std::move(buffer)), capacity_(bytes) {}

SlotLease::~SlotLease() {
  if (pool_->stamp_.forked()) {
    // The parent's pool: the buffer is freed, the pool left alone; a pinned buffer is leaked,
    // since its device's driver does not work in a forked child.
    if (buffer_.get_deleter().pinned_by != nullptr) {
      static_cast<void>(buffer_.release());
    }
    return;
  }
  if (slot_ >= 0) {
    pool_->release(slot_, std::move(buffer_), capacity_);
  } else {
    pool_->release_one_off(std::move(buffer_), capacity_);
  }
}

std::shared_ptr<StagingPool> StagingPool::create(std::size_t slots,
                                                 std::shared_ptr<Device> pinned_by) {
  auto *pool = new StagingPool(slots, std::move(pinned_by));
  return std::shared_ptr<StagingPool>(pool, [](StagingPool *object) noexcept {
    if (!object->stamp_.forked()) {
      delete object;
    }
  });
}

StagingPool::StagingPool(std::size_t slots, std::shared_ptr<Device> pinned_by)
    : pinned_by_(std::move(pinned_by)), slots_(slots) {
  stats_.pooled_slots = slots;
}

AlignedBuffer StagingPool::allocate(std::size_t bytes) {
  if (pinned_by_ != nullptr) {
    const std::size_t size = align_up(bytes == 0 ? 1 : bytes, page_size);
    std::string error;
    try {
      auto *pointer = static_cast<std::byte *>(pinned_by_->allocate_pinned(size));
      std::lock_guard lock(mutex_);
      stats_.pinned_bytes += bytes;
      return AlignedBuffer(pointer, AlignedFree{pinned_by_.get(), size});
    } catch (const std::exception &failure) {
      error = failure.what(); // pinned memory is scarce (a limit, or a lost device): go pageable
    }
    std::lock_guard lock(mutex_);
    ++stats_.pinned_fallbacks;
    stats_.pinned_error = std::move(error);
  }
  return allocate_aligned(bytes);
}

std::shared_ptr<SlotLease> StagingPool::acquire(std::size_t bytes) {
  if (stamp_.forked()) {
    throw ForkedError("this staging pool");
  }
  std::unique_lock lock(mutex_);
  ++stats_.acquisitions;
  for (std::size_t index = 0; index < slots_.size(); ++index) {
    Slot &slot = slots_[index];
    if (slot.in_use) {
      continue;
    }
    slot.in_use = true;
    ++stats_.slots_in_use;
    AlignedBuffer buffer = std::move(slot.buffer);
    std::size_t capacity = slot.capacity;
    try {
      if (buffer == nullptr || capacity < bytes) { // never a null buffer, even for 0 bytes
        // Allocate outside the lock: a large first-touch allocation must not stall releases.
        stats_.pooled_bytes -= capacity;
        if (buffer != nullptr && buffer.get_deleter().pinned_by != nullptr) {
          stats_.pinned_bytes -= capacity;
        }
        capacity = 0;
        lock.unlock();
        buffer.reset();
        const std::size_t grown = align_up(std::max<std::size_t>(bytes, 1), growth_granularity);
        buffer = allocate(grown);
        capacity = grown;
        lock.lock();
        stats_.pooled_bytes += capacity;
        ++stats_.slot_growths;
      }
      return std::make_shared<SlotLease>(shared_from_this(), static_cast<int>(index),
                                         std::move(buffer), capacity);
    } catch (...) {
      if (!lock.owns_lock()) {
        lock.lock();
      }
      stats_.pooled_bytes -= capacity;
      if (buffer != nullptr && buffer.get_deleter().pinned_by != nullptr) {
        stats_.pinned_bytes -= capacity;
      }
      slot.capacity = 0;
      slot.in_use = false;
      --stats_.slots_in_use;
      throw;
    }
  }
  lock.unlock();
  // Allocate before counting, so a failed allocation leaves the counters true.
  AlignedBuffer buffer = allocate(bytes);
  auto lease = std::make_shared<SlotLease>(shared_from_this(), -1, std::move(buffer), bytes);
  lock.lock();
  ++stats_.one_off_allocations;
  ++stats_.one_off_in_use;
  return lease;
}

void StagingPool::release(int slot, AlignedBuffer buffer, std::size_t capacity) noexcept {
  std::lock_guard lock(mutex_);
  Slot &entry = slots_[static_cast<std::size_t>(slot)];
  entry.buffer = std::move(buffer);
  entry.capacity = capacity;
  entry.in_use = false;
  --stats_.slots_in_use;
}

void StagingPool::release_one_off(AlignedBuffer buffer, std::size_t capacity) noexcept {
  const bool pinned = buffer.get_deleter().pinned_by != nullptr;
  buffer.reset();
  std::lock_guard lock(mutex_);
  --stats_.one_off_in_use;
  if (pinned) {
    stats_.pinned_bytes -= capacity;
  }
}

StagingPoolStats StagingPool::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

} // namespace dynbatch
