// BatchFormer end to end: requests in, collated batches out, with the real staging pool, stats
// recorder, telemetry sampler and SizingController. Checks exactly-once and in-order delivery,
// batch contents, backpressure at the (power-of-two) capacity, prefetch depth, prompt and
// idempotent close(), error propagation, stats, and the memory ceiling.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "dynbatch/batch_former.hpp"
#include "dynbatch/dlpack_export.hpp"
#include "dynbatch/sizing_controller.hpp"
#include "test_support.hpp"

using dynbatch::testing::eventually;

using dynbatch::BatchFeedback;
using dynbatch::BatchFormer;
using dynbatch::BatchLayout;
using dynbatch::ControllerOptions;
using dynbatch::FormedBatch;
using dynbatch::FormerOptions;
using dynbatch::LeafLayout;
using dynbatch::Nanoseconds;
using dynbatch::NextStatus;
using dynbatch::no_deadline;
using dynbatch::now_ns;
using dynbatch::SizingController;
using dynbatch::StagingPool;
using dynbatch::StatsRecorder;
using dynbatch::TelemetrySample;
using dynbatch::TelemetrySampler;
namespace dl = dynbatch::dlpack;

namespace {

constexpr Nanoseconds ms = 1'000'000;
constexpr Nanoseconds hang_bound_ns = 5'000 * ms; // only to detect a hang
constexpr std::uint64_t id_base = 7'000;          // ids are not indices

// Three leaves per sample, values derived from the sample index k: f32[4], i64 scalar, u8[3].
BatchLayout sample_layout() {
  return BatchLayout({LeafLayout{{4}, dl::DLDataType{dl::kDLFloat, 32, 1}, 16},
                      LeafLayout{{}, dl::DLDataType{dl::kDLInt, 64, 1}, 8},
                      LeafLayout{{3}, dl::DLDataType{dl::kDLUInt, 8, 1}, 3}});
}

struct Sample {
  float f[4];
  std::int64_t i;
  std::uint8_t u[3];
};

class SampleStore {
public:
  explicit SampleStore(std::size_t count) : samples_(count) {
    for (std::size_t k = 0; k < count; ++k) {
      Sample &s = samples_[k];
      for (int e = 0; e < 4; ++e) {
        s.f[e] = static_cast<float>(k) * 4.0f + static_cast<float>(e) + 0.25f;
      }
      s.i = -static_cast<std::int64_t>(k) * 1'000'003;
      for (int e = 0; e < 3; ++e) {
        s.u[e] = static_cast<std::uint8_t>(k * 3 + e);
      }
    }
  }
  std::size_t size() const { return samples_.size(); }
  const Sample &at(std::size_t k) const { return samples_.at(k); }
  static std::uint64_t id_of(std::size_t k) { return id_base + k; }
  static std::size_t index_of(std::uint64_t id) { return static_cast<std::size_t>(id - id_base); }

  // Ids and source pointers (request-major) for samples [first, first + count).
  void describe(std::size_t first, std::size_t count, std::vector<std::uint64_t> &ids,
                std::vector<const void *> &sources) const {
    ids.clear();
    sources.clear();
    for (std::size_t k = first; k < first + count; ++k) {
      ids.push_back(id_of(k));
      sources.push_back(samples_[k].f);
      sources.push_back(&samples_[k].i);
      sources.push_back(samples_[k].u);
    }
  }

private:
  std::vector<Sample> samples_;
};

// Counts samples of `batch` whose staged bytes differ from their sources.
std::size_t content_mismatches(const BatchLayout &layout, const FormedBatch &batch,
                               const SampleStore &store) {
  const std::size_t n = batch.ids.size();
  const std::byte *base = batch.lease->data();
  const std::byte *f = base + layout.leaf_offset(0, n);
  const std::byte *i64 = base + layout.leaf_offset(1, n);
  const std::byte *u8 = base + layout.leaf_offset(2, n);
  std::size_t mismatches = 0;
  for (std::size_t row = 0; row < n; ++row) {
    const std::size_t k = SampleStore::index_of(batch.ids[row]);
    if (k >= store.size()) {
      ++mismatches;
      continue;
    }
    const Sample &s = store.at(k);
    mismatches += std::memcmp(f + row * 16, s.f, 16) != 0 ? 1 : 0;
    mismatches += std::memcmp(i64 + row * 8, &s.i, 8) != 0 ? 1 : 0;
    mismatches += std::memcmp(u8 + row * 3, s.u, 3) != 0 ? 1 : 0;
  }
  return mismatches;
}

// min == max: the controller returns that size whatever it learns.
ControllerOptions fixed_size(std::size_t size) {
  ControllerOptions options;
  options.min_batch_size = size;
  options.max_batch_size = size;
  return options;
}

TelemetrySample scripted(std::uint64_t available) {
  TelemetrySample sample;
  sample.memory_total_bytes = 64ull << 30;
  sample.memory_available_bytes = available;
  sample.process_rss_bytes = 1 << 20;
  return sample;
}

// Everything a BatchFormer needs, with handles the tests inspect afterwards.
struct Rig {
  std::shared_ptr<StagingPool> pool;
  std::shared_ptr<dynbatch::SizingPolicy> policy;
  std::shared_ptr<TelemetrySampler> telemetry;
  std::shared_ptr<StatsRecorder> stats;
  std::unique_ptr<BatchFormer> former;

  Rig(ControllerOptions sizing, FormerOptions options,
      std::shared_ptr<dynbatch::TelemetrySource> source = nullptr,
      std::shared_ptr<dynbatch::SizingPolicy> custom_policy = nullptr)
      : pool(StagingPool::create(4)),
        policy(custom_policy ? std::move(custom_policy)
                             : std::make_shared<SizingController>(sizing)),
        telemetry(std::make_shared<TelemetrySampler>(
            source ? std::move(source) : std::make_shared<dynbatch::HostTelemetrySource>(),
            10 * ms)),
        stats(std::make_shared<StatsRecorder>(1024)),
        former(std::make_unique<BatchFormer>(sample_layout(), options, pool, policy, telemetry,
                                             stats)) {}
};

// Pushes samples [first, first + count), retrying while the former is at capacity.
void push_all(BatchFormer &former, const SampleStore &store, std::size_t first, std::size_t count,
              std::size_t chunk) {
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  std::size_t done = 0;
  while (done < count) {
    const std::size_t take = std::min(chunk, count - done);
    store.describe(first + done, take, ids, sources);
    const std::size_t accepted = former.push(ids, sources);
    CHECK_LE(accepted, take);
    done += accepted;
    if (accepted < take) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

} // namespace

TEST_CASE(end_to_end_fixed_size_exactly_once_in_order) {
  constexpr std::size_t n_requests = 1000;
  constexpr std::size_t size = 32;
  const SampleStore store(n_requests);
  Rig rig(fixed_size(size), FormerOptions{64, 1});
  BatchFormer &former = *rig.former;
  const BatchLayout &layout = *former.layout();

  // A producer thread pushes in chunks against a 64-request capacity, so backpressure happens.
  std::thread producer([&] {
    push_all(former, store, 0, n_requests, 50);
    former.close_input();
  });

  std::size_t next_index = 0;
  std::size_t batches = 0;
  std::size_t mismatches = 0;
  std::size_t wrong_sizes = 0;
  std::uint64_t last_sequence = 0;
  for (;;) {
    FormedBatch batch;
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    REQUIRE(status != NextStatus::timeout);
    if (status == NextStatus::finished) {
      break;
    }
    REQUIRE(batch.lease != nullptr);
    const std::size_t count = batch.ids.size();
    const bool last = next_index + count == n_requests;
    wrong_sizes += (count != size && !(last && count == n_requests % size)) ? 1 : 0;
    CHECK_EQ(batch.target, size);
    for (const std::uint64_t id : batch.ids) {
      CHECK_EQ(id, SampleStore::id_of(next_index));
      ++next_index;
    }
    mismatches += content_mismatches(layout, batch, store);
    CHECK_GE(batch.lease->capacity(), layout.batch_bytes(count));
    CHECK(batches == 0 || batch.sequence > last_sequence);
    CHECK_GE(batch.formed_ns, batch.first_enqueue_ns);
    CHECK_GE(batch.collate_ns, 0);
    last_sequence = batch.sequence;
    BatchFeedback feedback;
    feedback.batch_size = count;
    feedback.compute_ns = 1000 + static_cast<Nanoseconds>(batches);
    former.report_feedback(batch.sequence, feedback);
    ++batches;
  }
  producer.join();
  CHECK_EQ(next_index, n_requests);
  CHECK_EQ(wrong_sizes, 0u);
  CHECK_EQ(mismatches, 0u);
  CHECK_EQ(batches, (n_requests + size - 1) / size);

  // Finished stays finished.
  FormedBatch extra;
  CHECK(former.next_batch(extra, now_ns() + 10 * ms) == NextStatus::finished);
  CHECK(extra.ids.empty());

  const auto snapshot = rig.stats->snapshot();
  CHECK_EQ(snapshot.batches, batches);
  CHECK_EQ(snapshot.samples, n_requests);
  CHECK_EQ(snapshot.histogram.size(), 2u);
  CHECK_EQ(snapshot.histogram.count(size) ? snapshot.histogram.at(size) : 0, n_requests / size);
  CHECK_EQ(snapshot.histogram.count(n_requests % size) ? snapshot.histogram.at(n_requests % size)
                                                       : 0,
           1u);
  REQUIRE(snapshot.recent.size() == batches);
  Nanoseconds compute_total = 0;
  for (std::size_t b = 0; b < batches; ++b) {
    CHECK_EQ(snapshot.recent[b].compute_ns, 1000 + static_cast<Nanoseconds>(b));
    CHECK_EQ(snapshot.recent[b].target, size);
    CHECK_GE(snapshot.recent[b].delivered_ns, snapshot.recent[b].formed_ns);
    compute_total += 1000 + static_cast<Nanoseconds>(b);
  }
  CHECK_EQ(snapshot.compute_ns, compute_total);
  CHECK_GT(snapshot.collate_ns, 0);

  former.close();
  CHECK_GT(rig.stats->snapshot().active_ns, 0);
  CHECK_EQ(rig.pool->stats().slots_in_use, 0u);
  CHECK_EQ(rig.pool->stats().one_off_in_use, 0u);
}

TEST_CASE(several_producers_each_request_once_in_producer_order) {
  constexpr std::size_t producers = 3;
  constexpr std::size_t per_producer = 400;
  const SampleStore store(producers * per_producer);
  Rig rig(fixed_size(16), FormerOptions{32, 2});
  BatchFormer &former = *rig.former;
  std::vector<std::thread> threads;
  std::atomic<std::size_t> producers_left{producers};
  for (std::size_t p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      push_all(former, store, p * per_producer, per_producer, 1 + p * 5);
      if (producers_left.fetch_sub(1) == 1) {
        former.close_input(); // the last producer ends the input
      }
    });
  }
  std::vector<int> seen(producers * per_producer, 0);
  std::vector<std::int64_t> last(producers, -1);
  std::size_t out_of_order = 0;
  std::size_t mismatches = 0;
  std::size_t oversized = 0;
  std::size_t short_batches = 0;
  for (;;) {
    FormedBatch batch;
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    REQUIRE(status != NextStatus::timeout);
    if (status == NextStatus::finished) {
      break;
    }
    oversized += batch.ids.size() > 16 ? 1 : 0;
    short_batches += batch.ids.size() < 16 ? 1 : 0;
    mismatches += content_mismatches(*former.layout(), batch, store);
    for (const std::uint64_t id : batch.ids) {
      const std::size_t k = SampleStore::index_of(id);
      REQUIRE(k < seen.size());
      ++seen[k];
      const std::size_t p = k / per_producer;
      out_of_order += static_cast<std::int64_t>(k) <= last[p] ? 1 : 0;
      last[p] = static_cast<std::int64_t>(k);
    }
  }
  for (std::thread &thread : threads) {
    thread.join();
  }
  CHECK_EQ(static_cast<std::size_t>(std::count(seen.begin(), seen.end(), 1)), seen.size());
  CHECK_EQ(out_of_order, 0u);
  CHECK_EQ(mismatches, 0u);
  CHECK_EQ(oversized, 0u);
  CHECK_LE(short_batches, 1u); // only the batch closed by end of input may be short
}

TEST_CASE(exported_leaf_shares_the_batch_slot) {
  const SampleStore store(8);
  Rig rig(fixed_size(8), FormerOptions{8, 1});
  push_all(*rig.former, store, 0, 8, 8);
  rig.former->close_input();
  FormedBatch batch;
  REQUIRE(rig.former->next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  REQUIRE(batch.ids.size() == 8u);
  dl::DLManagedTensor *tensor = dynbatch::export_leaf(batch.lease, *rig.former->layout(), 0, 8);
  CHECK_EQ(tensor->dl_tensor.shape[0], 8);
  CHECK_EQ(tensor->dl_tensor.shape[1], 4);
  const auto *values = static_cast<const float *>(tensor->dl_tensor.data);
  CHECK_EQ(values[5 * 4 + 2], store.at(5).f[2]);
  batch = FormedBatch{}; // the batch goes; the tensor keeps the slot
  rig.former->close();
  CHECK_EQ(rig.pool->stats().slots_in_use, 1u);
  tensor->deleter(tensor);
  CHECK_EQ(rig.pool->stats().slots_in_use, 0u);
}

TEST_CASE(push_accepts_exactly_capacity) {
  const SampleStore store(20);
  // Target 16 but only 5 requests may wait (the table is 8 rows): the former holds all 5 while
  // it waits for more, so exactly 5 are accepted whatever the timing.
  Rig rig(fixed_size(16), FormerOptions{5, 1});
  BatchFormer &former = *rig.former;
  CHECK_EQ(former.capacity(), 5u);
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(0, 20, ids, sources);
  CHECK_EQ(former.push(ids, sources), 5u);
  CHECK_EQ(former.queued(), 5u);
  CHECK(!former.wait_for_room(now_ns() + 20 * ms)); // nothing leaves: still full
  store.describe(5, 12, ids, sources);
  CHECK_EQ(former.push(ids, sources), 0u);
  CHECK_EQ(former.push({}, {}), 0u); // an empty push is fine

  former.close_input();
  store.describe(8, 1, ids, sources);
  CHECK_EQ(former.push(ids, sources), 0u); // input closed
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  REQUIRE(batch.ids.size() == 5u); // end of input closes the partial batch
  CHECK(batch.reason == dynbatch::ReleaseReason::drain);
  for (std::size_t k = 0; k < 5; ++k) {
    CHECK_EQ(batch.ids[k], SampleStore::id_of(k));
  }
  CHECK_EQ(content_mismatches(*former.layout(), batch, store), 0u);
  CHECK(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::finished);
}

TEST_CASE(capacity_is_recycled_as_batches_form) {
  constexpr std::size_t total = 200;
  const SampleStore store(total);
  Rig rig(fixed_size(4), FormerOptions{8, 1});
  BatchFormer &former = *rig.former;
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(0, total, ids, sources);
  // Without a consumer, at most capacity + one formed batch (prefetch 1) can be taken.
  const std::size_t first = former.push(ids, sources);
  CHECK_GE(first, 8u);
  CHECK_LE(first, 12u);
  std::size_t pushed = first;
  std::size_t received = 0;
  while (received < total) {
    FormedBatch batch;
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    REQUIRE(status == NextStatus::batch);
    for (const std::uint64_t id : batch.ids) {
      CHECK_EQ(id, SampleStore::id_of(received));
      ++received;
    }
    if (pushed < total) {
      store.describe(pushed, total - pushed, ids, sources);
      pushed += former.push(ids, sources);
    }
    if (pushed == total) {
      former.close_input();
    }
  }
  CHECK_EQ(received, total);
}

TEST_CASE(push_rejects_wrong_source_count) {
  Rig rig(fixed_size(4), FormerOptions{8, 1});
  const std::uint64_t ids[2] = {1, 2};
  const void *sources[5] = {};
  CHECK_THROWS_AS(rig.former->push(ids, sources), std::invalid_argument);
  CHECK_THROWS_AS(BatchFormer(sample_layout(), FormerOptions{8, 0}, rig.pool, rig.policy,
                              rig.telemetry, rig.stats),
                  std::invalid_argument);
}

TEST_CASE(prefetch_depth_bounds_formed_batches) {
  for (const std::size_t depth : {1u, 2u, 3u}) {
    const SampleStore store(64);
    Rig rig(fixed_size(4), FormerOptions{64, depth});
    push_all(*rig.former, store, 0, 64, 64);
    // Nobody consumes: the former stops after `depth` batches, each holding one slot.
    CHECK(eventually([&] { return rig.pool->stats().slots_in_use == depth; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    CHECK_EQ(rig.pool->stats().slots_in_use, depth);
    CHECK_EQ(rig.pool->stats().acquisitions, depth);
    FormedBatch batch;
    REQUIRE(rig.former->next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
    // One taken out, one more formed: depth waiting plus the one the caller holds.
    CHECK(eventually([&] { return rig.pool->stats().slots_in_use == depth + 1; }));
    CHECK_EQ(batch.ids.front(), SampleStore::id_of(0));
    batch = FormedBatch{};
    rig.former->close(); // drops the undelivered batches: their slots go back
    CHECK_EQ(rig.pool->stats().slots_in_use, 0u);
    CHECK_EQ(rig.pool->stats().one_off_in_use, 0u);
  }
}

TEST_CASE(next_batch_times_out_without_input) {
  Rig rig(fixed_size(4), FormerOptions{8, 1});
  FormedBatch batch;
  const Nanoseconds start = now_ns();
  CHECK(rig.former->next_batch(batch, start + 20 * ms) == NextStatus::timeout);
  CHECK_GE(now_ns() - start, 19 * ms);
  CHECK(batch.lease == nullptr);
  // A partial batch is not delivered before its size is reached or input ends.
  const SampleStore store(3);
  push_all(*rig.former, store, 0, 3, 3);
  CHECK(rig.former->next_batch(batch, now_ns() + 20 * ms) == NextStatus::timeout);
  rig.former->close_input();
  REQUIRE(rig.former->next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 3u);
}

TEST_CASE(close_while_former_waits_for_input_is_prompt_and_idempotent) {
  const SampleStore store(3);
  Rig rig(fixed_size(16), FormerOptions{32, 1});
  BatchFormer &former = *rig.former;
  push_all(former, store, 0, 3, 3); // fewer than the target: the former thread blocks
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const Nanoseconds start = now_ns();
  former.close();
  CHECK_LT(now_ns() - start, hang_bound_ns);
  former.close(); // idempotent
  FormedBatch batch;
  const Nanoseconds asked = now_ns();
  CHECK(former.next_batch(batch, no_deadline) == NextStatus::finished);
  CHECK_LT(now_ns() - asked, hang_bound_ns);
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(0, 1, ids, sources);
  CHECK_EQ(former.push(ids, sources), 0u); // closed
  CHECK_EQ(rig.pool->stats().slots_in_use, 0u);
  rig.former.reset(); // the destructor after close() is fine too
}

TEST_CASE(close_wakes_a_consumer_blocked_in_next_batch) {
  Rig rig(fixed_size(4), FormerOptions{8, 1});
  std::atomic<int> status{-1};
  std::thread consumer([&] {
    FormedBatch batch;
    status.store(static_cast<int>(rig.former->next_batch(batch, no_deadline)));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_EQ(status.load(), -1); // still waiting
  const Nanoseconds start = now_ns();
  rig.former->close();
  consumer.join();
  CHECK_LT(now_ns() - start, hang_bound_ns);
  CHECK_EQ(status.load(), static_cast<int>(NextStatus::finished));
}

TEST_CASE(destructor_without_close_joins) {
  const SampleStore store(5);
  Rig rig(fixed_size(4), FormerOptions{8, 1});
  push_all(*rig.former, store, 0, 5, 5);
  const Nanoseconds start = now_ns();
  rig.former.reset();
  CHECK_LT(now_ns() - start, hang_bound_ns);
  CHECK_EQ(rig.pool->stats().slots_in_use, 0u);
}

namespace {
// A policy that fails on its `fail_at`-th call, to exercise error propagation from the thread.
class FailingPolicy final : public dynbatch::SizingPolicy {
public:
  explicit FailingPolicy(int fail_at) : fail_at_(fail_at) {}
  std::size_t next_batch_size(const dynbatch::SizingInputs &) override {
    if (++calls_ == fail_at_) {
      throw std::runtime_error("policy failed");
    }
    return 2;
  }
  void on_feedback(const BatchFeedback &) override {}
  dynbatch::SizingState state() const override { return {}; }

private:
  const int fail_at_;
  std::atomic<int> calls_{0};
};
} // namespace

TEST_CASE(error_in_former_thread_is_rethrown_by_next_batch) {
  const SampleStore store(10);
  Rig rig(fixed_size(2), FormerOptions{16, 4}, nullptr, std::make_shared<FailingPolicy>(3));
  push_all(*rig.former, store, 0, 10, 10);
  // Some good batches first (how many depends on who asked the policy first: the thread or the
  // consumer helping), then the error, and it stays an error.
  std::size_t delivered = 0;
  bool threw = false;
  for (int attempt = 0; attempt < 4 && !threw; ++attempt) {
    FormedBatch batch;
    try {
      const NextStatus status = rig.former->next_batch(batch, now_ns() + hang_bound_ns);
      REQUIRE(status == NextStatus::batch);
      delivered += batch.ids.size();
    } catch (const std::runtime_error &error) {
      threw = std::string(error.what()) == "policy failed";
    }
  }
  CHECK(threw);
  CHECK_LT(delivered, 10u);
  CHECK_EQ(delivered % 2, 0u);
  FormedBatch batch;
  CHECK_THROWS_AS(rig.former->next_batch(batch, now_ns() + hang_bound_ns), std::runtime_error);
  // After the error the former thread must rest, not spin: the process stays nearly idle.
  const std::clock_t cpu_before = std::clock();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double cpu_seconds = static_cast<double>(std::clock() - cpu_before) / CLOCKS_PER_SEC;
  CHECK_LT(cpu_seconds, 0.15);
  rig.former->close();
}

TEST_CASE(tiny_available_memory_shrinks_batches_to_min) {
  // Feedback that favours big batches (2 ms per batch + 10 us per sample: the knee is at 3800)
  // grows the size with plenty of memory; with almost none the ceiling pins every batch at min.
  // No peak memory is reported, so the ceiling is the staged bytes of a batch within
  // staged_memory_fraction of available: 16 GiB leaves max, 1 byte leaves less than one sample.
  constexpr std::size_t total = 128;
  const SampleStore store(total);
  for (const bool tight : {false, true}) {
    ControllerOptions sizing;
    sizing.min_batch_size = 2;
    sizing.max_batch_size = 16;
    auto source =
        std::make_shared<dynbatch::ScriptedTelemetrySource>(scripted(tight ? 1 : (16ull << 30)));
    Rig rig(sizing, FormerOptions{128, 1}, source);
    push_all(*rig.former, store, 0, total, total);
    rig.former->close_input();
    std::size_t largest = 0;
    std::size_t smallest = SIZE_MAX;
    std::size_t received = 0;
    for (;;) {
      FormedBatch batch;
      const NextStatus status = rig.former->next_batch(batch, now_ns() + hang_bound_ns);
      REQUIRE(status != NextStatus::timeout);
      if (status == NextStatus::finished) {
        break;
      }
      const std::size_t n = batch.ids.size();
      received += n;
      largest = std::max(largest, n);
      if (received < total) {
        smallest = std::min(smallest, n); // the last batch may be short
      }
      CHECK_EQ(batch.memory_available_bytes, tight ? 1u : (16ull << 30));
      BatchFeedback feedback;
      feedback.batch_size = n;
      feedback.compute_ns = 2 * ms + 10'000 * static_cast<Nanoseconds>(n);
      rig.former->report_feedback(batch.sequence, feedback);
    }
    CHECK_EQ(received, total);
    if (tight) {
      CHECK_EQ(largest, 2u);
      CHECK_EQ(smallest, 2u);
      CHECK_EQ(rig.policy->state().memory_ceiling, 2u);
    } else {
      CHECK_EQ(largest, 16u);
    }
  }
}

TEST_CASE(stats_recorder_ring_keeps_the_latest_records) {
  CHECK_THROWS_AS(StatsRecorder(0), std::invalid_argument);
  StatsRecorder stats(3);
  for (std::uint64_t s = 0; s < 5; ++s) {
    CHECK_EQ(stats.next_sequence(), s);
    dynbatch::BatchRecord record;
    record.sequence = s;
    record.batch_size = 10 + s;
    record.collate_ns = 100;
    stats.record_batch(record);
  }
  stats.record_compute(3, 77);
  stats.record_compute(0, 5); // evicted: counted in the total, no record to update
  stats.add_active_time(1234);
  auto snapshot = stats.snapshot();
  CHECK_EQ(snapshot.batches, 5u);
  CHECK_EQ(snapshot.samples, 10u + 11 + 12 + 13 + 14);
  CHECK_EQ(snapshot.collate_ns, 500);
  CHECK_EQ(snapshot.compute_ns, 82);
  CHECK_EQ(snapshot.active_ns, 1234);
  CHECK_EQ(snapshot.histogram.size(), 5u);
  REQUIRE(snapshot.recent.size() == 3u);
  CHECK_EQ(snapshot.recent[0].sequence, 2u); // oldest first
  CHECK_EQ(snapshot.recent[1].sequence, 3u);
  CHECK_EQ(snapshot.recent[2].sequence, 4u);
  CHECK_EQ(snapshot.recent[1].compute_ns, 77);
  CHECK_EQ(snapshot.recent[0].compute_ns, -1);
  stats.reset();
  snapshot = stats.snapshot();
  CHECK_EQ(snapshot.batches, 0u);
  CHECK(snapshot.recent.empty());
  CHECK(snapshot.histogram.empty());
}

// Serving: release reasons, deadlines, priorities (requests pushed one call per request).

namespace {

std::size_t push_with(BatchFormer &former, const SampleStore &store, std::size_t first,
                      std::size_t count, dynbatch::RequestOptions options) {
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(first, count, ids, sources);
  const std::vector<dynbatch::RequestOptions> per_request(count, options);
  return former.push(ids, sources, per_request);
}

FormerOptions serving(std::size_t capacity, Nanoseconds max_delay_ns) {
  FormerOptions options{capacity, 1};
  options.max_delay_ns = max_delay_ns;
  return options;
}

} // namespace

TEST_CASE(batch_released_full_or_after_max_delay) {
  const SampleStore store(20);
  Rig rig(fixed_size(8), serving(64, 30 * ms));
  BatchFormer &former = *rig.former;
  const Nanoseconds pushed = now_ns();
  CHECK_EQ(push_with(former, store, 0, 3, {}), 3u);
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 3u);
  CHECK(batch.reason == dynbatch::ReleaseReason::max_delay);
  CHECK_GE(now_ns() - pushed, 30 * ms);
  CHECK_EQ(content_mismatches(*former.layout(), batch, store), 0u);
  CHECK_EQ(push_with(former, store, 3, 8, {}), 8u);
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 8u);
  CHECK(batch.reason == dynbatch::ReleaseReason::full);
  const auto snapshot = rig.stats->snapshot();
  CHECK_EQ(snapshot.released_by[0], 1u); // full
  CHECK_EQ(snapshot.released_by[1], 1u); // max_delay
  CHECK_EQ(snapshot.priorities.at(0).dispatched, 11u);
  CHECK_GE(snapshot.priorities.at(0).queue_wait.percentile(0.99), 30 * ms);
}

TEST_CASE(zero_max_delay_dispatches_what_is_there) {
  const SampleStore store(2);
  Rig rig(fixed_size(8), serving(64, 0));
  CHECK_EQ(push_with(*rig.former, store, 0, 1, {}), 1u);
  FormedBatch batch;
  REQUIRE(rig.former->next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 1u);
  CHECK(batch.reason == dynbatch::ReleaseReason::max_delay);
}

TEST_CASE(a_waiting_consumer_gets_each_partial_batch_after_max_delay) {
  // The consumer waits first, then requests arrive one at a time: each partial batch must
  // reach it (a lost wake-up would leave it asleep until its deadline, i.e. a timeout).
  const SampleStore store(4);
  Rig rig(fixed_size(8), serving(64, 5 * ms));
  BatchFormer &former = *rig.former;
  for (std::size_t k = 0; k < 3; ++k) {
    NextStatus status = NextStatus::timeout;
    FormedBatch batch;
    std::thread consumer(
        [&] { status = former.next_batch(batch, now_ns() + 20 * hang_bound_ns / 5); });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_EQ(push_with(former, store, k, 1, {}), 1u);
    consumer.join();
    REQUIRE(status == NextStatus::batch);
    CHECK_EQ(batch.ids.size(), 1u);
    CHECK(batch.reason == dynbatch::ReleaseReason::max_delay);
  }
}

TEST_CASE(try_next_batch_takes_only_what_is_ready) {
  const SampleStore store(8);
  Rig rig(fixed_size(4), FormerOptions{16, 1});
  BatchFormer &former = *rig.former;
  FormedBatch batch;
  CHECK(former.try_next_batch(batch) == NextStatus::timeout); // nothing, and no waiting
  push_all(former, store, 0, 4, 4);
  REQUIRE(eventually([&] { return former.queued() == 0; })); // formed ahead by the thread
  REQUIRE(eventually([&] { return former.try_next_batch(batch) == NextStatus::batch; }));
  CHECK_EQ(batch.ids.size(), 4u);
  CHECK_EQ(content_mismatches(*former.layout(), batch, store), 0u);
  CHECK_EQ(rig.stats->snapshot().batches, 1u);
}

TEST_CASE(padded_batches_carry_lengths_and_a_rounded_padded_length) {
  LeafLayout tokens{{-1}, dl::DLDataType{dl::kDLInt, 32, 1}, 4, true, {}};
  const std::int32_t pad = -7;
  tokens.pad_element.resize(sizeof pad);
  std::memcpy(tokens.pad_element.data(), &pad, sizeof pad);
  FormerOptions options{16, 1};
  options.pad_to_multiple_of = 4;
  auto pool = StagingPool::create(4);
  auto policy = std::make_shared<SizingController>(fixed_size(3));
  auto telemetry = std::make_shared<TelemetrySampler>(
      std::make_shared<dynbatch::HostTelemetrySource>(), 10 * ms);
  auto stats = std::make_shared<StatsRecorder>(64);
  BatchFormer former(BatchLayout({tokens}), options, pool, policy, telemetry, stats);
  const std::vector<std::vector<std::int32_t>> samples = {{1, 2}, {3, 4, 5, 6, 7}, {8}};
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  std::vector<dynbatch::RequestOptions> per_request;
  for (std::size_t k = 0; k < samples.size(); ++k) {
    ids.push_back(k);
    sources.push_back(samples[k].data());
    dynbatch::RequestOptions request;
    request.length = static_cast<std::uint32_t>(samples[k].size());
    per_request.push_back(request);
  }
  REQUIRE(former.push(ids, sources, per_request) == 3u);
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK(batch.lengths == (std::vector<std::uint32_t>{2, 5, 1}));
  CHECK_EQ(batch.padded_length, 8u); // longest 5, rounded up to a multiple of 4
  const auto *out = reinterpret_cast<const std::int32_t *>(batch.lease->data());
  CHECK_EQ(out[0], 1);
  CHECK_EQ(out[2], -7);
  CHECK_EQ(out[8 + 4], 7);
  CHECK_EQ(out[16], 8);
  CHECK_EQ(out[17], -7);
  const auto snapshot = stats->snapshot();
  CHECK_EQ(snapshot.real_rows, 8u);
  CHECK_EQ(snapshot.padded_rows, 24u);
}

// A policy with a fixed token budget that records what it is told (padded layouts).
class BudgetPolicy final : public dynbatch::SizingPolicy {
public:
  explicit BudgetPolicy(std::size_t budget) : budget_(budget) {}
  std::size_t next_batch_size(const dynbatch::SizingInputs &) override { return 64; }
  std::size_t token_budget(const dynbatch::SizingInputs &inputs) override {
    longest.store(inputs.longest, std::memory_order_relaxed); // a reading for the test only
    return budget_;
  }
  void on_feedback(const BatchFeedback &feedback) override { feedback_.push_back(feedback); }
  dynbatch::SizingState state() const override { return {}; }
  const std::vector<BatchFeedback> &feedback() const { return feedback_; }
  std::atomic<std::size_t> longest{0};

private:
  std::size_t budget_;
  std::vector<BatchFeedback> feedback_; // on_feedback: the test thread only
};

// The policy's token budget caps each batch's padded size (a user's max_tokens caps the budget),
// the policy sees the longest length, and feedback reaches it in padded tokens.
TEST_CASE(a_token_budget_caps_padded_batches_and_feedback_counts_tokens) {
  LeafLayout tokens{{-1}, dl::DLDataType{dl::kDLInt, 32, 1}, 4, true, {}};
  tokens.pad_element.resize(4);
  const std::vector<std::uint32_t> lengths = {10, 10, 10, 10, 30, 5, 5, 5, 5, 5};
  std::vector<std::vector<std::int32_t>> samples;
  for (const std::uint32_t length : lengths) {
    samples.emplace_back(length, 1);
  }
  const auto run = [&](std::size_t user_max_tokens) {
    FormerOptions options{32, 1};
    options.max_tokens = user_max_tokens;
    auto policy = std::make_shared<BudgetPolicy>(40);
    BatchFormer former(BatchLayout({tokens}), options, StagingPool::create(4), policy,
                       std::make_shared<TelemetrySampler>(
                           std::make_shared<dynbatch::HostTelemetrySource>(), 10 * ms),
                       std::make_shared<StatsRecorder>(64));
    std::vector<std::uint64_t> ids;
    std::vector<const void *> sources;
    std::vector<dynbatch::RequestOptions> per_request;
    for (std::size_t k = 0; k < samples.size(); ++k) {
      ids.push_back(k);
      sources.push_back(samples[k].data());
      dynbatch::RequestOptions request;
      request.length = lengths[k];
      per_request.push_back(request);
    }
    REQUIRE(former.push(ids, sources, per_request) == samples.size());
    former.close_input();
    std::vector<std::size_t> sizes;
    FormedBatch batch;
    while (former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch) {
      sizes.push_back(batch.ids.size());
      CHECK(batch.ids.size() == 1 || batch.ids.size() * batch.padded_length <= 40);
      BatchFeedback feedback;
      feedback.batch_size = batch.ids.size();
      feedback.compute_ns = 1000;
      former.report_feedback(batch.sequence, feedback);
      REQUIRE(!policy->feedback().empty());
      CHECK_EQ(policy->feedback().back().tokens, batch.ids.size() * batch.padded_length);
    }
    CHECK_EQ(policy->longest.load(), 30u);
    return sizes;
  };
  CHECK(run(0) == (std::vector<std::size_t>{4, 1, 5}));        // 40, 30 (alone), 25 tokens
  CHECK(run(20) == (std::vector<std::size_t>{2, 2, 1, 4, 1})); // the user's 20 wins
}

// With a bucket window, which requests are grouped must not depend on how far the producer had
// got when the former looked: the producer pushes 32 variable-length requests in chunks of
// 1..5 with pauses of 0..300 us between them (a different rhythm each try), the consumer takes
// batches as they come, and every try must give the batches of a try where all requests were
// pushed before the first batch was formed.
TEST_CASE(length_grouping_does_not_depend_on_thread_timing) {
  LeafLayout tokens{{-1}, dl::DLDataType{dl::kDLInt, 32, 1}, 4, true, {}};
  tokens.pad_element.resize(4);
  const std::vector<std::uint32_t> lengths = {5,  100, 6,   98,  4,  101, 7,   99,  5,  100, 6,
                                              98, 4,   101, 7,   99, 5,   100, 6,   98, 4,   101,
                                              7,  99,  5,   100, 6,  98,  4,   101, 7,  99};
  std::vector<std::vector<std::int32_t>> samples;
  for (const std::uint32_t length : lengths) {
    samples.emplace_back(length, 1);
  }
  const auto run = [&](std::uint64_t rhythm) {
    FormerOptions options{32, 1};
    options.bucket_window = 16;
    auto former = std::make_unique<BatchFormer>(
        BatchLayout({tokens}), options, StagingPool::create(4),
        std::make_shared<SizingController>(fixed_size(4)),
        std::make_shared<TelemetrySampler>(std::make_shared<dynbatch::HostTelemetrySource>(),
                                           10 * ms),
        std::make_shared<StatsRecorder>(64));
    std::thread producer([&] {
      std::uint64_t state = rhythm;
      const auto next = [&](std::uint64_t bound) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        return (state >> 33) % bound;
      };
      for (std::size_t k = 0; k < samples.size();) {
        const std::size_t count = std::min<std::size_t>(1 + next(5), samples.size() - k);
        std::vector<std::uint64_t> ids;
        std::vector<const void *> sources;
        std::vector<dynbatch::RequestOptions> per_request;
        for (std::size_t j = k; j < k + count; ++j) {
          ids.push_back(j);
          sources.push_back(samples[j].data());
          dynbatch::RequestOptions request;
          request.length = lengths[j];
          per_request.push_back(request);
        }
        REQUIRE(former->push(ids, sources, per_request) == count);
        k += count;
        if (rhythm != 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(next(300)));
        }
      }
      former->close_input();
    });
    if (rhythm == 0) {
      producer.join(); // everything pushed before the first batch is asked for
    }
    std::vector<std::vector<std::uint64_t>> batches;
    FormedBatch batch;
    while (former->next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch) {
      batches.push_back(batch.ids);
    }
    if (producer.joinable()) {
      producer.join();
    }
    return batches;
  };
  const auto reference = run(0);
  REQUIRE(reference.size() == 8u);
  for (const auto &ids : reference) {
    std::uint32_t low = 1000, high = 0;
    for (const std::uint64_t id : ids) {
      low = std::min(low, lengths[id]);
      high = std::max(high, lengths[id]);
    }
    CHECK_LE(high - low, 3u); // short with short, long with long
  }
  for (std::uint64_t rhythm = 1; rhythm <= 20; ++rhythm) {
    CHECK(run(rhythm) == reference);
  }
}

TEST_CASE(a_later_request_with_an_earlier_deadline_is_released_in_time) {
  // The first request waits for a long max_delay; a second arrives with a short timeout: the
  // batch must leave before that timeout, not at the first request's max_delay. As in
  // batch_released_before_a_waiting_deadline, a late wake-up (sanitizers, a loaded machine)
  // may expire the second request instead: one of three tries must be in time.
  const SampleStore store(4);
  bool in_time = false;
  for (int attempt = 0; attempt < 3 && !in_time; ++attempt) {
    Rig rig(fixed_size(8), serving(64, 2'000 * ms));
    BatchFormer &former = *rig.former;
    NextStatus status = NextStatus::timeout;
    FormedBatch batch;
    const Nanoseconds started = now_ns();
    std::thread consumer([&] { status = former.next_batch(batch, now_ns() + hang_bound_ns); });
    CHECK_EQ(push_with(former, store, 0, 1, {}), 1u);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_EQ(push_with(former, store, 1, 1, {0, 30 * ms}), 1u);
    consumer.join();
    CHECK_LT(now_ns() - started, 1'000 * ms); // never the first request's max_delay
    in_time = status == NextStatus::batch && batch.ids.size() == 2 &&
              batch.reason == dynbatch::ReleaseReason::deadline && batch.expired_ids.empty();
  }
  CHECK(in_time);
}

TEST_CASE(batch_released_before_a_waiting_deadline) {
  // The release comes 1 ms before the deadline; a former thread that wakes later than that
  // (seen under AddressSanitizer on a loaded 2-core machine) finds the requests expired. A
  // former that never released on a deadline would find them expired every time: so up to
  // three tries, one of which must be released in time.
  const SampleStore store(4);
  NextStatus status = NextStatus::timeout;
  for (int attempt = 0; attempt < 3 && status != NextStatus::batch; ++attempt) {
    Rig rig(fixed_size(8), serving(64, no_deadline)); // would wait for 8 forever
    const Nanoseconds pushed = now_ns();
    CHECK_EQ(push_with(*rig.former, store, 0, 2, {0, 40 * ms}), 2u);
    FormedBatch batch;
    status = rig.former->next_batch(batch, now_ns() + hang_bound_ns);
    CHECK_GE(now_ns() - pushed, 30 * ms); // not before it had to
    if (status == NextStatus::batch) {
      CHECK_EQ(batch.ids.size(), 2u);
      CHECK(batch.reason == dynbatch::ReleaseReason::deadline);
      CHECK(batch.expired_ids.empty());
    } else {
      CHECK(status == NextStatus::expired); // late, never wrong
    }
  }
  CHECK(status == NextStatus::batch);
}

TEST_CASE(a_deadline_release_allows_for_the_measured_dispatch_delay) {
  // Batches took 40 ms from release to dispatch: a request with a deadline is released 60 ms
  // (1.5x) before it, not 1 ms. A late wake-up may release later than that (or even expire
  // the requests): one of three tries must show the early release (without the measured
  // delay none would).
  const SampleStore store(4);
  bool early = false;
  for (int attempt = 0; attempt < 3 && !early; ++attempt) {
    Rig rig(fixed_size(8), serving(64, no_deadline)); // would wait for 8 forever
    BatchFormer &former = *rig.former;
    for (int batch = 0; batch < 3; ++batch) {
      former.report_dispatch(now_ns() - 40 * ms);
    }
    const Nanoseconds pushed = now_ns();
    CHECK_EQ(push_with(former, store, 0, 2, {0, 200 * ms}), 2u);
    FormedBatch batch;
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    const Nanoseconds released = now_ns() - pushed;
    if (status != NextStatus::batch) {
      CHECK(status == NextStatus::expired); // late, never wrong
      continue;
    }
    CHECK_GE(released, 139 * ms); // not before it had to
    CHECK(batch.reason == dynbatch::ReleaseReason::deadline);
    // The consumer slept until the release: that is when it could first have had the batch.
    CHECK_GE(batch.released_ns - pushed, 139 * ms);
    CHECK_LE(batch.released_ns, batch.formed_ns);
    early = released < 170 * ms;
  }
  CHECK(early);
}

TEST_CASE(a_ready_batch_is_released_when_the_consumer_asks) {
  // Formed ahead while nobody asked: its dispatch delay starts at the consumer's call, so a
  // busy consumer's model time is not mistaken for a slow dispatch.
  const SampleStore store(8);
  Rig rig(fixed_size(4), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(push_with(former, store, 0, 4, {}), 4u);
  REQUIRE(eventually([&] { return former.backlog() == 4 && former.queued() == 0; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const Nanoseconds asked = now_ns();
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_GE(batch.released_ns, asked);
  CHECK_GE(batch.released_ns - batch.formed_ns, 20 * ms);
  CHECK_EQ(former.backlog(), 0u);
  CHECK_EQ(push_with(former, store, 4, 4, {}), 4u);
  REQUIRE(eventually([&] { return former.backlog() == 4 && former.queued() == 0; }));
  const Nanoseconds tried = now_ns();
  REQUIRE(former.try_next_batch(batch) == NextStatus::batch);
  CHECK_GE(batch.released_ns, tried);
}

TEST_CASE(a_partial_batch_is_released_when_due_even_if_the_consumer_came_later) {
  // The consumer asked, gave up for a while (the bindings wait in slices and need the GIL in
  // between), and came back after the batch was due: its delay counts from the due time. An
  // oversleep past the deadline (a loaded machine) expires the request instead: one of three
  // tries must come back in time.
  const SampleStore store(4);
  bool shown = false;
  for (int attempt = 0; attempt < 3 && !shown; ++attempt) {
    Rig rig(fixed_size(8), serving(64, no_deadline));
    BatchFormer &former = *rig.former;
    former.report_dispatch(now_ns() - 60 * ms); // released 90 ms before a deadline
    FormedBatch batch;
    CHECK(former.next_batch(batch, now_ns() + 5 * ms) == NextStatus::timeout);
    const Nanoseconds pushed = now_ns();
    CHECK_EQ(push_with(former, store, 0, 1, {0, 300 * ms}), 1u); // due at +210 ms
    std::this_thread::sleep_for(std::chrono::milliseconds(240));
    const Nanoseconds back = now_ns();
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    if (status != NextStatus::batch) {
      CHECK(status == NextStatus::expired); // late, never wrong
      continue;
    }
    CHECK(batch.reason == dynbatch::ReleaseReason::deadline);
    CHECK_GE(batch.released_ns - pushed, 209 * ms);
    CHECK_LE(batch.released_ns, back - 20 * ms);
    shown = true;
  }
  CHECK(shown);
}

TEST_CASE(a_request_expiring_while_the_consumer_asks_teaches_the_slack) {
  // The consumer asked for a batch, then was away (a slice of its wait ended; it needed the
  // GIL) past the request's deadline: the release came too late by at least that much. A
  // busy consumer (it had not asked again since its last batch) teaches nothing.
  const SampleStore store(10);
  Rig rig(fixed_size(8), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(former.deadline_slack(), dynbatch::DispatchDelay::initial_slack_ns);
  CHECK_EQ(push_with(former, store, 0, 8, {}), 8u);
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch); // full
  // Busy with that batch, not asking: this expiry does not say the release was late.
  CHECK_EQ(push_with(former, store, 8, 1, {0, 20 * ms}), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::expired);
  CHECK_EQ(former.deadline_slack(), dynbatch::DispatchDelay::initial_slack_ns);
  // Now it asks before the next request is due, and comes back 40 ms after.
  CHECK(former.next_batch(batch, now_ns() + 1 * ms) == NextStatus::timeout);
  CHECK_EQ(push_with(former, store, 9, 1, {0, 20 * ms}), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::expired);
  CHECK_GE(former.deadline_slack(), 30 * ms); // 1.5 x (40 - 19) ms at least
}

TEST_CASE(requests_past_their_deadline_expire_once_and_are_never_formed) {
  const SampleStore store(8);
  Rig rig(fixed_size(2), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(push_with(former, store, 0, 2, {}), 2u); // batch A fills the prefetch slot
  REQUIRE(eventually([&] { return former.queued() == 0; }));
  CHECK_EQ(push_with(former, store, 2, 2, {0, 5 * ms}), 2u); // no room to form them in time
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK(batch.ids == (std::vector<std::uint64_t>{SampleStore::id_of(0), SampleStore::id_of(1)}));
  std::vector<std::uint64_t> expired = batch.expired_ids;
  while (expired.size() < 2) {
    batch = FormedBatch{};
    const NextStatus status = former.next_batch(batch, now_ns() + hang_bound_ns);
    REQUIRE(status == NextStatus::expired);
    CHECK(batch.ids.empty());
    expired.insert(expired.end(), batch.expired_ids.begin(), batch.expired_ids.end());
  }
  std::sort(expired.begin(), expired.end());
  CHECK(expired == (std::vector<std::uint64_t>{SampleStore::id_of(2), SampleStore::id_of(3)}));
  CHECK_EQ(former.queued(), 0u); // their rows are free again
  CHECK(former.next_batch(batch, now_ns() + 50 * ms) == NextStatus::timeout);
  const auto snapshot = rig.stats->snapshot();
  CHECK_EQ(snapshot.priorities.at(0).timed_out, 2u);
  CHECK_EQ(snapshot.priorities.at(0).dispatched, 2u);
}

TEST_CASE(waiting_requests_form_by_priority) {
  const SampleStore store(8);
  Rig rig(fixed_size(2), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(push_with(former, store, 0, 2, {}), 2u); // batch A fills the prefetch slot
  REQUIRE(eventually([&] { return former.queued() == 0; }));
  const std::int32_t priorities[5] = {0, 0, 5, 5, 1};
  for (std::size_t k = 0; k < 5; ++k) {
    CHECK_EQ(push_with(former, store, 2 + k, 1, {priorities[k], no_deadline}), 1u);
  }
  former.close_input();
  std::vector<std::uint64_t> order;
  FormedBatch batch;
  while (former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch) {
    for (const std::uint64_t id : batch.ids) {
      order.push_back(SampleStore::index_of(id));
    }
  }
  CHECK(order == (std::vector<std::uint64_t>{0, 1, 4, 5, 6, 2, 3}));
  const auto snapshot = rig.stats->snapshot();
  CHECK_EQ(snapshot.priorities.at(5).dispatched, 2u);
  CHECK_EQ(snapshot.priorities.at(1).dispatched, 1u);
  CHECK_EQ(snapshot.priorities.at(0).dispatched, 4u);
}

TEST_CASE(wait_for_room_wakes_when_a_batch_forms) {
  const SampleStore store(8);
  Rig rig(fixed_size(2), serving(2, no_deadline));
  BatchFormer &former = *rig.former;
  // Two fill the table, form a batch at once and leave it: two more fit, then it is full.
  CHECK_EQ(push_with(former, store, 0, 2, {}), 2u);
  REQUIRE(eventually([&] { return former.queued() == 0; }));
  CHECK_EQ(push_with(former, store, 2, 2, {}), 2u);
  CHECK_EQ(push_with(former, store, 4, 1, {}), 0u);
  std::thread consumer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    FormedBatch batch;
    CHECK(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  });
  CHECK(former.wait_for_room(now_ns() + hang_bound_ns));
  CHECK_EQ(push_with(former, store, 4, 1, {}), 1u);
  consumer.join();
  former.close_input();
  CHECK(!former.wait_for_room(now_ns() + hang_bound_ns)); // closed: no room ever
}

TEST_CASE(without_collation_batches_carry_ids_and_no_slot) {
  FormerOptions options{64, 1};
  options.collate = false;
  Rig rig(fixed_size(8), options);
  BatchFormer &former = *rig.former;
  std::vector<std::uint64_t> ids(20);
  for (std::size_t k = 0; k < ids.size(); ++k) {
    ids[k] = SampleStore::id_of(k);
  }
  CHECK_EQ(former.push(ids, {}), ids.size()); // no sources: the caller collates
  former.close_input();
  std::vector<std::size_t> sizes;
  std::uint64_t next_id = SampleStore::id_of(0);
  for (FormedBatch batch;
       former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch;) {
    CHECK(batch.lease == nullptr);
    for (const std::uint64_t id : batch.ids) {
      CHECK_EQ(id, next_id++);
    }
    sizes.push_back(batch.ids.size());
  }
  CHECK(sizes == std::vector<std::size_t>({8, 8, 4}));
  CHECK_EQ(rig.stats->snapshot().samples, 20u);
  CHECK_EQ(rig.pool->stats().acquisitions, 0u);
}

TEST_CASE(without_a_thread_the_consumer_forms_every_batch) {
  FormerOptions options{64, 1};
  options.own_thread = false;
  Rig rig(fixed_size(8), options);
  BatchFormer &former = *rig.former;
  const SampleStore store(20);
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(0, 12, ids, sources);
  CHECK_EQ(former.push(ids, sources), 12u);
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 8u);
  CHECK_EQ(content_mismatches(*former.layout(), batch, store), 0u);
  // Four pushed, eight wanted, input open: nobody will push, so it says so instead of waiting.
  CHECK_THROWS_AS(former.next_batch(batch, now_ns() + hang_bound_ns), std::logic_error);
  store.describe(12, 8, ids, sources);
  CHECK_EQ(former.push(ids, sources), 8u);
  former.close_input();
  std::vector<std::size_t> sizes;
  while (former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch) {
    CHECK_EQ(content_mismatches(*former.layout(), batch, store), 0u);
    sizes.push_back(batch.ids.size());
  }
  CHECK(sizes == std::vector<std::size_t>({8, 4}));
  former.close();
  former.close(); // idempotent without a thread too
}

TEST_CASE(without_collation_push_rejects_sources) {
  FormerOptions options{64, 1};
  options.collate = false;
  Rig rig(fixed_size(8), options);
  const SampleStore store(1);
  std::vector<std::uint64_t> ids;
  std::vector<const void *> sources;
  store.describe(0, 1, ids, sources);
  CHECK_THROWS_AS(rig.former->push(ids, sources), std::invalid_argument);
}

// A consumer busy with a batch does not call next_batch: wait_late() reports, at their
// deadlines, the requests still waiting to be formed (expired) and those in a formed batch
// not delivered yet (late), each once; the batch keeps its late requests.
TEST_CASE(wait_late_reports_expired_and_late_requests_while_the_consumer_is_busy) {
  const SampleStore store(8);
  Rig rig(fixed_size(2), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(push_with(former, store, 0, 2, {0, 40 * ms}), 2u); // formed ahead, not delivered
  REQUIRE(eventually([&] { return former.queued() == 0; }));
  CHECK_EQ(push_with(former, store, 2, 1, {0, 20 * ms}), 1u); // waits for a second request
  std::vector<std::uint64_t> expired;
  std::vector<std::uint64_t> late;
  while (expired.size() + late.size() < 3) {
    REQUIRE(former.wait_late(expired, late, now_ns() + hang_bound_ns) == NextStatus::batch);
  }
  CHECK(expired == (std::vector<std::uint64_t>{SampleStore::id_of(2)}));
  std::sort(late.begin(), late.end());
  CHECK(late == (std::vector<std::uint64_t>{SampleStore::id_of(0), SampleStore::id_of(1)}));
  // Reported once: nothing more comes before the next (absent) deadline.
  expired.clear();
  late.clear();
  CHECK(former.wait_late(expired, late, now_ns() + 30 * ms) == NextStatus::timeout);
  FormedBatch batch;
  REQUIRE(former.next_batch(batch, now_ns() + hang_bound_ns) == NextStatus::batch);
  CHECK_EQ(batch.ids.size(), 2u);   // the consumer drops the late ones itself
  CHECK(batch.expired_ids.empty()); // id 2 was reported by wait_late, not again here
}

TEST_CASE(wait_late_wakes_for_a_push_with_an_earlier_deadline) {
  const SampleStore store(8);
  Rig rig(fixed_size(4), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  CHECK_EQ(push_with(former, store, 0, 1, {0, 60'000 * ms}), 1u); // a minute away
  std::atomic<bool> done{false};
  std::vector<std::uint64_t> expired;
  std::vector<std::uint64_t> late;
  std::thread watcher([&] {
    while (expired.empty()) {
      if (former.wait_late(expired, late, now_ns() + hang_bound_ns) != NextStatus::batch) {
        break;
      }
    }
    done.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20)); // the watcher sleeps for a minute
  CHECK_EQ(push_with(former, store, 1, 1, {0, 10 * ms}), 1u);
  watcher.join();
  CHECK(done.load());
  CHECK(expired == (std::vector<std::uint64_t>{SampleStore::id_of(1)}));
}

TEST_CASE(wait_late_returns_finished_when_closed) {
  Rig rig(fixed_size(4), serving(64, no_deadline));
  BatchFormer &former = *rig.former;
  std::atomic<int> status{-1};
  std::thread watcher([&] {
    std::vector<std::uint64_t> expired;
    std::vector<std::uint64_t> late;
    status.store(static_cast<int>(former.wait_late(expired, late, no_deadline)));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  former.close();
  watcher.join();
  CHECK_EQ(status.load(), static_cast<int>(NextStatus::finished));
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
