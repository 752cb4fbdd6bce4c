// Fork: a child of a process whose core threads are running (copy helpers, a telemetry sampler,
// a former with a consumer waiting in it) gets fresh singletons, refuses the inherited former,
// lets go of inherited objects without joining, waking or destroying the parent's threads and
// locks, and forms batches with objects of its own. Each child reports through its exit code;
// a hung child is killed and fails the test. Not under ThreadSanitizer, which does not support
// starting threads after a multi-threaded fork.

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "dynbatch/batch_former.hpp"
#include "dynbatch/copy_workers.hpp"
#include "dynbatch/fork_guard.hpp"
#include "dynbatch/sizing_controller.hpp"
#include "test_support.hpp"

using dynbatch::BatchFormer;
using dynbatch::BatchLayout;
using dynbatch::ControllerOptions;
using dynbatch::CopyWorkers;
using dynbatch::ForkedError;
using dynbatch::FormedBatch;
using dynbatch::FormerOptions;
using dynbatch::LeafLayout;
using dynbatch::make_fork_safe_shared;
using dynbatch::Nanoseconds;
using dynbatch::NextStatus;
using dynbatch::now_ns;
using dynbatch::ScriptedTelemetrySource;
using dynbatch::SizingController;
using dynbatch::StagingPool;
using dynbatch::StatsRecorder;
using dynbatch::TelemetrySample;
using dynbatch::TelemetrySampler;
namespace dl = dynbatch::dlpack;

namespace {

constexpr Nanoseconds ms = 1'000'000;

// Runs `child` in a forked child and returns its exit code (-1: it hung and was killed; -2: it
// died of a signal). _exit keeps the child from running the parent's static destructors and
// leak checks over the objects it deliberately leaked.
int in_child(const std::function<int()> &child) {
  const pid_t pid = fork();
  if (pid == 0) {
    int code = 1;
    try {
      code = child();
    } catch (...) {
      code = 2;
    }
    _exit(code);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
}

BatchLayout one_float() {
  return BatchLayout({LeafLayout{{1}, dl::DLDataType{dl::kDLFloat, 32, 1}, 4}});
}

std::shared_ptr<BatchFormer> make_former(std::shared_ptr<TelemetrySampler> telemetry) {
  ControllerOptions sizing;
  sizing.min_batch_size = 2;
  sizing.max_batch_size = 2;
  FormerOptions options{64, 1};
  return make_fork_safe_shared<BatchFormer>(
      one_float(), options, StagingPool::create(3), std::make_shared<SizingController>(sizing),
      std::move(telemetry), std::make_shared<StatsRecorder>(64));
}

std::shared_ptr<TelemetrySampler> make_sampler() {
  TelemetrySample sample;
  sample.memory_total_bytes = 1ull << 34;
  sample.memory_available_bytes = 1ull << 33;
  return make_fork_safe_shared<TelemetrySampler>(std::make_shared<ScriptedTelemetrySource>(sample),
                                                 1 * ms);
}

// Pushes two samples and reads back the batch they form; true when it holds both values.
bool forms_a_batch(BatchFormer &former) {
  static const float values[2] = {1.5f, 2.5f};
  const std::uint64_t ids[2] = {0, 1};
  const void *sources[2] = {&values[0], &values[1]};
  if (former.push(ids, sources) != 2) {
    return false;
  }
  FormedBatch batch;
  if (former.next_batch(batch, now_ns() + 5'000 * ms) != NextStatus::batch) {
    return false;
  }
  const auto *data = reinterpret_cast<const float *>(batch.lease->data());
  return batch.ids.size() == 2 && data[0] == 1.5f && data[1] == 2.5f;
}

} // namespace

TEST_CASE(a_child_gets_its_own_copy_helpers) {
  if (dynbatch::testing::under_tsan) {
    return;
  }
  std::atomic<std::size_t> parent_total{0};
  CopyWorkers &parent = CopyWorkers::shared();
  parent.parallel_for(1000,
                      [&](std::size_t begin, std::size_t end) { parent_total += end - begin; });
  REQUIRE(parent_total.load() == 1000u);
  const int code = in_child([&] {
    if (dynbatch::fork_generation() != 1) {
      return 3;
    }
    CopyWorkers &own = CopyWorkers::shared();
    if (&own == &parent) {
      return 4; // the parent's helpers do not exist here
    }
    std::atomic<std::size_t> total{0};
    own.parallel_for(1000, [&](std::size_t begin, std::size_t end) { total += end - begin; });
    return total.load() == 1000u ? 0 : 5;
  });
  CHECK_EQ(code, 0);
  CHECK_EQ(dynbatch::fork_generation(), 0u);
  CHECK(&CopyWorkers::shared() == &parent); // the parent keeps its own
}

TEST_CASE(inherited_objects_are_refused_and_leaked_and_new_ones_work) {
  if (dynbatch::testing::under_tsan) {
    return;
  }
  auto telemetry = make_sampler();
  auto former = make_former(telemetry);
  std::atomic<std::size_t> delivered{0};
  std::thread consumer([&] { // waits in next_batch at the fork: its condition variables
    FormedBatch batch;       // have a waiter that the child never sees leave
    while (former->next_batch(batch, dynbatch::no_deadline) == NextStatus::batch) {
      delivered += batch.ids.size();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int code = in_child([&] {
    if (!telemetry->forked()) {
      return 3;
    }
    FormedBatch batch;
    try {
      former->next_batch(batch, now_ns() + 10 * ms);
      return 4;
    } catch (const ForkedError &) {
    }
    try {
      make_former(telemetry); // a new former cannot run on the parent's sampler
      return 5;
    } catch (const ForkedError &) {
    }
    former->close_input(); // inert: no wake-up of the parent's waiters
    former->close();       // inert: no join of the parent's thread
    former.reset();        // leaked, not destroyed
    telemetry.reset();
    auto own = make_former(make_sampler());
    return forms_a_batch(*own) ? 0 : 6; // `own` is destroyed here: its threads are ours
  });
  CHECK_EQ(code, 0);
  static const float values[2] = {1.5f, 2.5f}; // the parent's former is untouched
  const std::uint64_t ids[2] = {0, 1};
  const void *sources[2] = {&values[0], &values[1]};
  CHECK_EQ(former->push(ids, sources), 2u);
  CHECK(dynbatch::testing::eventually([&] { return delivered.load() == 2; }));
  former->close();
  consumer.join();
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
