#pragma once
// NVML shim: libnvidia-ml opened at run time (dlopen) into a table of typed function pointers,
// so the same build loads and runs on a machine with no NVIDIA driver.
//
// Contract
// - Constructing an NvmlLibrary never throws for an NVML problem (only std::bad_alloc): a
//   library that cannot be loaded, a missing required symbol, or a failing nvmlInit_v2 leave
//   it unavailable(), with reason() saying which. Optional symbols may be absent (null).
// - After construction it is immutable: every member may be called from any thread (NVML itself
//   is thread-safe). NVML calls may block briefly in the driver; none touches Python.
// - The destructor balances its own nvmlInit_v2 with nvmlShutdown (NVML counts them per
//   process) and dlcloses. process_default() is never destroyed (see nvml_shim.cpp).
// - Device indices are NVML's, which ignore CUDA_VISIBLE_DEVICES; index_of_pci_bus_id()
//   translates a CUDA device's PCI bus id.
// - The NVML types below are declared from NVML's public API documentation, so building needs
//   no nvml.h; only what dynbatch calls is declared.

#include <cstdint>
#include <memory>
#include <string>

namespace dynbatch {

namespace nvml {

using nvmlReturn_t = int; // a C enum in nvml.h, so int-sized
inline constexpr nvmlReturn_t NVML_SUCCESS = 0;

struct nvmlDevice_st; // opaque
using nvmlDevice_t = nvmlDevice_st *;

struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};

struct nvmlMemory_v2_t {
  unsigned int version; // must be nvmlMemory_v2
  unsigned long long total;
  unsigned long long reserved;
  unsigned long long free;
  unsigned long long used;
};

// NVML_STRUCT_VERSION(Memory, 2): the struct size with the version in the top byte.
inline constexpr unsigned int nvmlMemory_v2 =
    static_cast<unsigned int>(sizeof(nvmlMemory_v2_t)) | (2u << 24);

struct nvmlUtilization_t {
  unsigned int gpu;    // percent of the last sample period a kernel was running
  unsigned int memory; // percent of it device memory was being read or written
};

inline constexpr unsigned int NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96;

static_assert(sizeof(nvmlMemory_t) == 24);
static_assert(sizeof(nvmlMemory_v2_t) == 40 && nvmlMemory_v2 == 0x0200'0028u);
static_assert(sizeof(nvmlUtilization_t) == 8);

} // namespace nvml

// The NVML functions dynbatch calls. In an available library every required pointer is set;
// an optional one is null where this driver does not export it.
struct NvmlApi {
  struct Required {
    nvml::nvmlReturn_t (*nvmlInit_v2)() = nullptr;
    nvml::nvmlReturn_t (*nvmlShutdown)() = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetCount_v2)(unsigned int *) = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetHandleByIndex_v2)(unsigned int,
                                                        nvml::nvmlDevice_t *) = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetMemoryInfo)(nvml::nvmlDevice_t,
                                                  nvml::nvmlMemory_t *) = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetUtilizationRates)(nvml::nvmlDevice_t,
                                                        nvml::nvmlUtilization_t *) = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetName)(nvml::nvmlDevice_t, char *, unsigned int) = nullptr;
    const char *(*nvmlErrorString)(nvml::nvmlReturn_t) = nullptr;
  };
  struct Optional {
    // R510 and later: adds the memory reserved by the driver and firmware.
    nvml::nvmlReturn_t (*nvmlDeviceGetMemoryInfo_v2)(nvml::nvmlDevice_t,
                                                     nvml::nvmlMemory_v2_t *) = nullptr;
    // Map a CUDA device (known by its PCI bus id) to NVML's numbering.
    nvml::nvmlReturn_t (*nvmlDeviceGetHandleByPciBusId_v2)(const char *,
                                                           nvml::nvmlDevice_t *) = nullptr;
    nvml::nvmlReturn_t (*nvmlDeviceGetIndex)(nvml::nvmlDevice_t, unsigned int *) = nullptr;
  };
  Required required;
  Optional optional;
};

// One device as NVML sees it now.
struct NvmlDeviceReading {
  unsigned index = 0;
  std::string name; // empty unless asked for
  std::uint64_t memory_total_bytes = 0;
  std::uint64_t memory_free_bytes = 0;
  std::uint64_t memory_used_bytes = 0;     // as NVML reports it
  std::uint64_t memory_reserved_bytes = 0; // needs nvmlDeviceGetMemoryInfo_v2; 0 without it
  double utilization = 0.0;                // 0..1: GPU busy share of the last sample period
  double memory_utilization = 0.0;         // 0..1: memory read/write share of it
  bool memory_ok = false;
  bool utilization_ok = false;
  std::string error; // empty when every call succeeded; otherwise each call that failed and why
};

class NvmlLibrary {
public:
  static constexpr const char *default_library = "libnvidia-ml.so.1";

  // Opens `path` (a file name searched as dlopen does, or a path), resolves the symbols and
  // calls nvmlInit_v2 once.
  explicit NvmlLibrary(std::string path);
  ~NvmlLibrary();
  NvmlLibrary(const NvmlLibrary &) = delete;
  NvmlLibrary &operator=(const NvmlLibrary &) = delete;

  // DYNBATCH_NVML_LIBRARY when set and not empty (read once, at the first call), else
  // libnvidia-ml.so.1.
  static const std::string &default_path();
  // The library at default_path(), opened at the first call and kept for the whole process
  // (a forked child opens its own at its first call).
  static const std::shared_ptr<const NvmlLibrary> &process_default();

  bool available() const noexcept { return reason_.empty(); }
  // Why the library is unavailable; empty when it is available.
  const std::string &reason() const noexcept { return reason_; }
  const std::string &path() const noexcept { return path_; }
  // Devices NVML saw at initialization; 0 when unavailable.
  unsigned device_count() const noexcept { return device_count_; }
  // The function table; its required pointers are all set only when available().
  const NvmlApi &api() const noexcept { return api_; }
  // "<nvmlErrorString(rc)> (NVML error <rc>)".
  std::string error_string(nvml::nvmlReturn_t rc) const;

  // Memory and utilization of one device (its name too when with_name). Never throws for an
  // NVML error: what failed is in .error, and the *_ok flags say which parts are valid.
  NvmlDeviceReading read_device(unsigned index, bool with_name) const;

  // NVML's index of the device at `pci_bus_id` ("domain:bus:device.function", e.g.
  // "00000000:3B:00.0"), which is how a CUDA device index (subject to CUDA_VISIBLE_DEVICES
  // and CUDA's ordering) finds its NVML counterpart. -1 when unknown or unsupported.
  int index_of_pci_bus_id(const std::string &pci_bus_id) const;

private:
  bool open_and_resolve();
  void initialize();

  std::string path_;
  std::string reason_;
  void *handle_ = nullptr;
  bool initialized_ = false;
  unsigned device_count_ = 0;
  NvmlApi api_;
};

} // namespace dynbatch
