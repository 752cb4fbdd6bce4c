#include "dynbatch/device.hpp"

#include <string>

namespace dynbatch {

#ifdef DYNBATCH_WITH_CUDA
namespace detail {
std::shared_ptr<Device> make_cuda_backend(int index); // cuda/cuda_device.cpp
} // namespace detail
#endif

std::shared_ptr<Device> make_cuda_device(int index) {
#ifdef DYNBATCH_WITH_CUDA
  return detail::make_cuda_backend(index);
#else
  throw DeviceError("cuda:" + std::to_string(index) +
                    ": dynbatch was built without CUDA (no nvcc at build time)");
#endif
}

std::array<std::byte, gather::pad_pattern_bytes> pad_pattern(std::span<const std::byte> element) {
  std::array<std::byte, gather::pad_pattern_bytes> pattern{};
  if (element.empty()) {
    return pattern;
  }
  if (gather::pad_pattern_bytes % element.size() != 0) {
    throw std::invalid_argument("gather: a pad element of " + std::to_string(element.size()) +
                                " bytes (it must be 1, 2, 4, 8 or 16)");
  }
  for (std::size_t b = 0; b < pattern.size(); ++b) {
    pattern[b] = element[b % element.size()];
  }
  return pattern;
}

void validate_gather(const GatherLaunch &launch) {
  const gather::Shape &shape = launch.shape;
  if (launch.sources.size() != shape.samples) {
    throw std::invalid_argument("gather: " + std::to_string(launch.sources.size()) +
                                " source pointers for " + std::to_string(shape.samples) +
                                " samples");
  }
  if (shape.samples == 0) {
    throw std::invalid_argument("gather: no samples");
  }
  if (shape.rows == 0 || shape.row_bytes == 0) {
    throw std::invalid_argument("gather: a sample of 0 bytes");
  }
  if (launch.destination == nullptr) {
    throw std::invalid_argument("gather: null destination");
  }
  if (!launch.lengths.empty() && launch.lengths.size() != shape.samples) {
    throw std::invalid_argument("gather: " + std::to_string(launch.lengths.size()) +
                                " lengths for " + std::to_string(shape.samples) + " samples");
  }
  if (launch.lengths.empty() && shape.rows != 1) {
    throw std::invalid_argument("gather: rows > 1 needs one length per sample (padding)");
  }
  for (std::size_t i = 0; i < shape.samples; ++i) {
    const std::uint64_t length = launch.lengths.empty() ? 1 : launch.lengths[i];
    if (length > shape.rows) {
      throw std::invalid_argument("gather: sample " + std::to_string(i) + " has " +
                                  std::to_string(length) + " rows, more than the padded " +
                                  std::to_string(shape.rows));
    }
    if (launch.sources[i] == nullptr && length > 0) {
      throw std::invalid_argument("gather: sample " + std::to_string(i) + " has a null source");
    }
  }
}

std::uint64_t gather_address_bits(const GatherLaunch &launch) {
  std::uint64_t bits = reinterpret_cast<std::uintptr_t>(launch.destination);
  for (const void *source : launch.sources) {
    bits |= reinterpret_cast<std::uintptr_t>(source);
  }
  return bits;
}

void Device::gather(const GatherLaunch &launch, StreamView stream) {
  validate_gather(launch);
  enqueue_gather(launch, stream);
}

} // namespace dynbatch
