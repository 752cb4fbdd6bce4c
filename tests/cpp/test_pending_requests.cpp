// PendingRequests: priority order, FIFO within a priority, aging against starvation, deadlines
// (expire exactly once, never taken), rows reused after expiry, and the two clocks it reports.

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "dynbatch/pending_requests.hpp"
#include "test_support.hpp"

using dynbatch::Nanoseconds;
using dynbatch::no_deadline;
using dynbatch::PendingRequests;
using dynbatch::RequestDescriptor;
using dynbatch::TakeLimits;

namespace {

constexpr Nanoseconds ms = 1'000'000;

RequestDescriptor request(std::uint64_t id, std::int32_t priority, Nanoseconds enqueue,
                          Nanoseconds deadline = no_deadline) {
  return RequestDescriptor{id, static_cast<std::uint32_t>(id % 64), priority, enqueue, deadline, 0};
}

std::vector<std::uint64_t> ids_of(const std::vector<RequestDescriptor> &requests) {
  std::vector<std::uint64_t> ids;
  for (const auto &r : requests) {
    ids.push_back(r.id);
  }
  return ids;
}

} // namespace

TEST_CASE(higher_priority_first_fifo_within_a_priority) {
  PendingRequests pending(64, 1'000 * ms);
  pending.add(request(1, 0, 0));
  pending.add(request(2, 5, 1));
  pending.add(request(3, 0, 2));
  pending.add(request(4, 5, 3));
  pending.add(request(5, -3, 4));
  CHECK_EQ(pending.size(), 5u);
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{3}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{2, 4, 1}));
  out.clear();
  pending.take(TakeLimits{10}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{3, 5}));
  CHECK(pending.empty());
  CHECK_EQ(pending.oldest_enqueue_ns(), no_deadline);
}

TEST_CASE(aging_lets_a_low_priority_overtake_a_saturating_stream) {
  PendingRequests pending(64, 10 * ms); // one level per 10 ms waited
  pending.add(request(1, 0, 0));
  // A priority-3 request arriving at 25 ms outranks the low one (0 + 2 levels).
  pending.add(request(2, 3, 25 * ms));
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{1}, 25 * ms, out);
  CHECK_EQ(out.at(0).id, 2u);
  // At 45 ms the low one has aged 4 levels: it beats a fresh priority-3 request.
  pending.add(request(3, 3, 45 * ms));
  out.clear();
  pending.take(TakeLimits{1}, 45 * ms, out);
  CHECK_EQ(out.at(0).id, 1u);
  // At 60 ms: id 3 ranks 3 + 1; ids 4 (0 + 1) and 5 (1 + 0) tie, and the larger base wins.
  pending.add(request(4, 0, 50 * ms));
  pending.add(request(5, 1, 60 * ms));
  out.clear();
  pending.take(TakeLimits{3}, 60 * ms, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{3, 5, 4}));
}

TEST_CASE(expired_requests_leave_once_and_are_never_taken) {
  PendingRequests pending(64, 1'000 * ms);
  pending.add(request(1, 0, 0, 5 * ms));
  pending.add(request(2, 0, 1, no_deadline));
  pending.add(request(3, 0, 2, 3 * ms));
  pending.add(request(4, 9, 3, 50 * ms));
  CHECK_EQ(pending.earliest_deadline_ns(), 3 * ms);
  CHECK_EQ(pending.oldest_enqueue_ns(), 0);
  std::vector<RequestDescriptor> expired;
  pending.expire(2 * ms, expired);
  CHECK(expired.empty());
  pending.expire(5 * ms, expired);
  CHECK(ids_of(expired) == (std::vector<std::uint64_t>{3, 1}));
  CHECK_EQ(expired.at(0).priority, 0);
  CHECK_EQ(pending.size(), 2u);
  pending.expire(6 * ms, expired); // nothing twice
  CHECK_EQ(expired.size(), 2u);
  CHECK_EQ(pending.oldest_enqueue_ns(), 1); // id 1 was the oldest and is gone
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{10}, 6 * ms, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{4, 2}));
  // Taken before its deadline: its heap entry is stale and never expires.
  CHECK_EQ(pending.earliest_deadline_ns(), no_deadline);
  pending.expire(100 * ms, expired);
  CHECK_EQ(expired.size(), 2u);
}

TEST_CASE(a_row_reused_after_expiry_is_not_confused_with_its_old_request) {
  PendingRequests pending(64, 1'000 * ms);
  pending.add(request(1, 0, 0, 1 * ms));
  pending.add(request(2, 0, 1));
  std::vector<RequestDescriptor> expired;
  pending.expire(1 * ms, expired);
  REQUIRE(expired.size() == 1u);
  // Row 1 comes back with a new request while the old one's copy still sits in its level.
  pending.add(RequestDescriptor{65, 1, 0, 2, no_deadline, 0});
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{10}, 3 * ms, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{2, 65}));
  CHECK(pending.empty());
}

TEST_CASE(token_budget_caps_the_padded_size_and_keeps_order) {
  PendingRequests pending(64, 1'000 * ms);
  const std::uint32_t lengths[6] = {3, 5, 2, 9, 1, 1};
  for (std::uint64_t id = 0; id < 6; ++id) {
    RequestDescriptor r = request(id, 0, static_cast<Nanoseconds>(id));
    r.length = lengths[id];
    pending.add(r);
  }
  std::vector<RequestDescriptor> out;
  // Budget 16, multiple 4: {3}: 1x4; {3,5}: 2x8 = 16; {3,5,2}: 3x8 = 24 > 16: stop.
  pending.take(TakeLimits{10, 16, 4, 0}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{0, 1}));
  out.clear();
  pending.take(TakeLimits{10, 16, 4, 0}, 10, out); // {2}: 4, {2,9}: 2x12 = 24 > 16
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{2}));
  out.clear();
  pending.take(TakeLimits{10, 4, 1, 0}, 10, out); // alone over budget: still taken
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{3}));
  out.clear();
  pending.take(TakeLimits{10, 16, 4, 0}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{4, 5}));
  CHECK(pending.empty());
}

TEST_CASE(bucket_window_groups_similar_lengths_around_the_oldest) {
  PendingRequests pending(64, 1'000 * ms);
  const std::uint32_t lengths[8] = {10, 200, 12, 190, 9, 205, 11, 100};
  for (std::uint64_t id = 0; id < 8; ++id) {
    RequestDescriptor r = request(id, 0, static_cast<Nanoseconds>(id));
    r.length = lengths[id];
    pending.add(r);
  }
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{4, 0, 1, 8}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{0, 4, 6, 2})); // 10, then 9, 11, 12
  out.clear();
  pending.take(TakeLimits{3, 0, 1, 8}, 10, out); // the oldest left is 200
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{1, 5, 3}));
  out.clear();
  pending.take(TakeLimits{4, 0, 1, 8}, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{7}));
  CHECK(pending.empty());
}

TEST_CASE(bucket_window_leaves_the_rest_in_priority_order) {
  PendingRequests pending(64, 1'000 * ms);
  const std::uint32_t lengths[5] = {5, 50, 6, 40, 30};
  for (std::uint64_t id = 0; id < 5; ++id) {
    RequestDescriptor r = request(id, id == 4 ? 1 : 0, static_cast<Nanoseconds>(id));
    r.length = lengths[id];
    pending.add(r);
  }
  std::vector<RequestDescriptor> out;
  pending.take(TakeLimits{2, 0, 1, 3}, 10, out); // head: id 4 (priority 1); window: 0, 1
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{4, 1}));
  out.clear();
  pending.take(TakeLimits{10, 0, 1, 0}, 10, out); // in order, as they were
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{0, 2, 3}));
}

// A padding allowance (tokens a request may add to the batch): of the grouped requests, only
// those whose padding costs less than a batch of their own join; the others keep their order.
TEST_CASE(a_padding_allowance_keeps_out_requests_whose_padding_costs_more_than_a_batch) {
  const std::uint32_t lengths[8] = {10, 200, 12, 190, 9, 205, 11, 100};
  const auto fill = [&](PendingRequests &pending) {
    for (std::uint64_t id = 0; id < 8; ++id) {
      RequestDescriptor r = request(id, 0, static_cast<Nanoseconds>(id));
      r.length = lengths[id];
      pending.add(r);
    }
  };
  PendingRequests pending(64, 1'000 * ms);
  fill(pending);
  TakeLimits limits{8, 0, 1, 8};
  limits.padding_allowance = 20.0;
  std::vector<RequestDescriptor> out;
  pending.take(limits, 10, out); // 9, 11, 12 add 1, 2, 3 tokens; 100 would add 352
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{0, 4, 6, 2}));
  out.clear();
  pending.take(limits, 10, out); // 205 adds 5, 190 adds 15, 100 would add 105
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{1, 5, 3}));
  out.clear();
  pending.take(limits, 10, out);
  CHECK(ids_of(out) == (std::vector<std::uint64_t>{7}));
  CHECK(pending.empty());

  PendingRequests unlimited(64, 1'000 * ms); // no allowance: the whole window goes
  fill(unlimited);
  out.clear();
  unlimited.take(TakeLimits{8, 0, 1, 8}, 10, out);
  CHECK_EQ(out.size(), 8u);
}

TEST_CASE(rejects_bad_construction_and_rows) {
  CHECK_THROWS_AS(PendingRequests(8, 0), std::invalid_argument);
  PendingRequests pending(8, ms);
  CHECK_THROWS_AS(pending.add(RequestDescriptor{1, 8, 0, 0, no_deadline, 0}), std::out_of_range);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
