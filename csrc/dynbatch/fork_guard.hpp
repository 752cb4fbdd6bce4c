#pragma once
// Fork generations: which process an object's threads and locks belong to.
//
// Contract
// - fork_generation() is 0 in the process that loaded the core and goes up by one in the
//   child of every fork() (a pthread_atfork child handler, installed the first time
//   ForkStamp or make_fork_safe_shared is used). Reading it is one relaxed atomic load.
// - In a forked child the parent's other threads do not exist, and a lock or condition
//   variable that one of them held or waited on stays that way for ever: joining such a thread
//   fails (ESRCH), destroying such a condition variable waits for ever, locking such a mutex
//   deadlocks. An object that owns threads or synchronization state is therefore made by
//   make_fork_safe_shared: when its last owner lets go in a later generation, it is leaked,
//   not destroyed (its memory is the child's copy; the OS frees it at exit).
// - Process-wide singletons (CopyWorkers::shared(), NvmlLibrary::process_default()) keep one
//   instance per generation: a child makes its own on first use and leaks the parent's.
// - Inherited objects are inert in the child: blocking calls on them throw ForkedError, and
//   close() does nothing. Whoever wraps them (the Python layer) refuses to use them.

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

namespace dynbatch {

// 0 in the first process; +1 in each forked child.
std::uint64_t fork_generation() noexcept;

// Installs the at-fork handler (idempotent, thread-safe); every ForkStamp calls it.
void watch_forks() noexcept;

// Thrown by a blocking call on an object inherited across fork().
class ForkedError : public std::logic_error {
public:
  explicit ForkedError(const std::string &what)
      : std::logic_error(what + " was created before fork(): it belongs to the parent process, "
                                "whose threads do not exist in this one; create a new one here") {}
};

// The generation an object was made in.
class ForkStamp {
public:
  ForkStamp() noexcept : generation_((watch_forks(), fork_generation())) {}
  std::uint64_t generation() const noexcept { return generation_; }
  // True in a process forked after the object was made.
  bool forked() const noexcept { return generation_ != fork_generation(); }

private:
  std::uint64_t generation_;
};

// A shared T that is destroyed in the generation it was made in and leaked in any other.
template <class T, class... Args> std::shared_ptr<T> make_fork_safe_shared(Args &&...args) {
  const ForkStamp stamp;
  return std::shared_ptr<T>(new T(std::forward<Args>(args)...), [stamp](T *object) noexcept {
    if (!stamp.forked()) {
      delete object;
    }
  });
}

} // namespace dynbatch
