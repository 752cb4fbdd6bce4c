#include "dynbatch/fork_guard.hpp"

#include <atomic>
#include <pthread.h>

namespace dynbatch {
namespace {

std::atomic<std::uint64_t> generation{0};

// Runs in the child, single-threaded, before fork() returns there.
void on_fork_child() noexcept {
  generation.fetch_add(1, std::memory_order_relaxed); // one thread: nothing to pair with
}

} // namespace

std::uint64_t fork_generation() noexcept {
  // Relaxed: the value only changes in a child before any other thread of it exists.
  return generation.load(std::memory_order_relaxed);
}

void watch_forks() noexcept {
  static const bool installed = pthread_atfork(nullptr, nullptr, &on_fork_child) == 0;
  (void)installed;
}

} // namespace dynbatch
