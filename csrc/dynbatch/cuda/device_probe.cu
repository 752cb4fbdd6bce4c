// Device probe of a CUDA build: counts devices and runs one tiny kernel to prove device 0 works.
#include <cuda_runtime.h>

#include <string>

#include "dynbatch/build_info.hpp"

namespace dynbatch {
namespace {

__global__ void write_marker(int *out) {
  *out = 42;
}

std::string describe(cudaError_t error) {
  return std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error);
}

} // namespace

int detail::cuda_runtime_version() {
  return CUDART_VERSION;
}

DeviceProbe probe_cuda_devices() {
  DeviceProbe probe;
  cudaError_t error = cudaGetDeviceCount(&probe.device_count);
  if (error != cudaSuccess) {
    probe.device_count = 0;
    probe.reason = "no usable CUDA driver or device (" + describe(error) + ")";
    cudaGetLastError(); // clear the sticky-free error so later calls start clean
    return probe;
  }
  if (probe.device_count == 0) {
    probe.reason = "no CUDA device";
    return probe;
  }
  int *marker = nullptr;
  error = cudaMalloc(&marker, sizeof(int));
  if (error == cudaSuccess) {
    write_marker<<<1, 1>>>(marker);
    error = cudaGetLastError();
    int value = 0;
    if (error == cudaSuccess) {
      error = cudaMemcpy(&value, marker, sizeof(int), cudaMemcpyDeviceToHost);
    }
    cudaFree(marker);
    if (error == cudaSuccess && value != 42) {
      probe.reason = "the probe kernel ran but wrote the wrong value";
      return probe;
    }
  }
  if (error != cudaSuccess) {
    probe.reason = "CUDA device 0 failed the probe (" + describe(error) + ")";
    return probe;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  probe.usable = true;
  probe.reason = properties.name;
  return probe;
}

} // namespace dynbatch
