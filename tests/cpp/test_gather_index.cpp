// The gather's index arithmetic (gather_index.hpp, shared with the CUDA kernel) on the host:
// stacking, padding, odd sizes, vector widths, grid sizes; then whole gathers of many leaves
// through the simulated device (its host loop over the same functions) against a reference
// built byte by byte, and the launch's validation.

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dynbatch/device.hpp"
#include "dynbatch/gather_index.hpp"
#include "dynbatch/simulated_device.hpp"
#include "test_support.hpp"

namespace gather = dynbatch::gather;

namespace {

// Compile-time checks: the functions are constexpr, as the kernel needs them inline.
static_assert(gather::vector_width(12, 0x1000) == 4);
static_assert(gather::vector_width(64, 0x1008) == 8);
static_assert(gather::vector_width(7, 0) == 1);
static_assert(gather::locate(gather::Shape{4, 10, 1}, nullptr, 25).sample == 2);

// The output a correct gather writes, one byte at a time with no index math shared.
std::vector<std::byte> reference(const std::vector<std::vector<std::byte>> &samples,
                                 std::uint64_t row_bytes, std::uint64_t rows,
                                 const std::vector<std::uint32_t> &lengths,
                                 const std::vector<std::byte> &pad_element) {
  std::vector<std::byte> out;
  for (std::size_t i = 0; i < samples.size(); ++i) {
    const std::uint64_t real = lengths.empty() ? rows : lengths[i];
    for (std::uint64_t row = 0; row < rows; ++row) {
      for (std::uint64_t b = 0; b < row_bytes; ++b) {
        out.push_back(row < real ? samples[i][row * row_bytes + b]
                                 : pad_element[b % pad_element.size()]);
      }
    }
  }
  return out;
}

struct Leaf {
  std::vector<std::vector<std::byte>> samples;
  std::uint64_t row_bytes = 0;
  std::uint64_t rows = 1;
  std::vector<std::uint32_t> lengths; // empty: stacked
  std::vector<std::byte> pad_element{std::byte{0}};
};

Leaf random_leaf(std::mt19937_64 &random, bool padded) {
  Leaf leaf;
  const std::size_t element_sizes[] = {1, 2, 4, 8, 16};
  const std::size_t element = element_sizes[random() % 5];
  leaf.row_bytes = element * (1 + random() % 13); // odd multiples too
  const std::size_t samples = 1 + random() % 40;
  if (padded) {
    for (std::size_t i = 0; i < samples; ++i) {
      leaf.lengths.push_back(static_cast<std::uint32_t>(random() % 9)); // 0 rows happens
    }
    std::uint32_t longest = 0;
    for (const std::uint32_t length : leaf.lengths) {
      longest = std::max(longest, length);
    }
    leaf.rows = std::max<std::uint64_t>(longest + random() % 3, 1); // a pad_to_multiple_of
    leaf.pad_element.clear();
    for (std::size_t b = 0; b < element; ++b) {
      leaf.pad_element.push_back(static_cast<std::byte>(0xa0 + b));
    }
  }
  for (std::size_t i = 0; i < samples; ++i) {
    const std::uint64_t rows = padded ? leaf.lengths[i] : 1;
    std::vector<std::byte> bytes(rows * leaf.row_bytes);
    for (std::byte &b : bytes) {
      b = static_cast<std::byte>(random());
    }
    leaf.samples.push_back(std::move(bytes));
  }
  return leaf;
}

dynbatch::GatherLaunch launch_of(const Leaf &leaf, std::vector<const void *> &sources,
                                 void *destination) {
  sources.clear();
  for (const auto &sample : leaf.samples) {
    sources.push_back(sample.empty() ? nullptr : sample.data());
  }
  dynbatch::GatherLaunch launch;
  launch.shape = gather::Shape{leaf.samples.size(), leaf.row_bytes, leaf.rows};
  launch.sources = sources;
  launch.lengths = leaf.lengths;
  launch.destination = destination;
  for (std::size_t b = 0; b < gather::pad_pattern_bytes; ++b) {
    launch.pad[b] = leaf.pad_element[b % leaf.pad_element.size()];
  }
  return launch;
}

} // namespace

TEST_CASE(stacking_maps_each_output_byte_to_its_sample) {
  const gather::Shape shape{3, 12, 1};
  CHECK_EQ(gather::output_bytes(shape), 36u);
  for (std::uint64_t offset = 0; offset < 36; ++offset) {
    const gather::Source source = gather::locate(shape, nullptr, offset);
    CHECK_EQ(source.sample, offset / 12);
    CHECK_EQ(source.source_offset, offset % 12);
    CHECK(!source.pad);
  }
}

TEST_CASE(padding_maps_rows_past_a_sample_length_to_the_pad_pattern) {
  const gather::Shape shape{2, 6, 4}; // rows of 6 bytes (3 x int16), padded to 4 rows
  const std::uint32_t lengths[] = {1, 3};
  // Sample 0: row 0 real, rows 1..3 pad.
  CHECK(!gather::locate(shape, lengths, 5).pad);
  CHECK_EQ(gather::locate(shape, lengths, 5).source_offset, 5u);
  const gather::Source pad = gather::locate(shape, lengths, 6 + 4);
  CHECK(pad.pad);
  CHECK_EQ(pad.sample, 0u);
  CHECK_EQ(pad.source_offset, 4u); // byte 4 of the row -> byte 4 of the pattern
  // Sample 1 starts at 24: rows 0..2 real (source offsets follow), row 3 pad.
  const gather::Source real = gather::locate(shape, lengths, 24 + 2 * 6 + 1);
  CHECK(!real.pad);
  CHECK_EQ(real.sample, 1u);
  CHECK_EQ(real.source_offset, 13u);
  CHECK(gather::locate(shape, lengths, 24 + 3 * 6).pad);
  // A sample of length 0 is all pad.
  const std::uint32_t empty[] = {0, 4};
  for (std::uint64_t offset = 0; offset < 24; ++offset) {
    CHECK(gather::locate(shape, empty, offset).pad);
  }
}

TEST_CASE(vector_width_is_the_largest_unit_every_address_and_the_row_allow) {
  CHECK_EQ(gather::vector_width(1024, 0x7f0000001000ull), 16u);
  CHECK_EQ(gather::vector_width(1024, 0x7f0000001008ull), 8u); // one source 8-aligned
  CHECK_EQ(gather::vector_width(12, 0x7f0000001000ull), 4u);   // rows of 3 floats
  CHECK_EQ(gather::vector_width(6, 0x7f0000001000ull), 2u);    // rows of 3 halves
  CHECK_EQ(gather::vector_width(3, 0x7f0000001000ull), 1u);    // odd
  CHECK_EQ(gather::vector_width(4096, 0x7f0000001001ull), 1u); // an odd address
  CHECK_EQ(gather::vector_width(4096, 0), 16u);                // capped at 16
  // Every unit of the chosen width stays inside one row and one pad pattern period.
  for (std::uint64_t row = 1; row <= 64; ++row) {
    const std::uint32_t width = gather::vector_width(row, 0);
    CHECK_EQ(row % width, 0u);
    CHECK_EQ(gather::pad_pattern_bytes % width, 0u);
  }
}

TEST_CASE(unit_and_block_counts_cover_the_output_once) {
  const gather::Shape shape{1000, 12, 1};
  CHECK_EQ(gather::unit_count(shape, 4), 3000u);
  CHECK_EQ(gather::block_count(3000, 256, 4096), 12u);
  CHECK_EQ(gather::block_count(256, 256, 4096), 1u);
  CHECK_EQ(gather::block_count(257, 256, 4096), 2u);
  CHECK_EQ(gather::block_count(0, 256, 4096), 1u);
  CHECK_EQ(gather::block_count(std::uint64_t{1} << 40, 256, 4096), 4096u); // grid-stride
}

TEST_CASE(gathers_of_many_leaves_equal_a_byte_by_byte_reference) {
  auto device = std::make_shared<dynbatch::SimulatedDevice>(
      dynbatch::SimulatedDeviceOptions{0, 0, 0, false, SIZE_MAX, 4096});
  dynbatch::OwnedStream stream(device);
  dynbatch::OwnedEvent event(device);
  std::mt19937_64 random(2024);
  for (int round = 0; round < 40; ++round) {
    // One launch per leaf, as a batch of several leaves does.
    std::vector<Leaf> leaves;
    for (int j = 0; j < 7; ++j) {
      leaves.push_back(random_leaf(random, (round + j) % 2 == 1));
    }
    std::vector<std::vector<std::byte>> outputs;
    std::vector<std::vector<const void *>> sources(leaves.size());
    for (std::size_t j = 0; j < leaves.size(); ++j) {
      const Leaf &leaf = leaves[j];
      // An odd offset into the output now and then forces the byte-wide path.
      const std::size_t skew = (round % 5 == 0) ? 1 : 0;
      outputs.emplace_back(skew + leaf.samples.size() * leaf.rows * leaf.row_bytes +
                           gather::max_vector_width);
      device->gather(launch_of(leaf, sources[j], outputs.back().data() + skew), stream.view());
    }
    device->record_event(event.view(), stream.view());
    device->synchronize_event(event.view());
    for (std::size_t j = 0; j < leaves.size(); ++j) {
      const Leaf &leaf = leaves[j];
      const auto expected =
          reference(leaf.samples, leaf.row_bytes, leaf.rows, leaf.lengths, leaf.pad_element);
      const std::size_t skew = (round % 5 == 0) ? 1 : 0;
      CHECK(std::memcmp(outputs[j].data() + skew, expected.data(), expected.size()) == 0);
    }
  }
  CHECK_EQ(device->stats().gathers, 40u * 7u);
  CHECK(device->first_error().empty());
}

TEST_CASE(a_bad_launch_is_rejected_before_it_is_enqueued) {
  auto device = std::make_shared<dynbatch::SimulatedDevice>();
  dynbatch::OwnedStream stream(device);
  std::vector<std::byte> out(64);
  std::vector<std::byte> sample(8);
  std::vector<const void *> sources{sample.data(), sample.data()};
  auto message = [&](dynbatch::GatherLaunch launch) -> std::string {
    try {
      device->gather(launch, stream.view());
    } catch (const std::invalid_argument &error) {
      return error.what();
    }
    return "";
  };
  dynbatch::GatherLaunch launch;
  launch.shape = gather::Shape{3, 8, 1};
  launch.sources = sources;
  launch.destination = out.data();
  CHECK_EQ(message(launch), std::string("gather: 2 source pointers for 3 samples"));
  launch.shape.samples = 2;
  launch.destination = nullptr;
  CHECK_EQ(message(launch), std::string("gather: null destination"));
  launch.destination = out.data();
  launch.shape.rows = 2;
  CHECK(message(launch).find("needs one length per sample") != std::string::npos);
  const std::uint32_t lengths[] = {1, 3};
  launch.lengths = lengths;
  CHECK(message(launch).find("sample 1 has 3 rows, more than the padded 2") != std::string::npos);
  const std::uint32_t one[] = {1};
  launch.lengths = one;
  CHECK(message(launch).find("1 lengths for 2 samples") != std::string::npos);
  CHECK_EQ(device->stats().gathers, 0u);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
