#include "dynbatch/simulated_device.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace dynbatch {
namespace {

// cudaMalloc's alignment; enough for any vector width the gather uses.
constexpr std::size_t device_alignment = 256;

// Not cryptographic: it only has to change when a staging slot is overwritten.
std::uint64_t fingerprint(const void *data, std::size_t bytes) {
  const auto *p = static_cast<const unsigned char *>(data);
  std::uint64_t hash = 0x9e3779b97f4a7c15ull ^ bytes;
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t word = 0;
    std::memcpy(&word, p + i, 8);
    hash = (hash ^ word) * 0xff51afd7ed558ccdull;
    hash ^= hash >> 32;
  }
  for (; i < bytes; ++i) {
    hash = (hash ^ p[i]) * 0x100000001b3ull;
  }
  return hash;
}

void *aligned_or_throw(std::size_t alignment, std::size_t bytes, const std::string &what) {
  void *pointer =
      std::aligned_alloc(alignment, align_up(std::max<std::size_t>(bytes, 1), alignment));
  if (pointer == nullptr) {
    throw DeviceError("simulated: " + what + ": out of memory");
  }
  return pointer;
}

void gather_on_host(const GatherLaunch &launch) {
  const gather::Shape &shape = launch.shape;
  const std::uint32_t width = gather::vector_width(shape.row_bytes, gather_address_bits(launch));
  const std::uint32_t *lengths = launch.lengths.empty() ? nullptr : launch.lengths.data();
  auto *out = static_cast<std::byte *>(launch.destination);
  const std::uint64_t units = gather::unit_count(shape, width);
  for (std::uint64_t unit = 0; unit < units; ++unit) {
    const gather::Source source = gather::locate(shape, lengths, unit * width);
    const std::byte *from =
        source.pad
            ? launch.pad.data() + source.source_offset
            : static_cast<const std::byte *>(launch.sources[source.sample]) + source.source_offset;
    std::memcpy(out + unit * width, from, width);
  }
}

} // namespace

void SimulatedDevice::Gate::open() {
  {
    std::lock_guard lock(device_->mutex_);
    open_ = true;
  }
  device_->event_changed_.notify_all();
}

SimulatedDevice::SimulatedDevice(SimulatedDeviceOptions options)
    : options_(options), random_(options.seed) {
  if (options_.min_delay_ns < 0 || options_.max_delay_ns < options_.min_delay_ns) {
    throw std::invalid_argument("SimulatedDevice: delays must satisfy 0 <= min <= max");
  }
}

SimulatedDevice::~SimulatedDevice() {
  std::vector<std::uintptr_t> handles;
  {
    std::lock_guard lock(mutex_);
    for (const auto &[handle, stream] : streams_) {
      handles.push_back(handle);
    }
  }
  for (const std::uintptr_t handle : handles) {
    destroy_stream(StreamView(handle));
  }
  for (const auto &[pointer, bytes] : pinned_) {
    std::free(pointer);
  }
  for (const auto &[pointer, bytes] : device_memory_) {
    std::free(pointer);
  }
}

void SimulatedDevice::throw_if_failed_locked(const char *call) const {
  if (!errors_.empty()) {
    throw DeviceError(std::string("simulated: ") + call + ": " + errors_.front());
  }
}

void SimulatedDevice::record_error_locked(std::string message) {
  errors_.push_back(std::move(message));
  event_changed_.notify_all();
}

Nanoseconds &SimulatedDevice::host_clock_locked() const {
  return host_clocks_[std::this_thread::get_id()];
}

Nanoseconds SimulatedDevice::draw_delay_locked() {
  if (options_.max_delay_ns == options_.min_delay_ns) {
    return options_.min_delay_ns;
  }
  std::uniform_int_distribution<Nanoseconds> delay(options_.min_delay_ns, options_.max_delay_ns);
  return delay(random_);
}

SimulatedDevice::Stream &SimulatedDevice::stream_locked(StreamView stream, const char *call) {
  const auto found = streams_.find(stream.value());
  if (found == streams_.end() || found->second->stopping) {
    throw DeviceError(std::string("simulated: ") + call + ": unknown stream " +
                      std::to_string(stream.value()));
  }
  return *found->second;
}

SimulatedDevice::Event &SimulatedDevice::event_locked(EventView event, const char *call) {
  const auto found = events_.find(event.value());
  if (found == events_.end()) {
    throw DeviceError(std::string("simulated: ") + call + ": unknown event " +
                      std::to_string(event.value()));
  }
  return found->second;
}

void *SimulatedDevice::allocate_pinned(std::size_t bytes) {
  std::unique_lock lock(mutex_);
  throw_if_failed_locked("allocate_pinned");
  if (bytes >
      options_.pinned_limit_bytes - std::min(stats_.pinned_bytes, options_.pinned_limit_bytes)) {
    throw DeviceError("simulated: allocate_pinned(" + std::to_string(bytes) +
                      " bytes): out of page-locked memory (limit " +
                      std::to_string(options_.pinned_limit_bytes) + " bytes)");
  }
  stats_.pinned_bytes += bytes; // reserved before the allocation, so the limit holds across threads
  lock.unlock();
  void *pointer = nullptr;
  try {
    pointer = aligned_or_throw(page_size, bytes, "allocate_pinned");
  } catch (...) {
    lock.lock();
    stats_.pinned_bytes -= bytes;
    throw;
  }
  lock.lock();
  pinned_[pointer] = bytes;
  return pointer;
}

void SimulatedDevice::free_pinned(void *pointer) noexcept {
  if (pointer == nullptr) {
    return;
  }
  {
    std::lock_guard lock(mutex_);
    const auto found = pinned_.find(pointer);
    if (found == pinned_.end()) {
      record_error_locked("free_pinned of a pointer allocate_pinned did not return");
      return;
    }
    stats_.pinned_bytes -= found->second;
    pinned_.erase(found);
  }
  std::free(pointer);
}

void *SimulatedDevice::allocate_device(std::size_t bytes, StreamView stream) {
  {
    std::lock_guard lock(mutex_);
    throw_if_failed_locked("allocate_device");
    stream_locked(stream, "allocate_device");
  }
  void *pointer = aligned_or_throw(device_alignment, bytes, "allocate_device");
  std::lock_guard lock(mutex_);
  device_memory_[pointer] = bytes;
  stats_.device_bytes += bytes;
  return pointer;
}

void SimulatedDevice::free_device(void *pointer, StreamView stream) noexcept {
  if (pointer == nullptr) {
    return;
  }
  auto release = [this, pointer] {
    {
      std::lock_guard lock(mutex_);
      const auto found = device_memory_.find(pointer);
      if (found == device_memory_.end()) {
        record_error_locked("free_device of a pointer allocate_device did not return");
        return;
      }
      stats_.device_bytes -= found->second;
      device_memory_.erase(found);
    }
    std::free(pointer);
  };
  try {
    // Stream-ordered, like cudaFreeAsync: earlier work on the stream may still use it.
    enqueue_host_function(stream, release);
  } catch (...) {
    release(); // an unknown stream or a failed device: nothing will run there any more
  }
}

StreamView SimulatedDevice::create_stream() {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked("create_stream");
  const std::uintptr_t handle = next_handle_++;
  auto stream = std::make_unique<Stream>();
  Stream *raw = stream.get();
  streams_.emplace(handle, std::move(stream));
  raw->worker = std::thread([this, raw] { run(*raw); });
  ++stats_.streams;
  return StreamView(handle);
}

void SimulatedDevice::destroy_stream(StreamView stream) noexcept {
  std::unique_ptr<Stream> owned;
  {
    std::lock_guard lock(mutex_);
    const auto found = streams_.find(stream.value());
    if (found == streams_.end() || found->second->stopping) {
      return;
    }
    found->second->stopping = true; // drains what was enqueued (cudaStreamDestroy does too)
    found->second->changed.notify_all();
  }
  event_changed_.notify_all(); // gates of a stopping stream open
  std::thread worker;
  {
    std::lock_guard lock(mutex_);
    worker = std::move(streams_.at(stream.value())->worker);
  }
  worker.join();
  std::lock_guard lock(mutex_);
  const auto found = streams_.find(stream.value());
  owned = std::move(found->second);
  streams_.erase(found);
  --stats_.streams;
}

EventView SimulatedDevice::create_event() {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked("create_event");
  const std::uintptr_t handle = next_handle_++;
  events_.emplace(handle, Event{});
  ++stats_.events;
  return EventView(handle);
}

void SimulatedDevice::destroy_event(EventView event) noexcept {
  std::lock_guard lock(mutex_);
  if (events_.erase(event.value()) == 1) {
    --stats_.events;
  }
}

void SimulatedDevice::enqueue(StreamView stream, Operation operation, const char *call) {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked(call);
  Stream &target = stream_locked(stream, call);
  operation.ready_ns = host_clock_locked();
  target.operations.push_back(std::move(operation));
  target.changed.notify_one();
}

void SimulatedDevice::copy_to_device(void *destination, const void *source, std::size_t bytes,
                                     StreamView stream) {
  if (bytes > 0 && (destination == nullptr || source == nullptr)) {
    throw DeviceError("simulated: copy_to_device: a null pointer");
  }
  Operation operation;
  operation.kind = OpKind::copy;
  operation.destination = destination;
  operation.source = source;
  operation.bytes = bytes;
  operation.fingerprint = fingerprint(source, bytes);
  {
    std::lock_guard lock(mutex_);
    operation.delay_ns = draw_delay_locked();
  }
  enqueue(stream, std::move(operation), "copy_to_device");
}

void SimulatedDevice::enqueue_gather(const GatherLaunch &launch, StreamView stream) {
  Operation operation;
  operation.kind = OpKind::gather;
  operation.gather_sources =
      std::make_shared<std::vector<const void *>>(launch.sources.begin(), launch.sources.end());
  operation.gather_lengths =
      std::make_shared<std::vector<std::uint32_t>>(launch.lengths.begin(), launch.lengths.end());
  operation.gather = std::make_shared<GatherLaunch>(launch);
  operation.gather->sources = *operation.gather_sources;
  operation.gather->lengths = *operation.gather_lengths;
  {
    std::lock_guard lock(mutex_);
    operation.delay_ns = draw_delay_locked();
  }
  enqueue(stream, std::move(operation), "gather");
}

void SimulatedDevice::record_event(EventView event, StreamView stream) {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked("record_event");
  Stream &target = stream_locked(stream, "record_event");
  Event &state = event_locked(event, "record_event");
  Operation operation;
  operation.kind = OpKind::record;
  operation.event = event.value();
  operation.generation = ++state.recorded;
  operation.ready_ns = host_clock_locked();
  target.operations.push_back(std::move(operation));
  target.changed.notify_one();
}

bool SimulatedDevice::event_done(EventView event) {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked("event_done");
  const Event &state = event_locked(event, "event_done");
  // Done in simulated time too: a copy that ran early in real time has not, for this thread,
  // finished before its clock reaches it (else a poll would let the clock jump ahead).
  return state.completed >= state.recorded && state.time_ns <= host_clock_locked();
}

void SimulatedDevice::synchronize_event(EventView event) {
  std::unique_lock lock(mutex_);
  throw_if_failed_locked("synchronize_event");
  const std::uint64_t generation = event_locked(event, "synchronize_event").recorded;
  event_changed_.wait(lock, [&] {
    const auto found = events_.find(event.value());
    return !errors_.empty() || found == events_.end() || found->second.completed >= generation;
  });
  throw_if_failed_locked("synchronize_event");
  const Event &state = event_locked(event, "synchronize_event");
  Nanoseconds &clock = host_clock_locked();
  clock = std::max(clock, state.time_ns);
}

void SimulatedDevice::stream_wait_event(StreamView stream, EventView event) {
  std::lock_guard lock(mutex_);
  throw_if_failed_locked("stream_wait_event");
  Stream &target = stream_locked(stream, "stream_wait_event");
  const Event &state = event_locked(event, "stream_wait_event");
  Operation operation;
  operation.kind = OpKind::wait;
  operation.event = event.value();
  operation.generation = state.recorded; // 0: never recorded, a no-op as in CUDA
  operation.ready_ns = host_clock_locked();
  target.operations.push_back(std::move(operation));
  target.changed.notify_one();
  ++stats_.waits;
  waits_.push_back(WaitRecord{stream, event, state.recorded});
  while (waits_.size() > options_.wait_log_capacity) {
    waits_.pop_front();
  }
}

void SimulatedDevice::enqueue_delay(StreamView stream, Nanoseconds ns) {
  Operation operation;
  operation.kind = OpKind::delay;
  operation.delay_ns = std::max<Nanoseconds>(ns, 0);
  enqueue(stream, std::move(operation), "enqueue_delay");
}

void SimulatedDevice::enqueue_host_function(StreamView stream, std::function<void()> function) {
  Operation operation;
  operation.kind = OpKind::host_function;
  operation.function = std::move(function);
  enqueue(stream, std::move(operation), "enqueue_host_function");
}

std::shared_ptr<SimulatedDevice::Gate> SimulatedDevice::enqueue_gate(StreamView stream) {
  auto gate = std::make_shared<Gate>();
  gate->device_ = this;
  Operation operation;
  operation.kind = OpKind::gate;
  operation.gate = gate;
  enqueue(stream, std::move(operation), "enqueue_gate");
  return gate;
}

void SimulatedDevice::host_work(Nanoseconds ns) {
  {
    std::lock_guard lock(mutex_);
    host_clock_locked() += std::max<Nanoseconds>(ns, 0);
  }
  if (options_.real_time && ns > 0) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
  }
}

Nanoseconds SimulatedDevice::host_time_ns() const {
  std::lock_guard lock(mutex_);
  return host_clock_locked();
}

Nanoseconds SimulatedDevice::event_time_ns(EventView event) const {
  std::lock_guard lock(mutex_);
  const auto found = events_.find(event.value());
  if (found == events_.end() || found->second.completed == 0) {
    return 0;
  }
  return found->second.time_ns;
}

std::uint64_t SimulatedDevice::event_generation(EventView event) const {
  std::lock_guard lock(mutex_);
  const auto found = events_.find(event.value());
  return found == events_.end() ? 0 : found->second.recorded;
}

void SimulatedDevice::fail(const std::string &reason) {
  std::lock_guard lock(mutex_);
  record_error_locked("device lost: " + reason);
}

std::string SimulatedDevice::first_error() const {
  std::lock_guard lock(mutex_);
  return errors_.empty() ? std::string() : errors_.front();
}

std::vector<std::string> SimulatedDevice::errors() const {
  std::lock_guard lock(mutex_);
  return errors_;
}

std::vector<WaitRecord> SimulatedDevice::waits() const {
  std::lock_guard lock(mutex_);
  return {waits_.begin(), waits_.end()};
}

SimulatedDeviceStats SimulatedDevice::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void SimulatedDevice::run(Stream &stream) {
  std::unique_lock lock(mutex_);
  for (;;) {
    stream.changed.wait(lock, [&] { return stream.stopping || !stream.operations.empty(); });
    if (stream.operations.empty()) {
      return; // stopping, and everything enqueued before has run
    }
    Operation operation = std::move(stream.operations.front());
    stream.operations.pop_front();
    Nanoseconds start = std::max(stream.clock_ns, operation.ready_ns);
    switch (operation.kind) {
    case OpKind::wait: {
      event_changed_.wait(lock, [&] {
        const auto found = events_.find(operation.event);
        return !errors_.empty() || found == events_.end() ||
               found->second.completed >= operation.generation;
      });
      const auto found = events_.find(operation.event);
      if (found != events_.end() && operation.generation > 0) {
        start = std::max(start, found->second.time_ns);
      }
      break;
    }
    case OpKind::gate:
      event_changed_.wait(
          lock, [&] { return operation.gate->open_ || stream.stopping || !errors_.empty(); });
      break;
    case OpKind::record: {
      const auto found = events_.find(operation.event);
      if (found != events_.end() && operation.generation > found->second.completed) {
        found->second.completed = operation.generation;
        found->second.time_ns = start;
      }
      event_changed_.notify_all();
      break;
    }
    case OpKind::copy:
    case OpKind::gather:
    case OpKind::delay:
    case OpKind::host_function:
      if (errors_.empty() || operation.kind == OpKind::host_function) {
        lock.unlock();
        execute(operation);
        lock.lock();
      }
      break;
    }
    stream.clock_ns = start + operation.delay_ns;
  }
}

// Runs without the device lock: a copy's bytes are the caller's, ordered by events.
void SimulatedDevice::execute(Operation &operation) {
  if (options_.real_time && operation.delay_ns > 0) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(operation.delay_ns));
  }
  switch (operation.kind) {
  case OpKind::copy: {
    if (fingerprint(operation.source, operation.bytes) != operation.fingerprint) {
      std::lock_guard lock(mutex_);
      record_error_locked(
          "the source of a " + std::to_string(operation.bytes) +
          "-byte copy changed between enqueue and execution (a staging buffer reused before its "
          "copy ran)");
      return;
    }
    if (operation.bytes > 0) {
      std::memcpy(operation.destination, operation.source, operation.bytes);
    }
    std::lock_guard lock(mutex_);
    ++stats_.copies;
    stats_.copied_bytes += operation.bytes;
    return;
  }
  case OpKind::gather: {
    gather_on_host(*operation.gather);
    std::lock_guard lock(mutex_);
    ++stats_.gathers;
    return;
  }
  case OpKind::host_function:
    operation.function();
    return;
  default:
    return;
  }
}

} // namespace dynbatch
