#pragma once
// The device seam: everything the data path needs of an accelerator, behind one interface.
//
// Two backends implement every function: CudaDevice (cuda/cuda_device.cpp, compiled only with
// CUDA: the runtime API mapped one call to one call) and SimulatedDevice (simulated_device.hpp:
// host memory as device memory, a worker thread per stream). The staging, slot-reuse and
// overlap logic (CopyEngine, StagingPool) is written once against this interface and proven on
// the simulated device; make_cuda_device() is the one place that knows whether CUDA exists.
//
// Contract
// - StreamView and EventView are strong, non-owning handles (rmm's cuda_stream_view): they
//   convert from nothing implicitly, not even 0 or nullptr; an integer handle from Python
//   becomes one only through the explicit constructor. The device that created a stream or
//   event owns it; destroy_* ends it (OwnedStream/OwnedEvent do so on scope exit).
// - Every call is thread-safe. Enqueueing calls (copy, record, wait, gather) return without
//   waiting for the work; synchronize_event blocks the calling host thread.
// - Stream semantics are CUDA's: operations on one stream run in order; record_event marks the
//   point the event completes at; stream_wait_event makes later work on a stream wait for the
//   event's latest record at the time of the call; an event never recorded counts as complete.
// - Every failure throws DeviceError naming the call and the device; after an asynchronous
//   failure (or a lost device) every later call throws too, and no wait hangs.
// - A copy's source must stay unchanged until the copy ran (its event completed): the
//   simulated device checks this and fails loudly when it does not hold.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>

#include "dynbatch/gather_index.hpp"

namespace dynbatch {

class DeviceError : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class Tag> class Handle {
public:
  constexpr explicit Handle(std::uintptr_t value) noexcept : value_(value) {}
  Handle(int) = delete;
  Handle(std::nullptr_t) = delete;
  constexpr std::uintptr_t value() const noexcept { return value_; }
  friend constexpr bool operator==(Handle, Handle) = default;

private:
  std::uintptr_t value_;
};
struct StreamTag {};
struct EventTag {};
} // namespace detail

using StreamView = detail::Handle<detail::StreamTag>; // a cudaStream_t, or a simulated stream id
using EventView = detail::Handle<detail::EventTag>;   // a cudaEvent_t, or a simulated event id

// One leaf of a gather of samples already on the device (index math: gather_index.hpp).
struct GatherLaunch {
  gather::Shape shape;
  std::span<const void *const> sources;   // one device pointer per sample, contiguous bytes
  std::span<const std::uint32_t> lengths; // padded: rows each sample supplies; empty: stacked
  void *destination = nullptr;            // output_bytes(shape) bytes of device memory
  std::array<std::byte, gather::pad_pattern_bytes> pad{}; // padded: one pad element, repeated
};

// One pad element repeated over the pattern. Throws std::invalid_argument unless its size
// (1..16 bytes) divides the pattern; empty: zeros.
std::array<std::byte, gather::pad_pattern_bytes> pad_pattern(std::span<const std::byte> element);

// Throws std::invalid_argument naming what is wrong (counts, lengths, null pointers).
void validate_gather(const GatherLaunch &launch);

// The bitwise OR of every address a gather touches (gather::vector_width's argument).
std::uint64_t gather_address_bits(const GatherLaunch &launch);

class Device {
public:
  virtual ~Device() = default;

  // "cuda:0 (NVIDIA H100 80GB HBM3)", "simulated": errors name the device with it.
  virtual std::string name() const = 0;

  // Page-locked host memory (page-aligned). Throws DeviceError when it cannot be had.
  virtual void *allocate_pinned(std::size_t bytes) = 0;
  virtual void free_pinned(void *pointer) noexcept = 0;

  // Device memory the core owns, ordered on `stream` (freeing it waits for earlier work there).
  virtual void *allocate_device(std::size_t bytes, StreamView stream) = 0;
  virtual void free_device(void *pointer, StreamView stream) noexcept = 0;

  virtual StreamView create_stream() = 0; // non-blocking: no implicit sync with stream 0
  virtual void destroy_stream(StreamView stream) noexcept = 0;
  virtual EventView create_event() = 0; // no timing
  virtual void destroy_event(EventView event) noexcept = 0;

  virtual void copy_to_device(void *destination, const void *source, std::size_t bytes,
                              StreamView stream) = 0;
  virtual void record_event(EventView event, StreamView stream) = 0;
  virtual bool event_done(EventView event) = 0;        // never blocks
  virtual void synchronize_event(EventView event) = 0; // blocks until done
  virtual void stream_wait_event(StreamView stream, EventView event) = 0;

  // One launch: validates, then enqueues the gather on `stream`.
  void gather(const GatherLaunch &launch, StreamView stream);

protected:
  virtual void enqueue_gather(const GatherLaunch &launch, StreamView stream) = 0;
};

// The CUDA backend for device `index`. Throws DeviceError, naming the index and the reason,
// when this build has no CUDA, there is no usable driver, or the index does not exist.
std::shared_ptr<Device> make_cuda_device(int index);

// A stream or event destroyed on scope exit.
class OwnedStream {
public:
  explicit OwnedStream(std::shared_ptr<Device> device)
      : device_(std::move(device)), stream_(device_->create_stream()) {}
  ~OwnedStream() { device_->destroy_stream(stream_); }
  OwnedStream(const OwnedStream &) = delete;
  OwnedStream &operator=(const OwnedStream &) = delete;
  StreamView view() const noexcept { return stream_; }

private:
  std::shared_ptr<Device> device_;
  StreamView stream_;
};

class OwnedEvent {
public:
  explicit OwnedEvent(std::shared_ptr<Device> device)
      : device_(std::move(device)), event_(device_->create_event()) {}
  ~OwnedEvent() { device_->destroy_event(event_); }
  OwnedEvent(const OwnedEvent &) = delete;
  OwnedEvent &operator=(const OwnedEvent &) = delete;
  EventView view() const noexcept { return event_; }

private:
  std::shared_ptr<Device> device_;
  EventView event_;
};

} // namespace dynbatch
