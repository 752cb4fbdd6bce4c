#include "dynbatch/copy_engine.hpp"

#include <stdexcept>

namespace dynbatch {

std::vector<LeafCopy> batch_leaf_copies(const BatchLayout &layout, const std::byte *slot,
                                        std::size_t batch_size, std::size_t padded_length,
                                        std::span<void *const> destinations) {
  if (destinations.size() != layout.leaf_count()) {
    throw std::invalid_argument("batch_leaf_copies: " + std::to_string(destinations.size()) +
                                " destinations for " + std::to_string(layout.leaf_count()) +
                                " leaves");
  }
  std::vector<LeafCopy> copies;
  copies.reserve(destinations.size());
  for (std::size_t j = 0; j < destinations.size(); ++j) {
    copies.push_back(LeafCopy{destinations[j],
                              slot + layout.leaf_offset(j, batch_size, padded_length),
                              layout.leaf_bytes(j, batch_size, padded_length)});
  }
  return copies;
}

Transfer::Transfer(std::shared_ptr<Device> device, std::uint64_t sequence,
                   std::shared_ptr<const void> hold)
    : device_(std::move(device)), sequence_(sequence), event_(device_), hold_(std::move(hold)) {}

void Transfer::throw_if_failed() const {
  std::lock_guard lock(mutex_);
  if (!error_.empty()) {
    throw DeviceError(error_);
  }
}

bool Transfer::done() {
  throw_if_failed();
  return device_->event_done(event_.view());
}

void Transfer::synchronize() {
  throw_if_failed();
  device_->synchronize_event(event_.view());
}

void Transfer::make_stream_wait(StreamView consumer) {
  throw_if_failed();
  device_->stream_wait_event(consumer, event_.view());
}

void Transfer::release_hold(std::string error) noexcept {
  if (!error.empty()) {
    std::lock_guard lock(mutex_);
    error_ = std::move(error);
  }
  hold_.reset();
  holding_.store(false, std::memory_order_release); // pairs with the acquire in holding()
}

CopyEngine::CopyEngine(std::shared_ptr<Device> device)
    : device_(std::move(device)), stream_(device_), releaser_([this] { release_in_order(); }) {}

CopyEngine::~CopyEngine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  releaser_.join();
}

std::shared_ptr<Transfer> CopyEngine::enqueue(std::span<const LeafCopy> copies,
                                              std::shared_ptr<const void> hold) {
  std::uint64_t sequence = 0;
  {
    std::lock_guard lock(mutex_);
    sequence = next_sequence_++;
  }
  auto transfer = std::make_shared<Transfer>(device_, sequence, std::move(hold));
  std::size_t enqueued = 0;
  std::uint64_t bytes = 0;
  try {
    for (const LeafCopy &copy : copies) {
      device_->copy_to_device(copy.destination, copy.source, copy.bytes, stream_.view());
      ++enqueued;
      bytes += copy.bytes;
    }
    device_->record_event(transfer->event(), stream_.view());
  } catch (...) {
    if (enqueued > 0) {
      // Copies already enqueued may still read the slot: keep it held until they ran.
      try {
        device_->record_event(transfer->event(), stream_.view());
        std::lock_guard lock(mutex_);
        in_flight_.push_back(transfer);
        ++stats_.in_flight;
        changed_.notify_all();
      } catch (...) {
        // The device is gone: nothing will read the slot any more; the hold drops with it.
      }
    }
    throw;
  }
  std::lock_guard lock(mutex_);
  in_flight_.push_back(transfer);
  ++stats_.transfers;
  ++stats_.in_flight;
  stats_.copies += enqueued;
  stats_.bytes += bytes;
  changed_.notify_all();
  return transfer;
}

void CopyEngine::release_in_order() {
  std::unique_lock lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return stopping_ || !in_flight_.empty(); });
    if (in_flight_.empty()) {
      return; // stopping, and every hold was dropped after its copy
    }
    std::shared_ptr<Transfer> transfer = in_flight_.front();
    lock.unlock();
    // One stream: events complete in order, so waiting for the oldest first loses nothing.
    std::string error;
    try {
      device_->synchronize_event(transfer->event());
    } catch (const std::exception &failure) {
      error = failure.what();
    }
    transfer->release_hold(error);
    lock.lock();
    in_flight_.pop_front();
    --stats_.in_flight;
    ++stats_.released;
    if (!error.empty()) {
      ++stats_.failures;
      if (first_error_.empty()) {
        first_error_ = error;
      }
    }
  }
}

CopyEngineStats CopyEngine::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

std::string CopyEngine::first_error() const {
  std::lock_guard lock(mutex_);
  return first_error_;
}

} // namespace dynbatch
