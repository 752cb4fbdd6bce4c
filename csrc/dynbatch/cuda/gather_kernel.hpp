#pragma once
// The gather kernel's launch: a plain parameter struct and a stream (no core types beyond the
// index math of gather_index.hpp). Included by cuda_device.cpp and gather_kernel.cu only.

#include <cuda_runtime.h>

#include <cstdint>

#include "dynbatch/gather_index.hpp"

namespace dynbatch::detail {

struct alignas(16) PadPattern {
  unsigned char bytes[gather::pad_pattern_bytes];
};

struct GatherKernelParams {
  gather::Shape shape;
  const void *const *sources = nullptr;   // device array, one pointer per sample
  const std::uint32_t *lengths = nullptr; // device array, or null when stacking
  void *destination = nullptr;
  std::uint32_t width = 1; // gather::vector_width of the addresses and row size
  PadPattern pad{};
};

// Enqueues the kernel on `stream`; returns the launch's error (cudaSuccess when enqueued).
cudaError_t launch_gather(const GatherKernelParams &params, cudaStream_t stream);

} // namespace dynbatch::detail
