#include "dynbatch/collator.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

#include "dynbatch/platform.hpp"

namespace dynbatch {
namespace {
// Leaves start on a page boundary plus a per-leaf stagger, so that the regions of different
// leaves do not alias each other modulo 4 KiB (a measured 15x memcpy slowdown on some x86).
constexpr std::size_t leaf_stagger = 256;
constexpr std::size_t stagger_period = page_size / leaf_stagger;

std::size_t element_count(const std::vector<std::int64_t> &shape) {
  std::size_t count = 1;
  for (const std::int64_t extent : shape) {
    if (extent < 0) {
      throw std::invalid_argument("negative extent in a leaf shape");
    }
    count *= static_cast<std::size_t>(extent);
  }
  return count;
}
} // namespace

BatchLayout::BatchLayout(std::vector<LeafLayout> leaves) : leaves_(std::move(leaves)) {
  for (std::size_t index = 0; index < leaves_.size(); ++index) {
    const LeafLayout &leaf = leaves_[index];
    const std::size_t element_bits = static_cast<std::size_t>(leaf.dtype.bits) * leaf.dtype.lanes;
    if (element_bits == 0 || element_bits % 8 != 0) {
      throw std::invalid_argument("leaf " + std::to_string(index) +
                                  ": dtype must be a whole number of bytes");
    }
    const std::size_t expected = element_count(leaf.sample_shape) * element_bits / 8;
    if (expected != leaf.bytes_per_sample) {
      throw std::invalid_argument(
          "leaf " + std::to_string(index) + ": " + std::to_string(leaf.bytes_per_sample) +
          " bytes per sample, but shape and dtype give " + std::to_string(expected));
    }
    sample_bytes_ += leaf.bytes_per_sample;
  }
  // FNV-1a over every leaf's dtype and shape.
  shape_key_ = 14695981039346656037ull;
  const auto mix = [&](std::uint64_t value) {
    shape_key_ = (shape_key_ ^ value) * 1099511628211ull;
  };
  for (const LeafLayout &leaf : leaves_) {
    mix((std::uint64_t{leaf.dtype.code} << 24) | (std::uint64_t{leaf.dtype.bits} << 16) |
        leaf.dtype.lanes);
    mix(leaf.sample_shape.size());
    for (const std::int64_t extent : leaf.sample_shape) {
      mix(static_cast<std::uint64_t>(extent));
    }
  }
}

std::size_t BatchLayout::leaf_offset(std::size_t index, std::size_t batch_size) const {
  std::size_t offset = 0;
  for (std::size_t j = 0; j < index; ++j) {
    offset += leaves_[j].bytes_per_sample * batch_size;
    offset = align_up(offset, page_size) + ((j + 1) % stagger_period) * leaf_stagger;
  }
  return offset;
}

std::size_t BatchLayout::batch_bytes(std::size_t batch_size) const {
  if (leaves_.empty()) {
    return 0;
  }
  const std::size_t last = leaves_.size() - 1;
  return leaf_offset(last, batch_size) + leaves_[last].bytes_per_sample * batch_size;
}

void collate(const BatchLayout &layout, std::span<const void *const> sources,
             std::size_t batch_size, std::byte *destination) {
  const std::size_t leaves = layout.leaf_count();
  if (sources.size() != batch_size * leaves) {
    throw std::invalid_argument("collate: expected " + std::to_string(batch_size * leaves) +
                                " source pointers, got " + std::to_string(sources.size()));
  }
  for (std::size_t j = 0; j < leaves; ++j) {
    const std::size_t bytes = layout.leaf(j).bytes_per_sample;
    if (bytes == 0) {
      continue; // an empty leaf: its sources may be null (an empty tensor's data pointer)
    }
    std::byte *out = destination + layout.leaf_offset(j, batch_size);
    for (std::size_t i = 0; i < batch_size; ++i) {
      std::memcpy(out + i * bytes, sources[i * leaves + j], bytes);
    }
  }
}

} // namespace dynbatch
