// Device probe of a build without CUDA: no device is ever usable.
#include "dynbatch/build_info.hpp"

namespace dynbatch {

int detail::cuda_runtime_version() {
  return 0;
}

DeviceProbe probe_cuda_devices() {
  DeviceProbe probe;
  probe.reason = "dynbatch was built without CUDA";
  return probe;
}

} // namespace dynbatch
