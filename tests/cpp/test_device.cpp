// The device seam on the simulated device: handle types, stream order, events, waits across
// streams, the fingerprint check, a lost device, simulated time, pinned and device memory; and
// the CUDA factory's clear error where no GPU is usable (this machine, and CPU-only builds).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "dynbatch/build_info.hpp"
#include "dynbatch/device.hpp"
#include "dynbatch/simulated_device.hpp"
#include "test_support.hpp"

using dynbatch::DeviceError;
using dynbatch::EventView;
using dynbatch::SimulatedDevice;
using dynbatch::SimulatedDeviceOptions;
using dynbatch::StreamView;

namespace {

// Handles convert from nothing implicitly: not 0, not nullptr, not each other.
static_assert(!std::is_constructible_v<StreamView, int>);
static_assert(!std::is_constructible_v<StreamView, std::nullptr_t>);
static_assert(!std::is_convertible_v<std::uintptr_t, StreamView>);
static_assert(std::is_constructible_v<StreamView, std::uintptr_t>);
static_assert(!std::is_convertible_v<StreamView, EventView>);
static_assert(!std::is_constructible_v<EventView, StreamView>);
static_assert(!std::is_constructible_v<EventView, int>);
static_assert(std::is_trivially_copyable_v<StreamView> && sizeof(StreamView) == sizeof(void *));

constexpr dynbatch::Nanoseconds ms = 1'000'000;

SimulatedDeviceOptions virtual_only(dynbatch::Nanoseconds delay = 0) {
  SimulatedDeviceOptions options;
  options.min_delay_ns = delay;
  options.max_delay_ns = delay;
  options.real_time = false;
  return options;
}

template <class F> std::string error_of(F &&call) {
  try {
    call();
  } catch (const DeviceError &error) {
    return error.what();
  }
  return "";
}

bool contains(const std::string &text, const std::string &part) {
  return text.find(part) != std::string::npos;
}

} // namespace

TEST_CASE(copies_on_a_stream_land_in_order_and_complete_the_event) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  std::vector<int> source(1000), destination(1000, -1);
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < source.size(); ++i) {
      source[i] = round * 10000 + static_cast<int>(i);
    }
    device->copy_to_device(destination.data(), source.data(), source.size() * sizeof(int),
                           stream.view());
    device->record_event(event.view(), stream.view());
    device->synchronize_event(event.view());
    CHECK(device->event_done(event.view()));
    CHECK(destination == source);
  }
  CHECK_EQ(device->stats().copies, 3u);
  CHECK_EQ(device->event_generation(event.view()), 3u);
}

TEST_CASE(an_event_never_recorded_is_done_and_a_wait_on_it_is_logged_as_generation_0) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  CHECK(device->event_done(event.view()));
  device->synchronize_event(event.view()); // returns at once
  device->stream_wait_event(stream.view(), event.view());
  const auto waits = device->waits();
  REQUIRE(waits.size() == 1u);
  CHECK(waits[0].stream == stream.view());
  CHECK(waits[0].event == event.view());
  CHECK_EQ(waits[0].generation, 0u);
}

TEST_CASE(a_stream_waiting_on_an_event_sees_the_copy_before_it) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream copy_stream(device);
  dynbatch::OwnedStream consumer(device);
  dynbatch::OwnedEvent copied(device);
  dynbatch::OwnedEvent consumed(device);
  std::uint64_t source = 0x1234'5678'9abc'def0ull;
  std::uint64_t destination = 0;
  std::atomic<std::uint64_t> seen{0};
  auto gate = device->enqueue_gate(copy_stream.view()); // the copy cannot run yet
  device->copy_to_device(&destination, &source, sizeof(source), copy_stream.view());
  device->record_event(copied.view(), copy_stream.view());
  device->stream_wait_event(consumer.view(), copied.view());
  device->enqueue_host_function(consumer.view(), [&] {
    seen.store(destination, std::memory_order_relaxed); // ordered by the event wait
  });
  device->record_event(consumed.view(), consumer.view());
  CHECK(!device->event_done(consumed.view())); // held behind the gated copy
  gate->open();
  device->synchronize_event(consumed.view());
  CHECK_EQ(seen.load(std::memory_order_relaxed), source);
  const auto waits = device->waits();
  REQUIRE(waits.size() == 1u);
  CHECK(waits[0].stream == consumer.view());
  CHECK(waits[0].event == copied.view());
  CHECK_EQ(waits[0].generation, 1u);
}

TEST_CASE(a_source_changed_before_its_copy_ran_fails_the_device_loudly) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  std::vector<std::byte> staging(4096, std::byte{1});
  std::vector<std::byte> destination(4096);
  auto gate = device->enqueue_gate(stream.view());
  device->copy_to_device(destination.data(), staging.data(), staging.size(), stream.view());
  device->record_event(event.view(), stream.view());
  staging[4000] = std::byte{2}; // reused before the copy ran: real hardware copies garbage
  gate->open();
  const std::string error = error_of([&] { device->synchronize_event(event.view()); });
  CHECK(contains(error, "changed between enqueue and execution"));
  CHECK(contains(device->first_error(), "4096-byte copy"));
  CHECK_EQ(device->errors().size(), 1u);
  // Sticky, as a CUDA error is: every later call says so.
  CHECK(contains(error_of([&] { device->event_done(event.view()); }), "staging buffer reused"));
  CHECK(contains(error_of([&] { device->create_event(); }), "create_event"));
  CHECK(destination[0] == std::byte{0}); // the copy did not land
}

TEST_CASE(a_lost_device_wakes_a_waiting_host_thread_with_an_error) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  dynbatch::OwnedStream other(device);
  auto gate = device->enqueue_gate(stream.view()); // never opened: only the failure can wake
  device->record_event(event.view(), stream.view());
  device->stream_wait_event(other.view(), event.view()); // a stream blocked on it, too
  std::string error;
  std::thread waiter([&] { error = error_of([&] { device->synchronize_event(event.view()); }); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  device->fail("the GPU fell off the bus");
  waiter.join();
  CHECK(contains(error, "device lost: the GPU fell off the bus"));
  CHECK(contains(error, "synchronize_event"));
  int value = 0;
  CHECK(contains(error_of([&] { device->copy_to_device(&value, &value, 4, other.view()); }),
                 "device lost"));
}

TEST_CASE(simulated_time_runs_streams_in_parallel_and_waits_in_order) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only(2 * ms)); // each copy 2 ms
  dynbatch::OwnedStream a(device);
  dynbatch::OwnedStream b(device);
  dynbatch::OwnedEvent a_done(device);
  dynbatch::OwnedEvent b_done(device);
  int x = 1;
  int y = 0;
  device->copy_to_device(&y, &x, sizeof(x), a.view());
  device->copy_to_device(&y, &x, sizeof(x), a.view());
  device->record_event(a_done.view(), a.view()); // at 4 ms
  device->enqueue_delay(b.view(), 3 * ms);
  device->stream_wait_event(b.view(), a_done.view());
  device->enqueue_delay(b.view(), 1 * ms);
  device->record_event(b_done.view(), b.view()); // max(3, 4) + 1 = 5 ms
  device->synchronize_event(b_done.view());
  CHECK_EQ(device->event_time_ns(a_done.view()), 4 * ms);
  CHECK_EQ(device->event_time_ns(b_done.view()), 5 * ms);
  CHECK_EQ(device->host_time_ns(), 5 * ms); // the host saw b complete
  device->host_work(2 * ms);
  CHECK_EQ(device->host_time_ns(), 7 * ms);
  // Work enqueued now starts no earlier than the host issued it.
  device->enqueue_delay(a.view(), 1 * ms);
  device->record_event(a_done.view(), a.view());
  device->synchronize_event(a_done.view());
  CHECK_EQ(device->event_time_ns(a_done.view()), 8 * ms);
  // A query answers in simulated time: a copy that already ran in real time is not done for a
  // thread whose clock has not reached its end.
  device->copy_to_device(&y, &x, sizeof(x), a.view());
  device->record_event(a_done.view(), a.view()); // 8 + 2 = 10 ms
  while (device->stats().copies < 3) {
    std::this_thread::yield();
  }
  CHECK(!device->event_done(a_done.view()));
  device->host_work(3 * ms);
  while (!device->event_done(a_done.view())) { // once its record ran (real time), it is done
    std::this_thread::yield();
  }
  CHECK_EQ(device->host_time_ns(), 11 * ms); // a query does not move the clock
  // Another host thread has its own clock.
  dynbatch::Nanoseconds other_thread = -1;
  std::thread([&] { other_thread = device->host_time_ns(); }).join();
  CHECK_EQ(other_thread, 0);
}

TEST_CASE(random_delays_are_bounded_and_reproducible_by_seed) {
  auto run = [](std::uint64_t seed) {
    SimulatedDeviceOptions options = virtual_only();
    options.min_delay_ns = 1 * ms;
    options.max_delay_ns = 3 * ms;
    options.seed = seed;
    auto device = std::make_shared<SimulatedDevice>(options);
    dynbatch::OwnedStream stream(device);
    dynbatch::OwnedEvent event(device);
    int x = 0;
    int y = 0;
    std::vector<dynbatch::Nanoseconds> times;
    for (int i = 0; i < 50; ++i) {
      device->copy_to_device(&y, &x, sizeof(x), stream.view());
      device->record_event(event.view(), stream.view());
      device->synchronize_event(event.view());
      times.push_back(device->event_time_ns(event.view()));
    }
    return times;
  };
  const auto first = run(7);
  CHECK(first == run(7));
  CHECK(first != run(8));
  dynbatch::Nanoseconds previous = 0;
  bool varied = false;
  for (const dynbatch::Nanoseconds time : first) {
    CHECK_GE(time - previous, 1 * ms);
    CHECK_LE(time - previous, 3 * ms);
    varied = varied || (time - previous) != 2 * ms;
    previous = time;
  }
  CHECK(varied);
}

TEST_CASE(pinned_memory_is_page_aligned_counted_and_limited) {
  SimulatedDeviceOptions options = virtual_only();
  options.pinned_limit_bytes = 64 * 1024;
  auto device = std::make_shared<SimulatedDevice>(options);
  void *first = device->allocate_pinned(40 * 1024);
  CHECK_EQ(reinterpret_cast<std::uintptr_t>(first) % dynbatch::page_size, 0u);
  std::memset(first, 0xab, 40 * 1024);
  CHECK_EQ(device->stats().pinned_bytes, 40u * 1024u);
  const std::string error = error_of([&] { device->allocate_pinned(40 * 1024); });
  CHECK(contains(error, "allocate_pinned(40960 bytes): out of page-locked memory"));
  device->free_pinned(first);
  CHECK_EQ(device->stats().pinned_bytes, 0u);
  void *second = device->allocate_pinned(40 * 1024); // room again
  device->free_pinned(second);
  CHECK(device->first_error().empty()); // an allocation failure is not a device failure
}

TEST_CASE(device_memory_is_freed_in_stream_order) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  auto *memory = static_cast<int *>(device->allocate_device(4096, stream.view()));
  CHECK_EQ(reinterpret_cast<std::uintptr_t>(memory) % 256, 0u);
  CHECK_EQ(device->stats().device_bytes, 4096u);
  auto gate = device->enqueue_gate(stream.view());
  int value = 42;
  device->copy_to_device(memory, &value, sizeof(value), stream.view());
  device->free_device(memory, stream.view()); // after the copy, not now
  CHECK_EQ(device->stats().device_bytes, 4096u);
  gate->open();
  device->record_event(event.view(), stream.view());
  device->synchronize_event(event.view());
  CHECK_EQ(device->stats().device_bytes, 0u);
  CHECK(device->first_error().empty());
}

TEST_CASE(calls_with_unknown_handles_or_null_pointers_name_the_call) {
  auto device = std::make_shared<SimulatedDevice>(virtual_only());
  int x = 0;
  CHECK(contains(
      error_of([&] { device->copy_to_device(&x, &x, sizeof(x), StreamView(std::uintptr_t{999})); }),
      "copy_to_device: unknown stream 999"));
  dynbatch::OwnedStream stream(device);
  CHECK(contains(error_of([&] { device->copy_to_device(nullptr, &x, 4, stream.view()); }),
                 "a null pointer"));
  CHECK(contains(error_of([&] { device->synchronize_event(EventView(std::uintptr_t{777})); }),
                 "unknown event 777"));
  CHECK_THROWS_AS(SimulatedDevice(SimulatedDeviceOptions{5, 1, 0, false}), std::invalid_argument);
}

TEST_CASE(the_cuda_factory_names_the_device_and_why_it_is_not_usable) {
  const dynbatch::DeviceProbe probe = dynbatch::probe_cuda_devices();
  if (probe.usable) { // a GPU machine: the backend comes up and names its card
    const auto device = dynbatch::make_cuda_device(0);
    CHECK(contains(device->name(), "cuda:0 ("));
  } else { // this machine, and every CPU-only build
    const std::string error = error_of([] { dynbatch::make_cuda_device(0); });
    CHECK(contains(error, "cuda:0: "));
    CHECK(contains(error, "built without CUDA") || contains(error, "no usable CUDA") ||
          contains(error, "no such device"));
  }
  const std::string error = error_of([] { dynbatch::make_cuda_device(-1); });
  CHECK(contains(error, "cuda:-1: "));
  CHECK(contains(error_of([&] { dynbatch::make_cuda_device(probe.device_count); }),
                 "cuda:" + std::to_string(probe.device_count) + ": "));
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
