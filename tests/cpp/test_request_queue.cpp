// MpmcRing and BlockingQueue: FIFO at every capacity, full/empty edges, counters across the
// uint64 wrap-around, close() and deadlines, and P x C stress with exactly-once and
// per-producer order checks (more threads than this machine's cores included).
//
// Stress size: DYNBATCH_STRESS_ITEMS items per ring scenario (default 200000, 100000 under TSan);
// the blocking-queue scenarios, which sleep and wake per item, use half as many.

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <latch>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dynbatch/blocking_queue.hpp"
#include "dynbatch/request_queue.hpp"
#include "test_support.hpp"

using dynbatch::BlockingQueue;
using dynbatch::MpmcRing;
using dynbatch::Nanoseconds;
using dynbatch::no_deadline;
using dynbatch::now_ns;
using dynbatch::PushResult;

namespace {

constexpr Nanoseconds ms = 1'000'000;
constexpr Nanoseconds hang_bound_ns = 5'000 * ms; // only to detect a hang, not a timing claim

// A descriptor-sized element whose fields must stay consistent: a torn or mixed copy (two
// producers in one slot, a read before the write is published) breaks the checksum.
struct Item {
  std::uint32_t producer = 0;
  std::uint32_t spare = 0;
  std::uint64_t sequence = 0;
  std::uint64_t checksum = 0;
  Nanoseconds enqueue_ns = 0;
};

std::uint64_t checksum_of(std::uint32_t producer, std::uint64_t sequence) {
  return (sequence * 0x9E3779B97F4A7C15ull) ^ (std::uint64_t{producer} << 40) ^ 0x5bd1e995ull;
}

Item make_item(std::uint32_t producer, std::uint64_t sequence) {
  return Item{producer, ~producer, sequence, checksum_of(producer, sequence), 0};
}

bool item_intact(const Item &item) {
  return item.spare == ~item.producer && item.checksum == checksum_of(item.producer, item.sequence);
}

std::size_t stress_items() {
  return dynbatch::testing::env_size("DYNBATCH_STRESS_ITEMS",
                                     dynbatch::testing::under_tsan ? 100'000 : 200'000);
}

std::vector<std::size_t> powers_of_two_up_to(std::size_t limit) {
  std::vector<std::size_t> capacities;
  for (std::size_t capacity = 1; capacity <= limit; capacity *= 2) {
    capacities.push_back(capacity);
  }
  return capacities;
}

// Checks what the consumers saw: every (producer, sequence) exactly once, and each consumer saw
// each producer's items in increasing sequence order.
void check_exactly_once_in_order(const std::vector<std::vector<Item>> &seen_by_consumer,
                                 std::size_t producers, std::size_t per_producer) {
  std::vector<std::uint8_t> seen(producers * per_producer, 0);
  std::size_t total = 0;
  std::size_t duplicates = 0;
  std::size_t out_of_range = 0;
  std::size_t torn = 0;
  std::size_t out_of_order = 0;
  for (const std::vector<Item> &items : seen_by_consumer) {
    std::vector<std::int64_t> last(producers, -1);
    for (const Item &item : items) {
      ++total;
      if (!item_intact(item)) {
        ++torn;
        continue;
      }
      if (item.producer >= producers || item.sequence >= per_producer) {
        ++out_of_range;
        continue;
      }
      std::uint8_t &mark = seen[item.producer * per_producer + item.sequence];
      if (mark != 0) {
        ++duplicates;
      }
      mark = 1;
      if (static_cast<std::int64_t>(item.sequence) <= last[item.producer]) {
        ++out_of_order;
      }
      last[item.producer] = static_cast<std::int64_t>(item.sequence);
    }
  }
  CHECK_EQ(total, producers * per_producer);
  CHECK_EQ(torn, 0u);
  CHECK_EQ(out_of_range, 0u);
  CHECK_EQ(duplicates, 0u);
  CHECK_EQ(out_of_order, 0u);
  CHECK_EQ(static_cast<std::size_t>(std::count(seen.begin(), seen.end(), 1)),
           producers * per_producer);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// MpmcRing, single thread

// Only trivially copyable descriptors may enter the ring (copying a py::object needs the GIL).
template <class T>
concept RingElement = requires { typename MpmcRing<T>; };
static_assert(RingElement<Item>);
static_assert(RingElement<std::uint32_t>);
static_assert(!RingElement<std::string>);
static_assert(!RingElement<std::vector<int>>);

TEST_CASE(ring_rejects_bad_capacities) {
  CHECK_THROWS_AS(MpmcRing<int>(0), std::invalid_argument);
  for (const std::size_t capacity : {3u, 5u, 6u, 7u, 12u, 1000u, 1023u, 1025u}) {
    CHECK_THROWS_AS(MpmcRing<int>(capacity), std::invalid_argument);
  }
  CHECK_THROWS_AS(BlockingQueue<int>(0), std::invalid_argument);
  CHECK_THROWS_AS(BlockingQueue<int>(24), std::invalid_argument);
  for (const std::size_t capacity : powers_of_two_up_to(1024)) {
    MpmcRing<int> ring(capacity);
    CHECK_EQ(ring.capacity(), capacity);
  }
}

TEST_CASE(ring_fill_then_drain_fifo_at_every_capacity) {
  for (const std::size_t capacity : powers_of_two_up_to(1024)) {
    MpmcRing<std::uint64_t> ring(capacity);
    std::uint64_t scratch = 12345;
    CHECK(!ring.try_pop(scratch));
    CHECK_EQ(scratch, 12345u); // a failed pop leaves the output alone
    // Three laps, so every slot is reused after its first turn.
    for (std::uint64_t lap = 0; lap < 3; ++lap) {
      for (std::size_t i = 0; i < capacity; ++i) {
        CHECK_EQ(ring.was_size(), i);
        CHECK(ring.try_push(lap * 100'000 + i));
      }
      CHECK_EQ(ring.was_size(), capacity);
      // REQUIRE: a push that lands in a full ring corrupts it, and later pops could spin.
      REQUIRE(!ring.try_push(999'999'999));
      CHECK_EQ(ring.was_size(), capacity);
      for (std::size_t i = 0; i < capacity; ++i) {
        std::uint64_t value = 0;
        CHECK(ring.try_pop(value));
        CHECK_EQ(value, lap * 100'000 + i);
        CHECK_EQ(ring.was_size(), capacity - i - 1);
      }
      std::uint64_t value = 0;
      CHECK(!ring.try_pop(value));
      CHECK_EQ(ring.was_size(), 0u);
    }
  }
}

TEST_CASE(ring_interleaved_push_pop_keeps_fifo) {
  MpmcRing<std::uint64_t> ring(8);
  std::uint64_t next_in = 0;
  std::uint64_t next_out = 0;
  // Varying fill levels: push k, pop k-1, so the ring walks through all slot positions.
  for (int round = 0; round < 200; ++round) {
    const int pushes = 1 + round % 5;
    for (int i = 0; i < pushes && ring.was_size() < ring.capacity(); ++i) {
      CHECK(ring.try_push(next_in++));
    }
    const int pops = round % 5;
    for (int i = 0; i < pops; ++i) {
      std::uint64_t value = 0;
      if (!ring.try_pop(value)) {
        break;
      }
      CHECK_EQ(value, next_out++);
    }
  }
  std::uint64_t value = 0;
  while (ring.try_pop(value)) {
    CHECK_EQ(value, next_out++);
  }
  CHECK_EQ(next_out, next_in);
}

TEST_CASE(ring_counters_near_wraparound) {
  const std::uint64_t starts[] = {UINT64_MAX - 5, UINT64_MAX, UINT64_MAX - 1024,
                                  (std::uint64_t{1} << 63) - 3};
  for (const std::uint64_t start : starts) {
    for (const std::size_t capacity : {1u, 2u, 4u, 8u, 1024u}) {
      MpmcRing<std::uint64_t> ring(capacity, start);
      CHECK_EQ(ring.was_size(), 0u);
      std::uint64_t pushed = 0;
      std::uint64_t popped = 0;
      // Enough laps that head and tail both pass UINT64_MAX -> 0 (and 2^63 for the signed lag).
      const std::uint64_t total = 3 * capacity + 2100;
      while (popped < total) {
        while (pushed < total && ring.was_size() < capacity) {
          CHECK(ring.try_push(pushed));
          ++pushed;
        }
        if (ring.was_size() == capacity) {
          REQUIRE(!ring.try_push(UINT64_MAX)); // full
        }
        CHECK_EQ(ring.was_size(), pushed - popped);
        // Drain half (at least one) to keep the fill level moving.
        const std::uint64_t drain = std::max<std::uint64_t>(1, (pushed - popped) / 2);
        for (std::uint64_t i = 0; i < drain; ++i) {
          std::uint64_t value = 0;
          REQUIRE(ring.try_pop(value));
          CHECK_EQ(value, popped);
          ++popped;
        }
      }
      std::uint64_t value = 0;
      CHECK(!ring.try_pop(value));
      CHECK_EQ(ring.was_size(), 0u);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// MpmcRing, P x C stress

namespace {

void ring_stress(std::size_t producers, std::size_t consumers, std::size_t capacity,
                 std::uint64_t start_position) {
  const std::size_t per_producer = std::max<std::size_t>(1, stress_items() / producers);
  const std::size_t total = per_producer * producers;
  MpmcRing<Item> ring(capacity, start_position);
  std::atomic<std::size_t> popped_total{0};
  std::vector<std::vector<Item>> seen(consumers);
  std::latch start(static_cast<std::ptrdiff_t>(producers + consumers));
  std::vector<std::thread> threads;

  for (std::size_t p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      start.arrive_and_wait();
      for (std::uint64_t s = 0; s < per_producer; ++s) {
        const Item item = make_item(static_cast<std::uint32_t>(p), s);
        while (!ring.try_push(item)) {
          std::this_thread::yield();
        }
      }
    });
  }
  for (std::size_t c = 0; c < consumers; ++c) {
    threads.emplace_back([&, c] {
      std::vector<Item> &mine = seen[c];
      mine.reserve(total / consumers + 1024);
      start.arrive_and_wait();
      while (popped_total.load(std::memory_order_relaxed) < total) {
        Item item;
        if (ring.try_pop(item)) {
          mine.push_back(item);
          popped_total.fetch_add(1, std::memory_order_relaxed);
        } else {
          std::this_thread::yield();
        }
      }
    });
  }
  for (std::thread &thread : threads) {
    thread.join();
  }
  check_exactly_once_in_order(seen, producers, per_producer);
  CHECK_EQ(ring.was_size(), 0u);
  Item leftover;
  CHECK(!ring.try_pop(leftover));
}

} // namespace

TEST_CASE(ring_stress_1x1_capacity_2) {
  ring_stress(1, 1, 2, 0);
}
TEST_CASE(ring_stress_4x4_capacity_8) {
  ring_stress(4, 4, 8, 0);
}
TEST_CASE(ring_stress_8x8_capacity_64_near_wrap) {
  ring_stress(8, 8, 64, UINT64_MAX - 1000);
}
TEST_CASE(ring_stress_6x2_capacity_1024) {
  ring_stress(6, 2, 1024, 0);
}

// ---------------------------------------------------------------------------------------------
// BlockingQueue, single thread and deadlines

TEST_CASE(blocking_try_push_try_pop_bulk_fifo) {
  for (const std::size_t capacity : powers_of_two_up_to(1024)) {
    BlockingQueue<std::uint64_t> queue(capacity);
    CHECK_EQ(queue.capacity(), capacity);
    for (std::size_t i = 0; i < capacity; ++i) {
      CHECK(queue.try_push(i) == PushResult::ok);
    }
    REQUIRE(queue.try_push(7) == PushResult::full); // see ring_fill_then_drain_fifo_...
    CHECK_EQ(queue.was_size(), capacity);
    std::vector<std::uint64_t> out(capacity + 3, UINT64_MAX);
    // Pop in chunks of 3 to check that bulk pops continue where the last one stopped.
    std::size_t taken = 0;
    while (taken < capacity) {
      const std::size_t got = queue.try_pop_bulk(out.data() + taken, 3);
      CHECK_EQ(got, std::min<std::size_t>(3, capacity - taken));
      REQUIRE(got > 0);
      taken += got;
    }
    for (std::size_t i = 0; i < capacity; ++i) {
      CHECK_EQ(out[i], i);
    }
    CHECK_EQ(out[capacity], UINT64_MAX); // nothing written past what was popped
    CHECK_EQ(queue.try_pop_bulk(out.data(), 3), 0u);
  }
}

TEST_CASE(blocking_counters_near_wraparound) {
  BlockingQueue<std::uint64_t> queue(4, UINT64_MAX - 5);
  std::uint64_t next_in = 0;
  std::uint64_t next_out = 0;
  std::uint64_t out[4];
  for (int round = 0; round < 50; ++round) {
    while (queue.try_push(next_in) == PushResult::ok) {
      ++next_in;
    }
    CHECK_EQ(queue.was_size(), 4u);
    const std::size_t got = queue.pop_bulk_until(out, 1 + round % 4, no_deadline);
    CHECK_EQ(got, 1u + round % 4);
    for (std::size_t i = 0; i < got; ++i) {
      CHECK_EQ(out[i], next_out++);
    }
  }
  CHECK_GT(next_in, 100u); // the positions went well past the wrap
}

TEST_CASE(blocking_pop_bulk_until_returns_at_deadline_with_what_it_has) {
  BlockingQueue<int> queue(16);
  for (int i = 0; i < 3; ++i) {
    CHECK(queue.try_push(i) == PushResult::ok);
  }
  int out[10] = {};
  const Nanoseconds start = now_ns();
  const std::size_t got = queue.pop_bulk_until(out, 10, start + 50 * ms);
  const Nanoseconds elapsed = now_ns() - start;
  CHECK_EQ(got, 3u);
  CHECK_EQ(out[0], 0);
  CHECK_EQ(out[1], 1);
  CHECK_EQ(out[2], 2);
  // It waited for more until the deadline (not closed, not full) and no longer than a hang.
  CHECK_GE(elapsed, 49 * ms);
  CHECK_LT(elapsed, hang_bound_ns);

  // Empty queue: 0 after the deadline.
  const Nanoseconds start_empty = now_ns();
  CHECK_EQ(queue.pop_bulk_until(out, 4, start_empty + 20 * ms), 0u);
  CHECK_GE(now_ns() - start_empty, 19 * ms);

  // A deadline already past: whatever is there, without sleeping.
  CHECK(queue.try_push(42) == PushResult::ok);
  CHECK_EQ(queue.pop_bulk_until(out, 4, now_ns() - 1000 * ms), 1u);
  CHECK_EQ(out[0], 42);
  CHECK_EQ(queue.pop_bulk_until(out, 4, 0), 0u);
}

TEST_CASE(blocking_pop_bulk_until_returns_when_max_reached_before_deadline) {
  BlockingQueue<int> queue(16);
  std::thread producer([&] {
    for (int i = 0; i < 5; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      CHECK(queue.push_until(i, no_deadline) == PushResult::ok);
    }
  });
  int out[5] = {};
  const Nanoseconds start = now_ns();
  // The deadline is far away: it must return as soon as the 5th item lands.
  const std::size_t got = queue.pop_bulk_until(out, 5, start + 60'000 * ms);
  CHECK_EQ(got, 5u);
  CHECK_LT(now_ns() - start, hang_bound_ns);
  for (int i = 0; i < 5; ++i) {
    CHECK_EQ(out[i], i);
  }
  producer.join();
}

TEST_CASE(blocking_close_wakes_blocked_consumer) {
  BlockingQueue<int> queue(8);
  std::atomic<bool> returned{false};
  std::size_t got = 99;
  std::latch waiting(1);
  std::thread consumer([&] {
    int out[4];
    waiting.count_down();
    got = queue.pop_bulk_until(out, 4, no_deadline);
    returned.store(true);
  });
  waiting.wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(!returned.load()); // still blocked: nothing to pop and not closed
  const Nanoseconds start = now_ns();
  queue.close();
  consumer.join();
  CHECK_LT(now_ns() - start, hang_bound_ns);
  CHECK_EQ(got, 0u);
  CHECK(queue.closed());
  queue.close(); // idempotent
  CHECK(queue.closed());
}

TEST_CASE(blocking_close_returns_partial_bulk_to_blocked_consumer) {
  BlockingQueue<int> queue(8);
  std::size_t got = 99;
  int out[6] = {};
  CHECK(queue.try_push(10) == PushResult::ok);
  CHECK(queue.try_push(11) == PushResult::ok);
  std::thread consumer([&] { got = queue.pop_bulk_until(out, 6, no_deadline); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  queue.close();
  consumer.join();
  CHECK_EQ(got, 2u);
  CHECK_EQ(out[0], 10);
  CHECK_EQ(out[1], 11);
}

TEST_CASE(blocking_push_after_close_and_drain) {
  BlockingQueue<int> queue(4);
  CHECK(queue.try_push(1) == PushResult::ok);
  CHECK(queue.try_push(2) == PushResult::ok);
  queue.close();
  CHECK(queue.try_push(3) == PushResult::closed);
  CHECK(queue.push_until(3, no_deadline) == PushResult::closed);
  CHECK(queue.push_until(3, now_ns() + 10 * ms) == PushResult::closed);
  int out[4] = {};
  // Pops drain what was queued before close(), then return 0 at once (no deadline needed).
  CHECK_EQ(queue.pop_bulk_until(out, 4, no_deadline), 2u);
  CHECK_EQ(out[0], 1);
  CHECK_EQ(out[1], 2);
  const Nanoseconds start = now_ns();
  CHECK_EQ(queue.pop_bulk_until(out, 4, no_deadline), 0u);
  CHECK_EQ(queue.try_pop_bulk(out, 4), 0u);
  CHECK_LT(now_ns() - start, hang_bound_ns);
}

TEST_CASE(blocking_push_until_full_times_out_then_succeeds_when_space_frees) {
  BlockingQueue<int> queue(2);
  CHECK(queue.try_push(1) == PushResult::ok);
  CHECK(queue.try_push(2) == PushResult::ok);
  const Nanoseconds start = now_ns();
  CHECK(queue.push_until(3, start + 30 * ms) == PushResult::full);
  CHECK_GE(now_ns() - start, 29 * ms);
  CHECK_EQ(queue.was_size(), 2u);

  std::atomic<bool> pushed{false};
  PushResult result = PushResult::full;
  std::thread producer([&] {
    result = queue.push_until(3, no_deadline);
    pushed.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(!pushed.load()); // still waiting for space
  int out[1] = {};
  const Nanoseconds freed = now_ns();
  CHECK_EQ(queue.try_pop_bulk(out, 1), 1u);
  CHECK_EQ(out[0], 1);
  producer.join();
  CHECK_LT(now_ns() - freed, hang_bound_ns);
  CHECK(result == PushResult::ok);
  int rest[2] = {};
  CHECK_EQ(queue.try_pop_bulk(rest, 2), 2u);
  CHECK_EQ(rest[0], 2);
  CHECK_EQ(rest[1], 3);
}

TEST_CASE(blocking_close_wakes_blocked_producer) {
  BlockingQueue<int> queue(1);
  CHECK(queue.try_push(1) == PushResult::ok);
  REQUIRE(queue.try_push(2) == PushResult::full);
  PushResult result = PushResult::ok;
  std::thread producer([&] { result = queue.push_until(2, no_deadline); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const Nanoseconds start = now_ns();
  queue.close();
  producer.join();
  CHECK_LT(now_ns() - start, hang_bound_ns);
  CHECK(result == PushResult::closed);
  CHECK_EQ(queue.was_size(), 1u);
}

// ---------------------------------------------------------------------------------------------
// BlockingQueue, P x C stress: push_until / pop_bulk_until, then close() and drain.

namespace {

void blocking_stress(std::size_t producers, std::size_t consumers, std::size_t capacity,
                     std::size_t max_bulk) {
  const std::size_t per_producer = std::max<std::size_t>(1, stress_items() / 2 / producers);
  BlockingQueue<Item> queue(capacity, UINT64_MAX - 3 * capacity);
  std::vector<std::vector<Item>> seen(consumers);
  std::barrier start(static_cast<std::ptrdiff_t>(producers + consumers + 1));
  std::atomic<std::size_t> timeouts{0};
  std::vector<std::thread> threads;

  for (std::size_t p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      start.arrive_and_wait();
      for (std::uint64_t s = 0; s < per_producer; ++s) {
        Item item = make_item(static_cast<std::uint32_t>(p), s);
        item.enqueue_ns = now_ns();
        // Odd producers use short deadlines and retry, so the timeout path runs under load.
        const bool short_deadline = p % 2 == 1;
        for (;;) {
          const PushResult result =
              queue.push_until(item, short_deadline ? now_ns() + 1 * ms : no_deadline);
          if (result == PushResult::ok) {
            break;
          }
          CHECK(result == PushResult::full);
          if (result != PushResult::full) {
            return;
          }
          timeouts.fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  }
  for (std::size_t c = 0; c < consumers; ++c) {
    threads.emplace_back([&, c] {
      std::vector<Item> &mine = seen[c];
      std::vector<Item> out(max_bulk);
      start.arrive_and_wait();
      // Even consumers sleep with no deadline and rely on close() to wake them at the end.
      const bool no_timeout = c % 2 == 0;
      for (;;) {
        const std::size_t got = queue.pop_bulk_until(out.data(), max_bulk,
                                                     no_timeout ? no_deadline : now_ns() + 2 * ms);
        mine.insert(mine.end(), out.begin(), out.begin() + static_cast<std::ptrdiff_t>(got));
        if (got == 0 && queue.closed() && queue.was_size() == 0) {
          return;
        }
      }
    });
  }
  start.arrive_and_wait();
  for (std::size_t p = 0; p < producers; ++p) {
    threads[p].join();
  }
  const Nanoseconds closed_at = now_ns();
  queue.close();
  for (std::size_t c = 0; c < consumers; ++c) {
    threads[producers + c].join();
  }
  CHECK_LT(now_ns() - closed_at, hang_bound_ns);
  check_exactly_once_in_order(seen, producers, per_producer);
  CHECK_EQ(queue.was_size(), 0u);
  CHECK(queue.try_push(make_item(0, 0)) == PushResult::closed);
}

} // namespace

TEST_CASE(blocking_stress_4x4_capacity_16_bulk_4) {
  blocking_stress(4, 4, 16, 4);
}
TEST_CASE(blocking_stress_8x8_capacity_8_bulk_3) {
  blocking_stress(8, 8, 8, 3);
}
TEST_CASE(blocking_stress_1x3_capacity_2_bulk_1) {
  blocking_stress(1, 3, 2, 1);
}
TEST_CASE(blocking_stress_6x1_capacity_256_bulk_64) {
  blocking_stress(6, 1, 256, 64);
}

// Last: with a ring that mishandles capacity 1 this one would spin until the watchdog fires.
TEST_CASE(ring_stress_2x6_capacity_1) {
  ring_stress(2, 6, 1, 0);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
