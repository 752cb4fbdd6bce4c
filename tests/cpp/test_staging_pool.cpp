// StagingPool: page-aligned slots, reuse and growth, the non-blocking one-off fallback, leases
// that outlive the pool's last outside owner, and concurrent acquire/release.

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "dynbatch/platform.hpp"
#include "dynbatch/staging_pool.hpp"
#include "test_support.hpp"

using dynbatch::SlotLease;
using dynbatch::StagingPool;

namespace {

bool page_aligned(const void *pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % dynbatch::page_size == 0;
}

// Writes every byte (AddressSanitizer checks the size) and reads the pattern back.
bool fill_and_verify(SlotLease &lease, std::size_t bytes, std::uint8_t seed) {
  std::byte *data = lease.data();
  for (std::size_t i = 0; i < bytes; ++i) {
    data[i] = static_cast<std::byte>(seed + i * 7);
  }
  for (std::size_t i = 0; i < bytes; ++i) {
    if (data[i] != static_cast<std::byte>(seed + i * 7)) {
      return false;
    }
  }
  return true;
}

} // namespace

TEST_CASE(allocate_aligned_is_page_aligned) {
  for (const std::size_t bytes : {0u, 1u, 100u, 4095u, 4096u, 4097u, 1u << 20}) {
    dynbatch::AlignedBuffer buffer = dynbatch::allocate_aligned(bytes);
    REQUIRE(buffer != nullptr);
    CHECK(page_aligned(buffer.get()));
    std::memset(buffer.get(), 0xab, bytes);
  }
}

TEST_CASE(acquire_returns_aligned_memory_of_requested_size) {
  auto pool = StagingPool::create(2);
  CHECK_EQ(pool->stats().pooled_slots, 2u);
  CHECK_EQ(pool->stats().pooled_bytes, 0u); // nothing allocated before the first use
  for (const std::size_t bytes : {1u, 1000u, 4096u, 70'000u, 3u << 20}) {
    auto lease = pool->acquire(bytes);
    REQUIRE(lease != nullptr);
    REQUIRE(lease->data() != nullptr);
    CHECK(lease->pooled());
    CHECK(page_aligned(lease->data()));
    CHECK_GE(lease->capacity(), bytes);
    CHECK(fill_and_verify(*lease, lease->capacity(), static_cast<std::uint8_t>(bytes)));
  }
  const auto stats = pool->stats();
  CHECK_EQ(stats.slots_in_use, 0u);
  CHECK_EQ(stats.acquisitions, 5u);
  CHECK_EQ(stats.one_off_allocations, 0u);
}

TEST_CASE(release_returns_slot_and_reuses_its_buffer) {
  auto pool = StagingPool::create(1);
  auto lease = pool->acquire(10'000);
  REQUIRE(lease != nullptr);
  std::byte *const first = lease->data();
  const std::size_t first_capacity = lease->capacity();
  auto stats = pool->stats();
  CHECK_EQ(stats.slots_in_use, 1u);
  CHECK_EQ(stats.acquisitions, 1u);
  CHECK_EQ(stats.slot_growths, 1u);
  CHECK_EQ(stats.pooled_bytes, first_capacity);

  lease.reset();
  stats = pool->stats();
  CHECK_EQ(stats.slots_in_use, 0u);
  CHECK_EQ(stats.pooled_bytes, first_capacity);

  // Smaller or equal requests get the same memory back, without growing.
  for (const std::size_t bytes : {std::size_t{1}, std::size_t{5'000}, first_capacity}) {
    auto again = pool->acquire(bytes);
    CHECK(again->pooled());
    CHECK_EQ(static_cast<void *>(again->data()), static_cast<void *>(first));
    CHECK_EQ(again->capacity(), first_capacity);
  }
  stats = pool->stats();
  CHECK_EQ(stats.slot_growths, 1u);
  CHECK_EQ(stats.acquisitions, 4u);
  CHECK_EQ(stats.slots_in_use, 0u);
}

TEST_CASE(slot_grows_for_larger_requests) {
  auto pool = StagingPool::create(1);
  std::size_t capacity = 0;
  {
    auto lease = pool->acquire(1000);
    capacity = lease->capacity();
  }
  const std::size_t bigger = capacity + 1;
  {
    auto lease = pool->acquire(bigger);
    CHECK(lease->pooled());
    CHECK_GE(lease->capacity(), bigger);
    CHECK(page_aligned(lease->data()));
    CHECK(fill_and_verify(*lease, lease->capacity(), 3));
    const auto stats = pool->stats();
    CHECK_EQ(stats.slot_growths, 2u);
    CHECK_EQ(stats.pooled_bytes, lease->capacity()); // the old buffer is not counted any more
    CHECK_EQ(stats.one_off_allocations, 0u);
    capacity = lease->capacity();
  }
  // The grown buffer is what the slot keeps.
  auto lease = pool->acquire(bigger);
  CHECK_EQ(lease->capacity(), capacity);
  CHECK_EQ(pool->stats().slot_growths, 2u);
}

TEST_CASE(exhausted_pool_hands_out_one_off_buffers_without_blocking) {
  auto pool = StagingPool::create(2);
  auto a = pool->acquire(100);
  auto b = pool->acquire(100);
  CHECK(a->pooled());
  CHECK(b->pooled());
  CHECK_NE(static_cast<void *>(a->data()), static_cast<void *>(b->data()));

  auto c = pool->acquire(5000); // returns at once even though every slot is held
  REQUIRE(c != nullptr);
  CHECK(!c->pooled());
  CHECK(page_aligned(c->data()));
  CHECK_GE(c->capacity(), 5000u);
  CHECK(fill_and_verify(*c, c->capacity(), 9));
  auto d = pool->acquire(10);
  CHECK(!d->pooled());
  auto stats = pool->stats();
  CHECK_EQ(stats.slots_in_use, 2u);
  CHECK_EQ(stats.one_off_in_use, 2u);
  CHECK_EQ(stats.one_off_allocations, 2u);
  CHECK_EQ(stats.acquisitions, 4u);
  const std::size_t pooled_bytes = stats.pooled_bytes;

  c.reset(); // freed, not pooled
  stats = pool->stats();
  CHECK_EQ(stats.one_off_in_use, 1u);
  CHECK_EQ(stats.pooled_slots, 2u);
  CHECK_EQ(stats.pooled_bytes, pooled_bytes);
  d.reset();
  CHECK_EQ(pool->stats().one_off_in_use, 0u);

  // A freed pooled slot is preferred again over a one-off.
  std::byte *const a_data = a->data();
  a.reset();
  auto e = pool->acquire(100);
  CHECK(e->pooled());
  CHECK_EQ(static_cast<void *>(e->data()), static_cast<void *>(a_data));
  CHECK_EQ(pool->stats().one_off_allocations, 2u);
}

TEST_CASE(zero_slot_pool_always_gives_one_offs) {
  auto pool = StagingPool::create(0);
  auto lease = pool->acquire(123);
  CHECK(!lease->pooled());
  CHECK(page_aligned(lease->data()));
  CHECK(fill_and_verify(*lease, 123, 1));
  lease.reset();
  const auto stats = pool->stats();
  CHECK_EQ(stats.one_off_allocations, 1u);
  CHECK_EQ(stats.one_off_in_use, 0u);
}

TEST_CASE(zero_byte_acquire_gives_a_real_buffer) {
  // A batch of zero-extent leaves stages 0 bytes. The lease must still point at memory:
  // collate() and DLPack consumers pass data() to memcpy, where a null pointer is undefined
  // behaviour even for 0 bytes. One-off buffers already get a page for 0 bytes; slots too.
  auto pool = StagingPool::create(1);
  auto pooled = pool->acquire(0);
  CHECK(pooled->pooled());
  CHECK(pooled->data() != nullptr);
  CHECK(page_aligned(pooled->data()));
  auto one_off = pool->acquire(0);
  CHECK(!one_off->pooled());
  CHECK(one_off->data() != nullptr);
  CHECK(page_aligned(one_off->data()));
}

TEST_CASE(lease_keeps_pool_alive) {
  auto pool = StagingPool::create(1);
  std::weak_ptr<StagingPool> watcher = pool;
  auto pooled = pool->acquire(4096);
  auto one_off = pool->acquire(4096);
  CHECK(pooled->pooled());
  CHECK(!one_off->pooled());
  pool.reset(); // the last outside owner goes
  CHECK(!watcher.expired());
  CHECK(fill_and_verify(*pooled, 4096, 5));
  CHECK(fill_and_verify(*one_off, 4096, 6));
  {
    auto view = watcher.lock();
    REQUIRE(view != nullptr);
    CHECK_EQ(view->stats().slots_in_use, 1u);
    CHECK_EQ(view->stats().one_off_in_use, 1u);
  }
  pooled.reset(); // returns its slot to a pool that only the other lease keeps alive
  CHECK(!watcher.expired());
  CHECK_EQ(watcher.lock()->stats().slots_in_use, 0u);
  one_off.reset(); // the last lease: the pool goes with it (ASan checks nothing leaks)
  CHECK(watcher.expired());
}

TEST_CASE(concurrent_acquire_release) {
  constexpr std::size_t threads_count = 4;
  const std::size_t iterations = dynbatch::testing::under_tsan ? 1500 : 6000;
  auto pool = StagingPool::create(3);
  std::barrier start(static_cast<std::ptrdiff_t>(threads_count));
  std::atomic<std::size_t> shared_slot_collisions{0};
  std::atomic<std::size_t> bad_leases{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < threads_count; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 random(static_cast<std::uint32_t>(1234 + t));
      std::uniform_int_distribution<std::size_t> size(1, 96 * 1024);
      std::vector<std::shared_ptr<SlotLease>> held;
      start.arrive_and_wait();
      for (std::size_t i = 0; i < iterations; ++i) {
        const std::size_t bytes = size(random);
        auto lease = pool->acquire(bytes);
        if (lease == nullptr || lease->capacity() < bytes || !page_aligned(lease->data())) {
          bad_leases.fetch_add(1);
          continue;
        }
        // Stamp the first and last byte; another holder of the same memory would overwrite.
        const auto stamp = static_cast<std::byte>(0x10 + t);
        lease->data()[0] = stamp;
        lease->data()[bytes - 1] = stamp;
        held.push_back(std::move(lease));
        if (held.size() > 2 || random() % 2 == 0) {
          std::this_thread::yield();
          for (const auto &mine : held) {
            if (mine->data()[0] != stamp) {
              shared_slot_collisions.fetch_add(1);
            }
          }
          held.clear();
        }
      }
    });
  }
  for (std::thread &thread : threads) {
    thread.join();
  }
  CHECK_EQ(bad_leases.load(), 0u);
  CHECK_EQ(shared_slot_collisions.load(), 0u);
  const auto stats = pool->stats();
  CHECK_EQ(stats.slots_in_use, 0u);
  CHECK_EQ(stats.one_off_in_use, 0u);
  CHECK_EQ(stats.acquisitions, threads_count * iterations);
  CHECK_EQ(stats.pooled_slots, 3u);
  // 4 threads holding up to 3 leases each against 3 slots: one-offs must have happened.
  CHECK_GT(stats.one_off_allocations, 0u);
  CHECK_LE(stats.pooled_bytes, 3u * (96u * 1024u + 64u * 1024u));
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
