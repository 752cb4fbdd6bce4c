// CopyEngine and pinned staging on the simulated device: slots held until their copy ran
// (100,000 batches through 2-4 pinned slots with random copy delays, every batch checked on the
// consumer stream, memory flat), the fingerprint check catching a slot reused early, ordering
// (the consumer waited on each batch's own event), a lost device, the pageable fallback, and
// overlap of copies with compute in simulated time.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dynbatch/collator.hpp"
#include "dynbatch/copy_engine.hpp"
#include "dynbatch/simulated_device.hpp"
#include "dynbatch/staging_pool.hpp"
#include "test_support.hpp"

using dynbatch::CopyEngine;
using dynbatch::DeviceError;
using dynbatch::LeafCopy;
using dynbatch::SimulatedDevice;
using dynbatch::SimulatedDeviceOptions;
using dynbatch::StagingPool;

namespace {

constexpr dynbatch::Nanoseconds ms = 1'000'000;

std::byte pattern(std::uint64_t batch, std::size_t i) {
  return static_cast<std::byte>((batch * 131 + i * 7 + (i >> 8)) & 0xff);
}

void wait_until(const std::function<bool()> &condition) {
  while (!condition()) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

template <class F> std::string error_of(F &&call) {
  try {
    call();
  } catch (const DeviceError &error) {
    return error.what();
  }
  return "";
}

// Batches through `slots` pinned slots: collate (write a pattern) into a slot, copy it on the
// engine's stream into one of `destinations` device buffers, and check it on a consumer stream
// that waits on the batch's event. The producer keeps `slots` batches in flight at most and
// reuses a destination only after its check ran, so the pool never needs a one-off buffer.
void run_pipeline(std::size_t slots, std::size_t batches, std::uint64_t seed) {
  SimulatedDeviceOptions options;
  options.min_delay_ns = 0;
  options.max_delay_ns = 20'000; // random copy delays, slept: the threads really interleave
  options.seed = seed;
  auto device = std::make_shared<SimulatedDevice>(options);
  auto pool = StagingPool::create(slots, device);
  CopyEngine engine(device);
  dynbatch::OwnedStream consumer(device);

  constexpr std::size_t destinations = 3;
  constexpr std::size_t max_bytes = 12 * 1024;
  std::vector<std::byte *> device_buffers;
  std::vector<std::unique_ptr<dynbatch::OwnedEvent>> checked;
  for (std::size_t d = 0; d < destinations; ++d) {
    device_buffers.push_back(
        static_cast<std::byte *>(device->allocate_device(max_bytes, consumer.view())));
    checked.push_back(std::make_unique<dynbatch::OwnedEvent>(device));
  }
  std::atomic<std::uint64_t> wrong{0};
  std::atomic<std::uint64_t> verified{0};
  std::vector<std::shared_ptr<dynbatch::Transfer>> window(slots);
  std::vector<std::uintptr_t> events(batches);
  std::mt19937_64 random(seed);
  std::size_t pooled_bytes_after_warmup = 0;
  for (std::size_t k = 0; k < batches; ++k) {
    // The slot of batch k - slots must be back before this batch takes one.
    if (auto &previous = window[k % slots]; previous != nullptr) {
      wait_until([&] { return !previous->holding(); });
    }
    const std::size_t bytes = 1 + random() % max_bytes;
    auto lease = pool->acquire(bytes);
    for (std::size_t i = 0; i < bytes; ++i) {
      lease->data()[i] = pattern(k, i);
    }
    const std::size_t d = k % destinations;
    device->synchronize_event(checked[d]->view()); // its previous batch was checked
    const LeafCopy copy{device_buffers[d], lease->data(), bytes};
    auto transfer = engine.enqueue(std::span(&copy, 1), lease);
    lease.reset(); // the engine's hold is now the only one
    events[k] = transfer->event().value();
    transfer->make_stream_wait(consumer.view());
    device->enqueue_host_function(consumer.view(), [&, k, d, bytes] {
      for (std::size_t i = 0; i < bytes; ++i) {
        if (device_buffers[d][i] != pattern(k, i)) {
          wrong.fetch_add(1, std::memory_order_relaxed);
          return;
        }
      }
      verified.fetch_add(1, std::memory_order_relaxed);
    });
    device->record_event(checked[d]->view(), consumer.view());
    window[k % slots] = std::move(transfer);
    if (k == 1000) {
      pooled_bytes_after_warmup = pool->stats().pooled_bytes;
    }
  }
  for (auto &event : checked) {
    device->synchronize_event(event->view());
  }
  for (auto &transfer : window) {
    if (transfer != nullptr) {
      transfer->synchronize();
      wait_until([&] { return !transfer->holding(); });
    }
  }
  CHECK(device->first_error().empty()); // the fingerprint check never fired
  CHECK_EQ(wrong.load(), 0u);
  CHECK_EQ(verified.load(), batches);
  const auto pool_stats = pool->stats();
  CHECK_EQ(pool_stats.one_off_allocations, 0u); // only the slots were ever used
  CHECK_EQ(pool_stats.slots_in_use, 0u);
  CHECK_EQ(pool_stats.pinned_fallbacks, 0u);
  CHECK_EQ(pool_stats.pinned_bytes, pool_stats.pooled_bytes);
  CHECK_LE(pool_stats.pooled_bytes, slots * 64u * 1024u); // memory flat: at most one step a slot
  if (batches > 1000) {
    CHECK_EQ(pool_stats.pooled_bytes, pooled_bytes_after_warmup); // and no growth after warm-up
  }
  const auto engine_stats = engine.stats();
  CHECK_EQ(engine_stats.transfers, batches);
  CHECK_EQ(engine_stats.released, batches);
  CHECK_EQ(engine_stats.in_flight, 0u);
  CHECK_EQ(device->stats().events, destinations + window.size() - 0u);
  // Ordering: the consumer waited on each batch's own event, first record, in batch order.
  const auto waits = device->waits();
  const std::size_t logged = std::min<std::size_t>(batches, 4096);
  REQUIRE(waits.size() >= logged);
  for (std::size_t i = 0; i < logged; ++i) {
    const auto &wait = waits[waits.size() - logged + i];
    const std::size_t k = batches - logged + i;
    CHECK(wait.stream == consumer.view());
    CHECK_EQ(wait.event.value(), events[k]);
    CHECK_EQ(wait.generation, 1u);
  }
  window.clear();
  for (std::byte *buffer : device_buffers) {
    device->free_device(buffer, consumer.view());
  }
}

} // namespace

// 100,000 batches in all, a third through each slot count (each its own test, so each gets the
// harness's hang watchdog to itself: under ThreadSanitizer on a loaded machine one run of all
// three took longer than the watchdog's 90 s).
std::size_t batches_for(std::size_t part) {
  const std::size_t total = dynbatch::testing::env_size("DYNBATCH_STAGING_BATCHES", 100'000);
  return part < 2 ? total / 3 : total - 2 * (total / 3);
}

TEST_CASE(a_third_of_100k_batches_through_two_pinned_slots) {
  run_pipeline(2, batches_for(0), 1);
}

TEST_CASE(a_third_of_100k_batches_through_three_pinned_slots) {
  run_pipeline(3, batches_for(1), 2);
}

TEST_CASE(a_third_of_100k_batches_through_four_pinned_slots) {
  run_pipeline(4, batches_for(2), 3);
}

TEST_CASE(a_slot_reused_before_its_copy_ran_is_caught_by_the_fingerprint) {
  auto device = std::make_shared<SimulatedDevice>(SimulatedDeviceOptions{0, 0, 0, false});
  auto pool = StagingPool::create(1, device);
  CopyEngine engine(device);
  std::vector<std::byte> destination(4096);
  auto gate = device->enqueue_gate(engine.stream()); // the copy cannot run yet

  auto lease = pool->acquire(4096);
  std::memset(lease->data(), 0x11, 4096);
  const LeafCopy copy{destination.data(), lease->data(), 4096};
  // The mistake: no hold, so the slot returns to the pool while its copy is pending.
  auto transfer = engine.enqueue(std::span(&copy, 1), nullptr);
  lease.reset();
  auto next = pool->acquire(4096);
  CHECK(next->pooled());                 // the same slot, handed out again
  std::memset(next->data(), 0x22, 4096); // the next batch collated over it
  gate->open();
  const std::string error = error_of([&] { transfer->synchronize(); });
  CHECK(error.find("changed between enqueue and execution") != std::string::npos);
  CHECK(!device->first_error().empty());
}

TEST_CASE(the_engine_holds_the_slot_until_its_copy_ran) {
  auto device = std::make_shared<SimulatedDevice>(SimulatedDeviceOptions{0, 0, 0, false});
  auto pool = StagingPool::create(1, device);
  CopyEngine engine(device);
  std::vector<std::byte> destination(4096);
  auto gate = device->enqueue_gate(engine.stream());

  auto lease = pool->acquire(4096);
  std::byte *const slot = lease->data();
  std::memset(slot, 0x11, 4096);
  const LeafCopy copy{destination.data(), slot, 4096};
  auto transfer = engine.enqueue(std::span(&copy, 1), lease);
  lease.reset();
  CHECK(transfer->holding());
  CHECK_EQ(pool->stats().slots_in_use, 1u); // still held by the pending copy
  CHECK(!transfer->done());
  auto next = pool->acquire(4096); // the pool never blocks: a one-off buffer instead
  CHECK(!next->pooled());
  CHECK(next->data() != slot);
  std::memset(next->data(), 0x22, 4096);
  next.reset();
  gate->open();
  transfer->synchronize();
  wait_until([&] { return !transfer->holding(); });
  CHECK_EQ(pool->stats().slots_in_use, 0u);
  CHECK(destination[4095] == std::byte{0x11});
  CHECK(device->first_error().empty());
  auto again = pool->acquire(4096);
  CHECK(again->pooled());
  CHECK(again->data() == slot);
}

TEST_CASE(a_host_tensor_still_alive_keeps_the_slot_after_the_copy) {
  // The batch was also handed out on the host: the slot returns only when both are done.
  auto device = std::make_shared<SimulatedDevice>(SimulatedDeviceOptions{0, 0, 0, false});
  auto pool = StagingPool::create(1, device);
  CopyEngine engine(device);
  std::vector<std::byte> destination(64);
  auto lease = pool->acquire(64);
  std::shared_ptr<const void> host_tensor = lease; // what a DLPack export holds
  const LeafCopy copy{destination.data(), lease->data(), 64};
  auto transfer = engine.enqueue(std::span(&copy, 1), lease);
  lease.reset();
  transfer->synchronize();
  wait_until([&] { return !transfer->holding(); });
  CHECK_EQ(pool->stats().slots_in_use, 1u);
  host_tensor.reset();
  CHECK_EQ(pool->stats().slots_in_use, 0u);
}

TEST_CASE(a_lost_device_fails_pending_transfers_and_nothing_hangs) {
  auto device = std::make_shared<SimulatedDevice>(SimulatedDeviceOptions{0, 0, 0, false});
  auto pool = StagingPool::create(2, device);
  std::shared_ptr<dynbatch::Transfer> transfer;
  std::vector<std::byte> destination(256);
  {
    CopyEngine engine(device);
    device->enqueue_gate(engine.stream()); // never opened: the copy stays pending
    auto lease = pool->acquire(256);
    const LeafCopy copy{destination.data(), lease->data(), 256};
    transfer = engine.enqueue(std::span(&copy, 1), lease);
    lease.reset();
    std::thread waiter([&] {
      const std::string error = error_of([&] { transfer->synchronize(); });
      CHECK(error.find("device lost: reset by the test") != std::string::npos);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    device->fail("reset by the test");
    waiter.join();
    wait_until([&] { return !transfer->holding(); });
    CHECK(engine.first_error().find("device lost") != std::string::npos);
    CHECK_EQ(engine.stats().failures, 1u);
    const std::string error = error_of([&] { engine.enqueue(std::span(&copy, 1), nullptr); });
    CHECK(error.find("device lost") != std::string::npos);
  } // the destructor returns: no hang on a dead device
  CHECK(error_of([&] { transfer->done(); }).find("device lost") != std::string::npos);
  CHECK_EQ(pool->stats().slots_in_use, 0u); // the hold was dropped
}

TEST_CASE(pinning_failure_falls_back_to_pageable_slots_with_a_warning_in_stats) {
  SimulatedDeviceOptions options{0, 0, 0, false};
  options.pinned_limit_bytes = 100 * 1024; // room for one 64 KiB slot
  auto device = std::make_shared<SimulatedDevice>(options);
  auto pool = StagingPool::create(2, device);
  auto first = pool->acquire(1000);
  auto second = pool->acquire(1000); // the second slot cannot be pinned
  auto stats = pool->stats();
  CHECK_EQ(stats.pinned_bytes, 64u * 1024u);
  CHECK_EQ(stats.pooled_bytes, 128u * 1024u);
  CHECK_EQ(stats.pinned_fallbacks, 1u);
  CHECK(stats.pinned_error.find("out of page-locked memory") != std::string::npos);
  CHECK_EQ(reinterpret_cast<std::uintptr_t>(second->data()) % dynbatch::page_size, 0u);
  std::memset(second->data(), 1, second->capacity());
  first.reset();
  second.reset();
  pool.reset();
  CHECK_EQ(device->stats().pinned_bytes, 0u); // pinned buffers went back to the device
  CHECK(device->first_error().empty());
}

TEST_CASE(batch_leaf_copies_take_each_leaf_from_its_region_of_the_slot) {
  const dynbatch::BatchLayout layout({
      dynbatch::LeafLayout{{3}, {2, 32, 1}, 12, false, {}},
      dynbatch::LeafLayout{{-1, 2}, {0, 64, 1}, 16, true, std::vector<std::byte>(8)},
  });
  std::vector<std::byte> slot(layout.batch_bytes(5, 7));
  std::byte a[1];
  std::byte b[1];
  void *const destinations[] = {a, b};
  const auto copies = dynbatch::batch_leaf_copies(layout, slot.data(), 5, 7, destinations);
  REQUIRE(copies.size() == 2u);
  CHECK(copies[0].source == slot.data());
  CHECK_EQ(copies[0].bytes, 60u);
  CHECK(copies[1].source == slot.data() + layout.leaf_offset(1, 5, 7));
  CHECK_EQ(copies[1].bytes, 5u * 7u * 16u);
  CHECK(copies[1].destination == b);
  void *const one[] = {a};
  CHECK_THROWS_AS(dynbatch::batch_leaf_copies(layout, slot.data(), 5, 7, one),
                  std::invalid_argument);
}

TEST_CASE(copies_overlap_compute_in_simulated_time) {
  // Copy 3 ms and compute 3 ms per batch. Prefetching (copy k+1 enqueued before the model
  // runs batch k) takes about N x 3 ms; copying then computing each batch in turn, N x 6 ms.
  constexpr std::size_t n = 40;
  constexpr dynbatch::Nanoseconds copy_ns = 3 * ms;
  constexpr dynbatch::Nanoseconds compute_ns = 3 * ms;
  auto run = [&](bool prefetch) {
    auto device =
        std::make_shared<SimulatedDevice>(SimulatedDeviceOptions{copy_ns, copy_ns, 0, false});
    auto pool = StagingPool::create(3, device);
    CopyEngine engine(device);
    dynbatch::OwnedStream compute(device);
    dynbatch::OwnedEvent computed(device);
    std::vector<std::byte> destination(2 * 4096);
    auto stage = [&](std::size_t k) {
      auto lease = pool->acquire(4096);
      std::memset(lease->data(), static_cast<int>(k), 4096);
      const LeafCopy copy{destination.data() + (k % 2) * 4096, lease->data(), 4096};
      return engine.enqueue(std::span(&copy, 1), lease);
    };
    std::shared_ptr<dynbatch::Transfer> next = stage(0);
    for (std::size_t k = 0; k < n; ++k) {
      std::shared_ptr<dynbatch::Transfer> current = std::move(next);
      if (prefetch && k + 1 < n) {
        next = stage(k + 1);
      }
      current->make_stream_wait(compute.view());
      device->enqueue_delay(compute.view(), compute_ns); // the model's kernels
      device->record_event(computed.view(), compute.view());
      device->synchronize_event(computed.view()); // the host reads the model's output
      if (!prefetch && k + 1 < n) {
        next = stage(k + 1);
      }
    }
    return device->host_time_ns();
  };
  const dynbatch::Nanoseconds overlapped = run(true);
  const dynbatch::Nanoseconds serial = run(false);
  const double ideal = static_cast<double>(n * std::max(copy_ns, compute_ns));
  CHECK_EQ(overlapped, static_cast<dynbatch::Nanoseconds>(n + 1) * 3 * ms); // one copy not hidden
  CHECK_LE(static_cast<double>(overlapped) / ideal, 1.1);
  CHECK_EQ(serial, static_cast<dynbatch::Nanoseconds>(n) * 6 * ms); // no prefetch: no overlap
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
