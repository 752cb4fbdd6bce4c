#pragma once
// SimulatedDevice: the device seam on the host, for tests and for machines without a GPU.
//
// "Device" memory is host memory. Each stream is a worker thread that runs its operations in
// order, each copy or gather after a delay drawn uniformly from [min_delay_ns, max_delay_ns]
// (seeded). Events complete when their stream reaches them. It checks what real hardware would
// punish silently:
// - a copy fingerprints its source bytes at enqueue; if they changed before the copy ran (a
//   staging slot reused too early) the device fails: the error is recorded (first_error(),
//   errors()) and every later call throws DeviceError, as a sticky CUDA error would;
// - every stream_wait_event is logged (waits()): which stream waited on which event, and on
//   which record of it (its generation), so tests check ordering, not just results.
//
// Simulated time. Alongside the real threads, every operation gets a virtual start and end:
// it starts when its stream is free, when the host thread that enqueued it had reached that
// point (that thread's virtual clock), and, for a wait, when the event's record completed; it
// lasts its delay. A host thread's virtual clock advances by host_work() and moves to an
// event's completion time when the thread waits for it (synchronize_event); event_done answers
// in simulated time (completed, and at or before the calling thread's clock). Overlap is then
// measured deterministically in virtual nanoseconds, whatever the load on the machine. With
// real_time, delays are also slept, so the threads interleave as on hardware; without it operations
// run as fast as the host allows.
//
// Thread safety: every call may come from any thread. fail() simulates a lost device: pending
// and later operations fail, waits return by throwing.

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dynbatch/device.hpp"
#include "dynbatch/platform.hpp"

namespace dynbatch {

struct SimulatedDeviceOptions {
  Nanoseconds min_delay_ns = 0; // per copy or gather
  Nanoseconds max_delay_ns = 0;
  std::uint64_t seed = 0;
  bool real_time = true; // sleep the delays (and host_work) as well as counting them
  // allocate_pinned fails once this many pinned bytes are live (tests the pageable fallback).
  std::size_t pinned_limit_bytes = SIZE_MAX;
  std::size_t wait_log_capacity = 4096; // the last this many waits are kept
};

struct WaitRecord {
  StreamView stream;
  EventView event;
  std::uint64_t generation; // which record of the event (1 = the first)
};

struct SimulatedDeviceStats {
  std::uint64_t copies = 0;
  std::uint64_t copied_bytes = 0;
  std::uint64_t gathers = 0;
  std::uint64_t waits = 0;
  std::size_t pinned_bytes = 0;
  std::size_t device_bytes = 0;
  std::size_t streams = 0;
  std::size_t events = 0;
};

class SimulatedDevice final : public Device {
public:
  explicit SimulatedDevice(SimulatedDeviceOptions options = {});
  ~SimulatedDevice() override; // drains and joins every stream still alive

  std::string name() const override { return "simulated"; }
  void *allocate_pinned(std::size_t bytes) override;
  void free_pinned(void *pointer) noexcept override;
  void *allocate_device(std::size_t bytes, StreamView stream) override;
  void free_device(void *pointer, StreamView stream) noexcept override;
  StreamView create_stream() override;
  void destroy_stream(StreamView stream) noexcept override;
  EventView create_event() override;
  void destroy_event(EventView event) noexcept override;
  void copy_to_device(void *destination, const void *source, std::size_t bytes,
                      StreamView stream) override;
  void record_event(EventView event, StreamView stream) override;
  bool event_done(EventView event) override;
  void synchronize_event(EventView event) override;
  void stream_wait_event(StreamView stream, EventView event) override;

  // Simulation only.
  // Work of `ns` on `stream` (a model's kernels, say), in order with its other operations.
  void enqueue_delay(StreamView stream, Nanoseconds ns);
  // Runs `function` on the stream's worker in order (it sees every earlier operation's effect).
  void enqueue_host_function(StreamView stream, std::function<void()> function);
  // Holds `stream` at this point until the returned gate is opened (deterministic races).
  class Gate;
  std::shared_ptr<Gate> enqueue_gate(StreamView stream);
  // The calling host thread works for `ns` (virtual; also slept with real_time).
  void host_work(Nanoseconds ns);
  Nanoseconds host_time_ns() const; // the calling thread's virtual clock
  // Virtual time at which the event's latest record completed (0 if not yet, or never recorded).
  Nanoseconds event_time_ns(EventView event) const;
  std::uint64_t event_generation(EventView event) const; // records so far
  void fail(const std::string &reason);                  // the device is lost
  std::string first_error() const;                       // "" while healthy
  std::vector<std::string> errors() const;
  std::vector<WaitRecord> waits() const; // oldest first
  SimulatedDeviceStats stats() const;

  class Gate {
  public:
    void open();

  private:
    friend class SimulatedDevice;
    bool open_ = false; // guarded by the device's mutex
    SimulatedDevice *device_ = nullptr;
  };

private:
  enum class OpKind { copy, gather, record, wait, delay, host_function, gate };
  struct Operation {
    OpKind kind = OpKind::delay;
    Nanoseconds ready_ns = 0; // virtual: when the enqueuing host thread was there
    Nanoseconds delay_ns = 0;
    void *destination = nullptr;
    const void *source = nullptr;
    std::size_t bytes = 0;
    std::uint64_t fingerprint = 0;
    std::uintptr_t event = 0;
    std::uint64_t generation = 0;
    std::shared_ptr<GatherLaunch> gather;                      // owns its spans' storage
    std::shared_ptr<std::vector<const void *>> gather_sources; // behind gather->sources
    std::shared_ptr<std::vector<std::uint32_t>> gather_lengths;
    std::function<void()> function;
    std::shared_ptr<Gate> gate;
  };
  struct Stream {
    std::deque<Operation> operations;
    std::condition_variable changed;
    Nanoseconds clock_ns = 0; // virtual time its last operation ended
    bool stopping = false;
    bool busy = false;
    std::thread worker;
  };
  struct Event {
    std::uint64_t recorded = 0;  // generation of the latest record enqueued
    std::uint64_t completed = 0; // highest generation its stream reached
    Nanoseconds time_ns = 0;     // virtual completion of `completed`
  };

  void enqueue_gather(const GatherLaunch &launch, StreamView stream) override;
  void run(Stream &stream);
  void execute(Operation &operation);
  void enqueue(StreamView stream, Operation operation, const char *call);
  Stream &stream_locked(StreamView stream, const char *call);
  Event &event_locked(EventView event, const char *call);
  void throw_if_failed_locked(const char *call) const;
  void record_error_locked(std::string message);
  Nanoseconds &host_clock_locked() const;
  Nanoseconds draw_delay_locked();

  const SimulatedDeviceOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable event_changed_; // an event completed, a gate opened, or a failure
  std::map<std::uintptr_t, std::unique_ptr<Stream>> streams_;
  std::map<std::uintptr_t, Event> events_;
  std::map<void *, std::size_t> pinned_;
  std::map<void *, std::size_t> device_memory_;
  std::uintptr_t next_handle_ = 1;
  std::mt19937_64 random_;
  mutable std::map<std::thread::id, Nanoseconds> host_clocks_;
  std::vector<std::string> errors_;
  std::deque<WaitRecord> waits_;
  SimulatedDeviceStats stats_;
};

} // namespace dynbatch
