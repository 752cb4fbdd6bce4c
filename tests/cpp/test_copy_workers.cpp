// CopyWorkers: ranges cover [0, count) exactly once, helpers really run some, exceptions come
// back to the caller, concurrent callers never wait for each other's copy, and a large collate
// split between threads equals the single-threaded one byte for byte.

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "dynbatch/collator.hpp"
#include "dynbatch/copy_workers.hpp"
#include "test_support.hpp"

using dynbatch::BatchLayout;
using dynbatch::CopyWorkers;
using dynbatch::LeafLayout;
namespace dl = dynbatch::dlpack;

TEST_CASE(ranges_cover_everything_once) {
  CopyWorkers workers(3);
  for (const std::size_t count : {0u, 1u, 2u, 3u, 4u, 5u, 97u, 1000u}) {
    std::vector<std::atomic<int>> hits(count);
    std::mutex seen_mutex;
    std::vector<std::thread::id> seen;
    workers.parallel_for(count, [&](std::size_t begin, std::size_t end) {
      {
        std::lock_guard lock(seen_mutex);
        seen.push_back(std::this_thread::get_id());
      }
      for (std::size_t i = begin; i < end; ++i) {
        hits[i].fetch_add(1);
      }
    });
    for (std::size_t i = 0; i < count; ++i) {
      CHECK_EQ(hits[i].load(), 1);
    }
    if (count >= 4) {
      CHECK_GE(seen.size(), 3u); // split: the caller and the helpers
    }
  }
}

TEST_CASE(an_exception_in_a_range_reaches_the_caller) {
  CopyWorkers workers(2);
  CHECK_THROWS_AS(workers.parallel_for(90,
                                       [](std::size_t begin, std::size_t) {
                                         if (begin >= 30) {
                                           throw std::runtime_error("helper range failed");
                                         }
                                       }),
                  std::runtime_error);
  std::atomic<std::size_t> total{0};
  workers.parallel_for(90, [&](std::size_t begin, std::size_t end) { total += end - begin; });
  CHECK_EQ(total.load(), 90u); // usable after a failure
}

TEST_CASE(concurrent_callers_each_cover_their_range) {
  CopyWorkers workers(2);
  std::vector<std::thread> callers;
  std::atomic<std::size_t> covered{0};
  const int rounds = dynbatch::testing::under_tsan ? 50 : 500;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < rounds; ++round) {
        workers.parallel_for(64,
                             [&](std::size_t begin, std::size_t end) { covered += end - begin; });
      }
    });
  }
  for (auto &caller : callers) {
    caller.join();
  }
  CHECK_EQ(covered.load(), 4u * static_cast<std::size_t>(rounds) * 64u);
}

TEST_CASE(split_collate_equals_single_threaded_collate) {
  // 256 samples of 32 KiB: 8 MiB, above the parallel threshold; and a padded leaf.
  LeafLayout rows{{-1, 64}, dl::DLDataType{dl::kDLFloat, 32, 1}, 256, true, {}};
  rows.pad_element.assign(4, std::byte{0x7F});
  const BatchLayout layout(
      {LeafLayout{{8192}, dl::DLDataType{dl::kDLFloat, 32, 1}, 32768, false, {}}, rows});
  const std::size_t n = 256;
  std::vector<std::vector<float>> fixed(n, std::vector<float>(8192));
  std::vector<std::vector<float>> padded(n);
  std::vector<std::uint32_t> lengths(n);
  std::vector<const void *> sources;
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t k = 0; k < fixed[i].size(); ++k) {
      fixed[i][k] = static_cast<float>(i * 8192 + k);
    }
    lengths[i] = static_cast<std::uint32_t>((i * 37) % 20);
    padded[i].assign(lengths[i] * 64u, static_cast<float>(i));
    sources.push_back(fixed[i].data());
    sources.push_back(padded[i].data());
  }
  const std::size_t padded_length = 20;
  REQUIRE(layout.batch_bytes(n, padded_length) >= dynbatch::parallel_copy_bytes);
  std::vector<std::byte> serial(layout.batch_bytes(n, padded_length));
  std::vector<std::byte> split(serial.size());
  dynbatch::collate(layout, sources, n, serial.data(), lengths, padded_length);
  CopyWorkers workers(3);
  dynbatch::collate(layout, sources, n, split.data(), lengths, padded_length, &workers);
  CHECK(std::memcmp(serial.data(), split.data(), serial.size()) == 0);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
