#pragma once
// MpmcRing<T>: a bounded multi-producer multi-consumer ring of trivially copyable descriptors.
//
// Contract
// - try_push / try_pop may be called from any number of threads at once. Neither blocks nor
//   allocates; both fail fast (full / empty) instead of waiting. Blocking lives one layer up,
//   in BlockingQueue.
// - Progress: lock-free between slots, not wait-free. A producer preempted after claiming a
//   slot and before publishing it holds up the consumer of that one slot only.
// - Order: FIFO per producer. Items of different producers interleave in claim order.
// - was_size() is a snapshot that may be stale by the time it returns.
// - Capacity is a power of two so that a position maps to a slot with a mask.
//
// Each slot carries a sequence number ("turn") telling whether it is ready for the producer or
// the consumer of a given position; head and tail live on their own cache lines.

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dynbatch/platform.hpp"

namespace dynbatch {

template <class T>
  requires std::is_trivially_copyable_v<T>
class MpmcRing {
public:
  // start_position lets tests begin with the counters near their wrap-around.
  explicit MpmcRing(std::size_t capacity, std::uint64_t start_position = 0)
      : mask_(checked_capacity(capacity) - 1), slots_(new Slot[capacity]), head_(start_position),
        tail_(start_position) {
    for (std::size_t i = 0; i < capacity; ++i) {
      slots_[(start_position + i) & mask_].sequence.store(free_for(start_position + i),
                                                          std::memory_order_relaxed);
    }
  }

  MpmcRing(const MpmcRing &) = delete;
  MpmcRing &operator=(const MpmcRing &) = delete;

  bool try_push(const T &value) noexcept {
    std::uint64_t position = head_.load(std::memory_order_relaxed);
    for (;;) {
      Slot &slot = slots_[position & mask_];
      const std::uint64_t sequence =
          slot.sequence.load(std::memory_order_acquire); // pairs with release in try_pop
      const auto lag = static_cast<std::int64_t>(sequence - free_for(position));
      if (lag == 0) {
        if (head_.compare_exchange_weak(position, position + 1,
                                        std::memory_order_relaxed)) { // claim only
          slot.value = value;
          slot.sequence.store(published_for(position),
                              std::memory_order_release); // pairs with acquire in try_pop
          return true;
        }
      } else if (lag < 0) {
        return false; // the consumer of the previous lap has not freed this slot: full
      } else {
        position = head_.load(std::memory_order_relaxed); // another producer took it
      }
    }
  }

  bool try_pop(T &out) noexcept {
    std::uint64_t position = tail_.load(std::memory_order_relaxed);
    for (;;) {
      Slot &slot = slots_[position & mask_];
      const std::uint64_t sequence =
          slot.sequence.load(std::memory_order_acquire); // pairs with release in try_push
      const auto lag = static_cast<std::int64_t>(sequence - published_for(position));
      if (lag == 0) {
        if (tail_.compare_exchange_weak(position, position + 1,
                                        std::memory_order_relaxed)) { // claim only
          out = slot.value;
          slot.sequence.store(free_for(position + mask_ + 1),
                              std::memory_order_release); // pairs with acquire in try_push
          return true;
        }
      } else if (lag < 0) {
        return false; // not yet published: empty
      } else {
        position = tail_.load(std::memory_order_relaxed); // another consumer took it
      }
    }
  }

  std::size_t capacity() const noexcept { return mask_ + 1; }

  std::size_t was_size() const noexcept {
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const auto size = static_cast<std::int64_t>(head - tail);
    return size < 0 ? 0 : static_cast<std::size_t>(size);
  }

private:
  struct alignas(cache_line_size) Slot {
    std::atomic<std::uint64_t> sequence{0};
    T value{};
  };

  // A slot's sequence says whose turn it is: free_for(p) lets the producer of position p in,
  // published_for(p) the consumer of p. Doubling keeps the two apart even at capacity 1, where
  // "published for p" and "free for p + capacity" would otherwise be the same number.
  static constexpr std::uint64_t free_for(std::uint64_t position) noexcept { return 2 * position; }
  static constexpr std::uint64_t published_for(std::uint64_t position) noexcept {
    return 2 * position + 1;
  }

  static std::size_t checked_capacity(std::size_t capacity) {
    if (capacity == 0 || !std::has_single_bit(capacity)) {
      throw std::invalid_argument("MpmcRing capacity must be a power of two, got " +
                                  std::to_string(capacity));
    }
    return capacity;
  }

  const std::uint64_t mask_;
  const std::unique_ptr<Slot[]> slots_;
  alignas(cache_line_size) std::atomic<std::uint64_t> head_;
  alignas(cache_line_size) std::atomic<std::uint64_t> tail_;
  char tail_padding_[cache_line_size - sizeof(std::atomic<std::uint64_t>)]{};

  static_assert(alignof(Slot) == cache_line_size, "slots must not share cache lines");
  static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
};

} // namespace dynbatch
