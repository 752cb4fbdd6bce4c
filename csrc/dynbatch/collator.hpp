#pragma once
// Collator: stacks the leaves of N samples into one staging buffer.
//
// Contract
// - BatchLayout is immutable and validated at construction (bytes per sample must match the
//   shape and dtype); it is shared read-only between threads.
// - collate() writes leaf j of sample i at leaf_offset(j, n) + i * bytes_per_sample(j): each
//   leaf becomes one contiguous [n, *sample_shape] block. It runs without any lock or GIL and
//   only reads the sources, which the caller keeps alive until it returns; a large batch may be
//   split between the caller and CopyWorkers threads.
// - A padded leaf (variable first dimension; sample_shape[0] is -1 and bytes_per_sample counts
//   one row, i.e. one step of that dimension) becomes [n, L, *sample_shape[1:]]: sample i's
//   lengths[i] rows, then L - lengths[i] copies of `pad_element`. Every padded leaf of a sample
//   has that sample's one length.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "dynbatch/copy_workers.hpp"
#include "dynbatch/dlpack_abi.hpp"

namespace dynbatch {

struct LeafLayout {
  std::vector<std::int64_t> sample_shape;
  dlpack::DLDataType dtype;
  std::size_t bytes_per_sample = 0; // a padded leaf: bytes per row
  bool padded = false;
  std::vector<std::byte> pad_element{}; // a padded leaf: one element of the pad value
};

class BatchLayout {
public:
  explicit BatchLayout(std::vector<LeafLayout> leaves);

  std::size_t leaf_count() const noexcept { return leaves_.size(); }
  const LeafLayout &leaf(std::size_t index) const { return leaves_.at(index); }
  bool has_padded_leaves() const noexcept { return has_padded_; }
  // Staged bytes of one sample; padded leaves count `length` rows.
  std::size_t sample_bytes(std::size_t length = 1) const noexcept {
    return sample_bytes_ + padded_row_bytes_ * length;
  }
  // Equal for equal leaf shapes and dtypes (padded lengths aside): what costs are learned per.
  std::uint64_t shape_key() const noexcept { return shape_key_; }
  // Where leaf `index` of an n-sample batch (padded leaves `padded_length` rows) starts.
  std::size_t leaf_offset(std::size_t index, std::size_t batch_size,
                          std::size_t padded_length = 0) const;
  std::size_t batch_bytes(std::size_t batch_size, std::size_t padded_length = 0) const;
  // Bytes of leaf `index` of an n-sample batch (padded leaves `padded_length` rows).
  std::size_t leaf_bytes(std::size_t index, std::size_t batch_size,
                         std::size_t padded_length = 0) const;

private:
  std::vector<LeafLayout> leaves_;
  std::size_t sample_bytes_ = 0;     // fixed leaves
  std::size_t padded_row_bytes_ = 0; // one row of every padded leaf
  bool has_padded_ = false;
  std::uint64_t shape_key_ = 0;
};

// A batch at least this large is copied by `workers` and the caller together: one thread
// cannot saturate memory bandwidth, and below this the hand-off costs more than it saves.
inline constexpr std::size_t parallel_copy_bytes = std::size_t{4} << 20;

// sources holds batch_size rows of leaf_count() pointers, sample-major. With padded leaves,
// `lengths` holds each sample's length and `padded_length` (>= every length) the rows of the
// batch; without, both are ignored. With `workers`, a large batch is split between threads.
void collate(const BatchLayout &layout, std::span<const void *const> sources,
             std::size_t batch_size, std::byte *destination,
             std::span<const std::uint32_t> lengths = {}, std::size_t padded_length = 0,
             CopyWorkers *workers = nullptr);

} // namespace dynbatch
