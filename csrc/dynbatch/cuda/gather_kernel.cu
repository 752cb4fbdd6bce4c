// The device gather: a grid-stride loop over output units, each placed by gather::locate.
#include "dynbatch/cuda/gather_kernel.hpp"

namespace dynbatch::detail {
namespace {

constexpr std::uint32_t threads_per_block = 256;
constexpr std::uint32_t max_blocks = 4096; // grid-stride beyond this: enough to fill any card

template <class Unit> __global__ void gather_kernel(GatherKernelParams params) {
  const std::uint64_t units = gather::unit_count(params.shape, sizeof(Unit));
  auto *out = static_cast<Unit *>(params.destination);
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t unit = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       unit < units; unit += stride) {
    const gather::Source source = gather::locate(params.shape, params.lengths, unit * sizeof(Unit));
    const unsigned char *from =
        source.pad ? params.pad.bytes + source.source_offset
                   : static_cast<const unsigned char *>(params.sources[source.sample]) +
                         source.source_offset;
    out[unit] = *reinterpret_cast<const Unit *>(from);
  }
}

template <class Unit> cudaError_t launch(const GatherKernelParams &params, cudaStream_t stream) {
  const std::uint64_t units = gather::unit_count(params.shape, sizeof(Unit));
  const std::uint32_t blocks = gather::block_count(units, threads_per_block, max_blocks);
  gather_kernel<Unit><<<blocks, threads_per_block, 0, stream>>>(params);
  return cudaGetLastError();
}

} // namespace

cudaError_t launch_gather(const GatherKernelParams &params, cudaStream_t stream) {
  switch (params.width) {
  case 16:
    return launch<uint4>(params, stream);
  case 8:
    return launch<unsigned long long>(params, stream);
  case 4:
    return launch<unsigned int>(params, stream);
  case 2:
    return launch<unsigned short>(params, stream);
  default:
    return launch<unsigned char>(params, stream);
  }
}

} // namespace dynbatch::detail
