// Collator and DLPack export: layout validation, byte-exact collation against a naive reference,
// leaf placement (256-byte aligned, disjoint, staggered modulo 4 KiB), and exported tensors that
// describe the staged data and hold the slot until their deleter runs.

#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "dynbatch/collator.hpp"
#include "dynbatch/dlpack_export.hpp"
#include "dynbatch/platform.hpp"
#include "dynbatch/staging_pool.hpp"
#include "test_support.hpp"

using dynbatch::BatchLayout;
using dynbatch::LeafLayout;
using dynbatch::StagingPool;
namespace dl = dynbatch::dlpack;

namespace {

constexpr dl::DLDataType f32{dl::kDLFloat, 32, 1};
constexpr dl::DLDataType f16{dl::kDLFloat, 16, 1};
constexpr dl::DLDataType i64{dl::kDLInt, 64, 1};
constexpr dl::DLDataType u8{dl::kDLUInt, 8, 1};
constexpr dl::DLDataType boolean{dl::kDLBool, 8, 1};
constexpr dl::DLDataType f32x4{dl::kDLFloat, 32, 4};

LeafLayout leaf(std::vector<std::int64_t> shape, dl::DLDataType dtype) {
  std::size_t elements = 1;
  for (const std::int64_t extent : shape) {
    elements *= static_cast<std::size_t>(extent);
  }
  return LeafLayout{std::move(shape), dtype, elements * dtype.bits * dtype.lanes / 8};
}

// Leaves of different dtypes and shapes, odd sizes included so that offsets need rounding.
std::vector<LeafLayout> mixed_leaves() {
  return {leaf({2, 3}, f32), leaf({}, i64),      leaf({5}, u8),
          leaf({7}, f16),    leaf({1}, boolean), leaf({3, 1, 2}, f32x4)};
}

// Random per-sample source rows, leaf-by-leaf, kept alive by the returned vectors.
struct Sources {
  std::vector<std::vector<std::byte>> storage; // one buffer per (sample, leaf)
  std::vector<const void *> pointers;          // sample-major, as collate() expects
};

Sources make_sources(const BatchLayout &layout, std::size_t batch_size, std::uint32_t seed) {
  std::mt19937 random(seed);
  Sources sources;
  for (std::size_t i = 0; i < batch_size; ++i) {
    for (std::size_t j = 0; j < layout.leaf_count(); ++j) {
      std::vector<std::byte> bytes(layout.leaf(j).bytes_per_sample);
      for (std::byte &b : bytes) {
        b = static_cast<std::byte>(random());
      }
      sources.storage.push_back(std::move(bytes));
    }
  }
  for (const auto &bytes : sources.storage) {
    sources.pointers.push_back(bytes.data());
  }
  return sources;
}

// The naive reference: the whole batch_bytes() region, sentinel-filled, with each leaf block
// written sample by sample at the documented place.
std::vector<std::byte> reference_collate(const BatchLayout &layout, const Sources &sources,
                                         std::size_t batch_size, std::byte sentinel) {
  std::vector<std::byte> expected(layout.batch_bytes(batch_size), sentinel);
  for (std::size_t j = 0; j < layout.leaf_count(); ++j) {
    const std::size_t bytes = layout.leaf(j).bytes_per_sample;
    for (std::size_t i = 0; i < batch_size; ++i) {
      const auto &row = sources.storage[i * layout.leaf_count() + j];
      for (std::size_t k = 0; k < bytes; ++k) {
        expected[layout.leaf_offset(j, batch_size) + i * bytes + k] = row[k];
      }
    }
  }
  return expected;
}

} // namespace

TEST_CASE(layout_accepts_consistent_leaves) {
  const BatchLayout layout(mixed_leaves());
  CHECK_EQ(layout.leaf_count(), 6u);
  CHECK_EQ(layout.leaf(0).bytes_per_sample, 24u);
  CHECK_EQ(layout.leaf(1).bytes_per_sample, 8u);
  CHECK_EQ(layout.leaf(3).bytes_per_sample, 14u);
  CHECK_EQ(layout.leaf(5).bytes_per_sample, 96u);
  CHECK_EQ(layout.sample_bytes(), 24u + 8u + 5u + 14u + 1u + 96u);
  CHECK_THROWS_AS(layout.leaf(6), std::out_of_range);

  const BatchLayout empty({});
  CHECK_EQ(empty.leaf_count(), 0u);
  CHECK_EQ(empty.sample_bytes(), 0u);
  CHECK_EQ(empty.batch_bytes(8), 0u);
}

TEST_CASE(layout_rejects_inconsistent_leaves) {
  // bytes_per_sample that does not match shape x dtype
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{2, 3}, f32, 23}}), std::invalid_argument);
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{2, 3}, f32, 25}}), std::invalid_argument);
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{}, i64, 4}}), std::invalid_argument);
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{4}, f32x4, 16}}), std::invalid_argument); // lanes
  // the bad leaf is not the first one
  CHECK_THROWS_AS(BatchLayout({leaf({2}, f32), LeafLayout{{3}, u8, 4}}), std::invalid_argument);
  // dtypes that are not whole bytes
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{8}, dl::DLDataType{dl::kDLInt, 4, 1}, 4}}),
                  std::invalid_argument);
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{8}, dl::DLDataType{dl::kDLInt, 0, 1}, 0}}),
                  std::invalid_argument);
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{8}, dl::DLDataType{dl::kDLFloat, 32, 0}, 0}}),
                  std::invalid_argument);
  // negative extents
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{-1, 2}, f32, 8}}), std::invalid_argument);
  // the error names the leaf
  try {
    BatchLayout({leaf({2}, f32), LeafLayout{{3}, u8, 4}});
    CHECK(false);
  } catch (const std::invalid_argument &error) {
    CHECK(std::string(error.what()).find("leaf 1") != std::string::npos);
  }
}

TEST_CASE(leaf_offsets_aligned_disjoint_and_staggered) {
  // 20 leaves (past the 16-leaf stagger period) of awkward sizes.
  std::vector<LeafLayout> leaves;
  for (int j = 0; j < 20; ++j) {
    leaves.push_back(leaf({1 + j * 37 % 11}, j % 2 == 0 ? u8 : f32));
  }
  const BatchLayout layout(leaves);
  for (const std::size_t n : {1u, 2u, 3u, 17u, 64u, 1000u}) {
    CHECK_EQ(layout.leaf_offset(0, n), 0u);
    std::set<std::size_t> residues;
    for (std::size_t j = 0; j < layout.leaf_count(); ++j) {
      const std::size_t offset = layout.leaf_offset(j, n);
      CHECK_EQ(offset % 256, 0u);
      if (j > 0) {
        const std::size_t previous_end =
            layout.leaf_offset(j - 1, n) + layout.leaf(j - 1).bytes_per_sample * n;
        CHECK_GE(offset, previous_end); // no overlap with the leaf before
      }
      if (j < 16) {
        residues.insert(offset % dynbatch::page_size);
      }
    }
    // Within one stagger period no two leaves start at the same place modulo 4 KiB.
    CHECK_EQ(residues.size(), 16u);
    const std::size_t last = layout.leaf_count() - 1;
    CHECK_EQ(layout.batch_bytes(n),
             layout.leaf_offset(last, n) + layout.leaf(last).bytes_per_sample * n);
  }
}

TEST_CASE(collate_matches_naive_reference_byte_for_byte) {
  const BatchLayout layout(mixed_leaves());
  auto pool = StagingPool::create(1);
  std::uint32_t seed = 1;
  for (const std::size_t n : {1u, 2u, 7u, 33u, 256u}) {
    const Sources sources = make_sources(layout, n, seed++);
    const std::size_t total = layout.batch_bytes(n);
    auto lease = pool->acquire(total);
    REQUIRE(lease->capacity() >= total);
    constexpr auto sentinel = std::byte{0xcd};
    std::memset(lease->data(), 0xcd, lease->capacity());
    dynbatch::collate(layout, sources.pointers, n, lease->data());
    const std::vector<std::byte> expected = reference_collate(layout, sources, n, sentinel);
    // Byte for byte, gaps between leaves included: collate writes nothing outside the blocks.
    std::size_t mismatches = 0;
    for (std::size_t k = 0; k < total; ++k) {
      mismatches += lease->data()[k] != expected[k] ? 1 : 0;
    }
    CHECK_EQ(mismatches, 0u);
    std::size_t past_end = 0;
    for (std::size_t k = total; k < lease->capacity(); ++k) {
      past_end += lease->data()[k] != sentinel ? 1 : 0;
    }
    CHECK_EQ(past_end, 0u);
  }
}

TEST_CASE(zero_extent_leaves_collate_and_export) {
  // Empty sequences are legal samples: a [0, 3] leaf stages no bytes at all.
  const BatchLayout only_empty({LeafLayout{{0, 3}, f32, 0}});
  const BatchLayout mixed({LeafLayout{{0, 3}, f32, 0}, leaf({2}, i64)});
  CHECK_EQ(only_empty.sample_bytes(), 0u);
  CHECK_EQ(only_empty.batch_bytes(4), 0u);
  auto pool = StagingPool::create(1);
  for (const BatchLayout *layout : {&only_empty, &mixed}) {
    constexpr std::size_t n = 4;
    const Sources sources = make_sources(*layout, n, 11);
    auto lease = pool->acquire(layout->batch_bytes(n));
    // Under UBSan a null destination here is reported (memcpy's arguments are nonnull).
    REQUIRE(lease->data() != nullptr);
    dynbatch::collate(*layout, sources.pointers, n, lease->data());
    if (layout == &mixed) {
      const std::vector<std::byte> expected = reference_collate(*layout, sources, n, std::byte{0});
      CHECK_EQ(std::memcmp(lease->data() + layout->leaf_offset(1, n),
                           expected.data() + layout->leaf_offset(1, n), 2 * 8 * n),
               0);
    }
    dl::DLManagedTensor *tensor = dynbatch::export_leaf(lease, *layout, 0, n);
    CHECK_EQ(tensor->dl_tensor.ndim, 3);
    CHECK_EQ(tensor->dl_tensor.shape[0], 4);
    CHECK_EQ(tensor->dl_tensor.shape[1], 0);
    CHECK_EQ(tensor->dl_tensor.shape[2], 3);
    CHECK_EQ(tensor->dl_tensor.strides[2], 1);
    CHECK_EQ(tensor->dl_tensor.strides[1], 3);
    tensor->deleter(tensor);
  }
  CHECK_EQ(pool->stats().slots_in_use, 0u);
}

TEST_CASE(padded_leaf_copies_each_sample_and_fills_the_rest_with_the_pad) {
  // Leaf 0: f32 rows of 3 (variable length), pad -1.5; leaf 1: a fixed i64 scalar.
  LeafLayout tokens{{-1, 3}, f32, 12, true, {}};
  const float pad = -1.5f;
  tokens.pad_element.resize(sizeof pad);
  std::memcpy(tokens.pad_element.data(), &pad, sizeof pad);
  const BatchLayout layout({tokens, leaf({}, i64)});
  CHECK(layout.has_padded_leaves());
  CHECK_EQ(layout.sample_bytes(5), 8u + 5u * 12u);
  const std::vector<std::uint32_t> lengths = {2, 0, 5};
  std::vector<std::vector<float>> rows(3);
  std::vector<std::int64_t> scalars = {7, 8, 9};
  std::vector<const void *> sources;
  for (std::size_t i = 0; i < 3; ++i) {
    for (std::uint32_t r = 0; r < lengths[i] * 3; ++r) {
      rows[i].push_back(static_cast<float>(i * 100 + r));
    }
    sources.push_back(rows[i].data());
    sources.push_back(&scalars[i]);
  }
  const std::size_t padded = 6; // longer than the longest: a multiple asked for
  std::vector<std::byte> buffer(layout.batch_bytes(3, padded));
  dynbatch::collate(layout, sources, 3, buffer.data(), lengths, padded);
  const auto *out = reinterpret_cast<const float *>(buffer.data() + layout.leaf_offset(0, 3, 6));
  for (std::size_t i = 0; i < 3; ++i) {
    for (std::size_t r = 0; r < padded * 3; ++r) {
      const float expected = r < lengths[i] * 3 ? static_cast<float>(i * 100 + r) : pad;
      CHECK_EQ(out[i * padded * 3 + r], expected);
    }
  }
  const auto *ints =
      reinterpret_cast<const std::int64_t *>(buffer.data() + layout.leaf_offset(1, 3, 6));
  CHECK_EQ(ints[0], 7);
  CHECK_EQ(ints[2], 9);
  CHECK_THROWS_AS(dynbatch::collate(layout, sources, 3, buffer.data(), lengths, 4),
                  std::invalid_argument); // a sample longer than the padded length
  CHECK_THROWS_AS(dynbatch::collate(layout, sources, 3, buffer.data(), {}, padded),
                  std::invalid_argument); // no lengths
  CHECK_THROWS_AS(BatchLayout({LeafLayout{{3, 3}, f32, 12, true, tokens.pad_element}}),
                  std::invalid_argument); // a padded leaf's first extent is -1
}

TEST_CASE(padded_leaf_exports_batch_by_padded_length) {
  LeafLayout tokens{{-1, 2}, u8, 2, true, {std::byte{0xAB}}};
  const BatchLayout layout({tokens});
  auto pool = StagingPool::create(2);
  auto lease = pool->acquire(layout.batch_bytes(4, 8));
  dl::DLManagedTensor *tensor = dynbatch::export_leaf(lease, layout, 0, 4, 8);
  REQUIRE(tensor->dl_tensor.ndim == 3);
  CHECK_EQ(tensor->dl_tensor.shape[0], 4);
  CHECK_EQ(tensor->dl_tensor.shape[1], 8);
  CHECK_EQ(tensor->dl_tensor.shape[2], 2);
  CHECK_EQ(tensor->dl_tensor.strides[0], 16);
  tensor->deleter(tensor);
}

TEST_CASE(collate_rejects_wrong_source_count) {
  const BatchLayout layout(mixed_leaves());
  const Sources sources = make_sources(layout, 4, 7);
  std::vector<std::byte> destination(layout.batch_bytes(5));
  std::span<const void *const> all(sources.pointers);
  CHECK_THROWS_AS(dynbatch::collate(layout, all, 5, destination.data()), std::invalid_argument);
  CHECK_THROWS_AS(dynbatch::collate(layout, all.first(all.size() - 1), 4, destination.data()),
                  std::invalid_argument);
  CHECK_THROWS_AS(dynbatch::collate(layout, all, 3, destination.data()), std::invalid_argument);
  dynbatch::collate(layout, all, 4, destination.data()); // the right count works
}

TEST_CASE(export_leaf_describes_staged_data_and_holds_the_lease) {
  const BatchLayout layout({leaf({2, 3}, f32), leaf({}, i64), leaf({4, 1}, u8)});
  constexpr std::size_t n = 5;
  auto pool = StagingPool::create(1);
  auto lease = pool->acquire(layout.batch_bytes(n));

  // Sources with recognisable values: sample i, element e of leaf 0 is 10*i + e.
  std::vector<std::vector<float>> floats(n);
  std::vector<std::int64_t> ints(n);
  std::vector<std::vector<std::uint8_t>> bytes(n);
  std::vector<const void *> pointers;
  for (std::size_t i = 0; i < n; ++i) {
    for (int e = 0; e < 6; ++e) {
      floats[i].push_back(static_cast<float>(10 * i + e));
    }
    ints[i] = -1'000'000'000'000 * static_cast<std::int64_t>(i + 1);
    bytes[i] = {static_cast<std::uint8_t>(i), 1, 2, static_cast<std::uint8_t>(200 + i)};
    pointers.push_back(floats[i].data());
    pointers.push_back(&ints[i]);
    pointers.push_back(bytes[i].data());
  }
  dynbatch::collate(layout, pointers, n, lease->data());

  dl::DLManagedTensor *t0 = dynbatch::export_leaf(lease, layout, 0, n);
  dl::DLManagedTensor *t1 = dynbatch::export_leaf(lease, layout, 1, n);
  dl::DLManagedTensor *t2 = dynbatch::export_leaf(lease, layout, 2, n);
  REQUIRE(t0 != nullptr);
  REQUIRE(t1 != nullptr);
  REQUIRE(t2 != nullptr);

  const dl::DLTensor &a = t0->dl_tensor;
  CHECK_EQ(a.ndim, 3);
  CHECK_EQ(a.shape[0], 5);
  CHECK_EQ(a.shape[1], 2);
  CHECK_EQ(a.shape[2], 3);
  REQUIRE(a.strides != nullptr);
  CHECK_EQ(a.strides[0], 6);
  CHECK_EQ(a.strides[1], 3);
  CHECK_EQ(a.strides[2], 1);
  CHECK_EQ(a.dtype.code, dl::kDLFloat);
  CHECK_EQ(a.dtype.bits, 32);
  CHECK_EQ(a.dtype.lanes, 1);
  CHECK_EQ(a.device.device_type, dl::kDLCPU);
  CHECK_EQ(a.byte_offset, 0u);
  CHECK_EQ(a.data, static_cast<void *>(lease->data() + layout.leaf_offset(0, n)));
  const auto *values = static_cast<const float *>(a.data);
  for (std::size_t i = 0; i < n; ++i) {
    for (int e = 0; e < 6; ++e) {
      CHECK_EQ(values[i * a.strides[0] + e], static_cast<float>(10 * i + e));
    }
  }

  const dl::DLTensor &b = t1->dl_tensor;
  CHECK_EQ(b.ndim, 1); // a scalar leaf becomes a [n] vector
  CHECK_EQ(b.shape[0], 5);
  CHECK_EQ(b.strides[0], 1);
  CHECK_EQ(b.dtype.code, dl::kDLInt);
  CHECK_EQ(b.dtype.bits, 64);
  CHECK_EQ(b.data, static_cast<void *>(lease->data() + layout.leaf_offset(1, n)));
  std::int64_t scalar = 0;
  std::memcpy(&scalar, static_cast<const std::byte *>(b.data) + 3 * sizeof(std::int64_t),
              sizeof(scalar));
  CHECK_EQ(scalar, ints[3]);

  const dl::DLTensor &c = t2->dl_tensor;
  CHECK_EQ(c.ndim, 3);
  CHECK_EQ(c.shape[1], 4);
  CHECK_EQ(c.shape[2], 1);
  CHECK_EQ(c.strides[0], 4);
  CHECK_EQ(c.strides[1], 1);
  CHECK_EQ(c.strides[2], 1);
  CHECK_EQ(c.dtype.code, dl::kDLUInt);
  CHECK_EQ(static_cast<const std::uint8_t *>(c.data)[4 * 2 + 3], 202);
  CHECK(t0->deleter != nullptr);

  // The tensors hold the slot after the batch's own lease goes; the last deleter frees it.
  lease.reset();
  CHECK_EQ(pool->stats().slots_in_use, 1u);
  t1->deleter(t1);
  CHECK_EQ(pool->stats().slots_in_use, 1u);
  t0->deleter(t0);
  CHECK_EQ(pool->stats().slots_in_use, 1u);
  CHECK_EQ(static_cast<const std::uint8_t *>(c.data)[0], 0); // still readable
  t2->deleter(t2);
  CHECK_EQ(pool->stats().slots_in_use, 0u);
}

TEST_CASE(export_leaf_deleter_may_run_on_another_thread_after_pool_owner_is_gone) {
  const BatchLayout layout({leaf({8}, f32)});
  auto pool = StagingPool::create(1);
  std::weak_ptr<StagingPool> watcher = pool;
  auto lease = pool->acquire(layout.batch_bytes(4));
  dl::DLManagedTensor *tensor = dynbatch::export_leaf(lease, layout, 0, 4);
  lease.reset();
  pool.reset();
  CHECK(!watcher.expired()); // the tensor keeps the lease, the lease keeps the pool
  std::thread consumer([tensor] { tensor->deleter(tensor); });
  consumer.join();
  CHECK(watcher.expired());
}

TEST_CASE(export_leaf_rejects_bad_leaf_index) {
  const BatchLayout layout({leaf({2}, f32)});
  auto pool = StagingPool::create(1);
  auto lease = pool->acquire(layout.batch_bytes(1));
  CHECK_THROWS_AS(dynbatch::export_leaf(lease, layout, 1, 1), std::out_of_range);
  CHECK_EQ(pool->stats().slots_in_use, 1u); // nothing leaked a reference
  lease.reset();
  CHECK_EQ(pool->stats().slots_in_use, 0u);
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
