#pragma once
// Index arithmetic of the device gather: which source byte lands at each output byte when N
// samples already on the device are stacked (or padded) into one batch. Shared by the CUDA
// kernel (cuda/gather_kernel.cu) and the simulated device's host loop, so the host unit tests
// of these functions cover the kernel's addressing.
//
// Contract: pure functions, no state; they compile as plain C++ and, under nvcc, as
// __host__ __device__. The caller validates the shape (validate_gather in device.hpp).
//
// Output layout, one leaf: samples * rows * row_bytes bytes, sample-major. Stacked: rows is 1
// and row_bytes is the bytes of one sample. Padded: rows is the padded length and row_bytes the
// bytes of one row; sample i supplies its first lengths[i] rows, the rest is the pad pattern.

#include <cstdint>

#if defined(__CUDACC__)
#define DYNBATCH_HOST_DEVICE __host__ __device__
#else
#define DYNBATCH_HOST_DEVICE
#endif

namespace dynbatch::gather {

// The pad pattern is one pad element repeated over this many bytes (every element size the
// core pads, 1..16 bytes, divides it), so any aligned vector of width <= 16 reads it in one go.
inline constexpr std::uint32_t pad_pattern_bytes = 16;
inline constexpr std::uint32_t max_vector_width = 16;

struct Shape {
  std::uint64_t samples = 0;
  std::uint64_t row_bytes = 0; // stacked: bytes per sample; padded: bytes per row
  std::uint64_t rows = 1;      // rows per sample in the output (the padded length)
};

DYNBATCH_HOST_DEVICE constexpr std::uint64_t sample_bytes(const Shape &shape) {
  return shape.rows * shape.row_bytes;
}

DYNBATCH_HOST_DEVICE constexpr std::uint64_t output_bytes(const Shape &shape) {
  return shape.samples * sample_bytes(shape);
}

// Where output byte `offset` comes from: sample `sample` at byte `source_offset` of its
// contiguous source, or (pad) the pad pattern at `source_offset`.
struct Source {
  std::uint64_t sample = 0;
  std::uint64_t source_offset = 0;
  bool pad = false;
};

// lengths: one per sample (rows it supplies), or nullptr when every sample supplies all rows.
DYNBATCH_HOST_DEVICE constexpr Source locate(const Shape &shape, const std::uint32_t *lengths,
                                             std::uint64_t offset) {
  const std::uint64_t per_sample = sample_bytes(shape);
  Source source;
  source.sample = offset / per_sample;
  const std::uint64_t within = offset - source.sample * per_sample;
  // A sample's source rows are contiguous, so its byte `within` is at the same offset there.
  const std::uint64_t row = within / shape.row_bytes;
  if (lengths != nullptr && row >= lengths[source.sample]) {
    source.pad = true;
    source.source_offset = (within - row * shape.row_bytes) % pad_pattern_bytes;
  } else {
    source.source_offset = within;
  }
  return source;
}

// The widest copy unit (16, 8, 4, 2 or 1 bytes) that divides the row size and the alignment of
// every address involved. `address_bits` is the bitwise OR of the destination and every source
// address: its lowest set bit bounds the alignment they all share.
DYNBATCH_HOST_DEVICE constexpr std::uint32_t vector_width(std::uint64_t row_bytes,
                                                          std::uint64_t address_bits) {
  const std::uint64_t bits = row_bytes | address_bits | max_vector_width;
  return static_cast<std::uint32_t>(bits & (~bits + 1)); // lowest set bit
}

// Units of `width` bytes in the output (the kernel's iteration space).
DYNBATCH_HOST_DEVICE constexpr std::uint64_t unit_count(const Shape &shape, std::uint32_t width) {
  return output_bytes(shape) / width;
}

// Blocks for a grid-stride launch: enough to cover every unit once, at most `max_blocks`.
DYNBATCH_HOST_DEVICE constexpr std::uint32_t
block_count(std::uint64_t units, std::uint32_t threads_per_block, std::uint32_t max_blocks) {
  const std::uint64_t needed = (units + threads_per_block - 1) / threads_per_block;
  if (needed == 0) {
    return 1;
  }
  return needed < max_blocks ? static_cast<std::uint32_t>(needed) : max_blocks;
}

} // namespace dynbatch::gather
