#pragma once
// Collator: stacks the leaves of N samples into one staging buffer.
//
// Contract
// - BatchLayout is immutable and validated at construction (bytes per sample must match the
//   shape and dtype); it is shared read-only between threads.
// - collate() writes leaf j of sample i at leaf_offset(j, n) + i * bytes_per_sample(j): each
//   leaf becomes one contiguous [n, *sample_shape] block. It runs without any lock or GIL and
//   only reads the sources, which the caller keeps alive until it returns.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "dynbatch/dlpack_abi.hpp"

namespace dynbatch {

struct LeafLayout {
  std::vector<std::int64_t> sample_shape;
  dlpack::DLDataType dtype;
  std::size_t bytes_per_sample = 0;
};

class BatchLayout {
public:
  explicit BatchLayout(std::vector<LeafLayout> leaves);

  std::size_t leaf_count() const noexcept { return leaves_.size(); }
  const LeafLayout &leaf(std::size_t index) const { return leaves_.at(index); }
  std::size_t sample_bytes() const noexcept { return sample_bytes_; }
  // Equal for equal leaf shapes and dtypes: what costs are learned per.
  std::uint64_t shape_key() const noexcept { return shape_key_; }
  // Where leaf `index` of an n-sample batch starts inside the staging buffer.
  std::size_t leaf_offset(std::size_t index, std::size_t batch_size) const;
  std::size_t batch_bytes(std::size_t batch_size) const;

private:
  std::vector<LeafLayout> leaves_;
  std::size_t sample_bytes_ = 0;
  std::uint64_t shape_key_ = 0;
};

// sources holds batch_size rows of leaf_count() pointers, sample-major.
void collate(const BatchLayout &layout, std::span<const void *const> sources,
             std::size_t batch_size, std::byte *destination);

} // namespace dynbatch
