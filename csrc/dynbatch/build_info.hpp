#pragma once
// What this build of the core contains, and whether a CUDA device is usable right now.

#include <string>

namespace dynbatch {

struct BuildInfo {
  std::string version;
  std::string compiler;
  bool cuda_compiled = false;
  std::string cuda_architectures; // empty without CUDA
  int cuda_runtime_version = 0;   // e.g. 13000; 0 without CUDA
};

struct DeviceProbe {
  bool usable = false;
  int device_count = 0;
  std::string reason; // why not usable, or the first device's name when usable
};

BuildInfo build_info();

namespace detail {
int cuda_runtime_version(); // defined by the device probe of this build; 0 without CUDA
} // namespace detail

// Without CUDA compiled in: never usable. With it: asks the runtime for devices and runs a
// one-thread kernel on device 0, so a driver that is present but too old, or an architecture
// the build lacks, reports "not usable" here instead of failing later.
DeviceProbe probe_cuda_devices();

} // namespace dynbatch
