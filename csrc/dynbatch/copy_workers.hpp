#pragma once
// CopyWorkers: a few threads that split one large copy with its caller.
//
// Contract
// - parallel_for(count, body) calls body(begin, end) on disjoint ranges covering [0, count),
//   one on the calling thread and the others on the helpers, and returns when all are done.
//   An exception from a range is rethrown to the caller after every range finished.
// - One parallel_for runs at a time; a caller that finds the helpers busy runs the whole
//   range itself (a copy never waits for another copy).
// - shared() is a process-wide instance with min(cores - 1, 3) helpers, created on first use
//   and never destroyed (the helpers sleep until the process ends; they never touch Python).
//   A forked child gets an instance of its own on first use: the parent's helpers do not
//   exist there, and the parent's instance is leaked, not touched (fork_guard.hpp).

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dynbatch {

class CopyWorkers {
public:
  using Body = std::function<void(std::size_t begin, std::size_t end)>;

  explicit CopyWorkers(std::size_t helpers);
  ~CopyWorkers();
  CopyWorkers(const CopyWorkers &) = delete;
  CopyWorkers &operator=(const CopyWorkers &) = delete;

  void parallel_for(std::size_t count, const Body &body);

  static CopyWorkers &shared();

private:
  void work();

  std::mutex run_mutex_; // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable changed_;
  const Body *body_ = nullptr;
  std::vector<std::pair<std::size_t, std::size_t>> ranges_; // for the helpers
  std::size_t next_range_ = 0;
  std::size_t unfinished_ = 0;
  std::uint64_t generation_ = 0;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

} // namespace dynbatch
