// A fake libnvidia-ml for the NVML shim tests: the C ABI of the few NVML calls dynbatch makes,
// declared here from NVML's public API documentation independently of the shim, over two
// scripted devices. Built as a shared library in several variants (tests/cpp/CMakeLists.txt;
// tests/test_telemetry.py compiles it too):
//   FAKE_NVML_WITHOUT_UTILIZATION  lacks the required nvmlDeviceGetUtilizationRates
//   FAKE_NVML_WITHOUT_MEMORY_V2    lacks the optional nvmlDeviceGetMemoryInfo_v2 (older driver)
//   FAKE_NVML_INIT_FAILS           nvmlInit_v2 returns NVML_ERROR_DRIVER_NOT_LOADED
// Every NVML call but nvmlErrorString fails with NVML_ERROR_UNINITIALIZED before nvmlInit_v2,
// as the real library does. The fake_nvml_* functions are test hooks, not NVML.

#include <atomic>
#include <cstring>

extern "C" {

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

typedef struct nvmlMemory_st {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
} nvmlMemory_t;

typedef struct nvmlMemory_v2_st {
  unsigned int version;
  unsigned long long total;
  unsigned long long reserved;
  unsigned long long free;
  unsigned long long used;
} nvmlMemory_v2_t;

typedef struct nvmlUtilization_st {
  unsigned int gpu;
  unsigned int memory;
} nvmlUtilization_t;

} // extern "C"

namespace {

constexpr nvmlReturn_t NVML_SUCCESS = 0;
constexpr nvmlReturn_t NVML_ERROR_UNINITIALIZED = 1;
constexpr nvmlReturn_t NVML_ERROR_INVALID_ARGUMENT = 2;
constexpr nvmlReturn_t NVML_ERROR_NOT_FOUND = 6;
constexpr nvmlReturn_t NVML_ERROR_INSUFFICIENT_SIZE = 7;
constexpr nvmlReturn_t NVML_ERROR_DRIVER_NOT_LOADED = 9;
constexpr nvmlReturn_t NVML_ERROR_GPU_IS_LOST = 15;
constexpr nvmlReturn_t NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25;
constexpr unsigned int nvmlMemory_v2 =
    static_cast<unsigned int>(sizeof(nvmlMemory_v2_t)) | (2u << 24);

constexpr unsigned long long GiB = 1ull << 30;
constexpr unsigned long long MiB = 1ull << 20;

struct FakeDevice {
  const char *name;
  unsigned long long total;
  unsigned long long reserved;
  // Changed by fake_nvml_set_device while another thread reads: atomics.
  std::atomic<unsigned long long> free;
  std::atomic<unsigned long long> used; // v1 meaning: includes the reserved memory
  std::atomic<unsigned int> gpu_percent;
  std::atomic<unsigned int> memory_percent;
};

FakeDevice devices[2] = {
    {"Fake GPU 0", 16 * GiB, 300 * MiB, {12 * GiB}, {4 * GiB}, {37}, {12}},
    {"Fake GPU 1", 80 * GiB, 512 * MiB, {20 * GiB}, {60 * GiB}, {91}, {45}},
};
constexpr unsigned device_count = 2;

std::atomic<int> init_count{0};
std::atomic<int> failing_reads{NVML_SUCCESS}; // a non-zero code fails memory and utilization

FakeDevice *device_of(nvmlDevice_t device) {
  for (FakeDevice &fake : devices) {
    if (reinterpret_cast<nvmlDevice_t>(&fake) == device) {
      return &fake;
    }
  }
  return nullptr;
}

// The checks every device call starts with: initialized, a known handle, no injected failure.
nvmlReturn_t check_device_call(nvmlDevice_t device, const void *out, bool can_fail) {
  if (init_count.load() == 0) {
    return NVML_ERROR_UNINITIALIZED;
  }
  if (device_of(device) == nullptr || out == nullptr) {
    return NVML_ERROR_INVALID_ARGUMENT;
  }
  return can_fail ? failing_reads.load() : NVML_SUCCESS;
}

} // namespace

extern "C" {

nvmlReturn_t nvmlInit_v2() {
#ifdef FAKE_NVML_INIT_FAILS
  return NVML_ERROR_DRIVER_NOT_LOADED;
#else
  init_count.fetch_add(1);
  return NVML_SUCCESS;
#endif
}

nvmlReturn_t nvmlShutdown() {
  int count = init_count.load();
  while (count > 0 && !init_count.compare_exchange_weak(count, count - 1)) {
  }
  return count > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

const char *nvmlErrorString(nvmlReturn_t result) {
  switch (result) {
  case NVML_SUCCESS:
    return "Success";
  case NVML_ERROR_UNINITIALIZED:
    return "Uninitialized";
  case NVML_ERROR_INVALID_ARGUMENT:
    return "Invalid Argument";
  case NVML_ERROR_INSUFFICIENT_SIZE:
    return "Insufficient Size";
  case NVML_ERROR_DRIVER_NOT_LOADED:
    return "Driver Not Loaded";
  case NVML_ERROR_GPU_IS_LOST:
    return "GPU is lost";
  case NVML_ERROR_ARGUMENT_VERSION_MISMATCH:
    return "Argument version mismatch";
  default:
    return "Unknown Error";
  }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
  if (init_count.load() == 0) {
    return NVML_ERROR_UNINITIALIZED;
  }
  if (count == nullptr) {
    return NVML_ERROR_INVALID_ARGUMENT;
  }
  *count = device_count;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
  if (init_count.load() == 0) {
    return NVML_ERROR_UNINITIALIZED;
  }
  if (index >= device_count || device == nullptr) {
    return NVML_ERROR_INVALID_ARGUMENT;
  }
  *device = reinterpret_cast<nvmlDevice_t>(&devices[index]);
  return NVML_SUCCESS;
}

// The fake's devices sit at PCI buses 0x3B (device 0) and 0x5E (device 1).
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pci_bus_id, nvmlDevice_t *device) {
  if (init_count.load() == 0) {
    return NVML_ERROR_UNINITIALIZED;
  }
  if (pci_bus_id == nullptr || device == nullptr) {
    return NVML_ERROR_INVALID_ARGUMENT;
  }
  const char *const bus_ids[device_count] = {"00000000:3B:00.0", "00000000:5E:00.0"};
  for (unsigned index = 0; index < device_count; ++index) {
    if (std::strcmp(pci_bus_id, bus_ids[index]) == 0) {
      *device = reinterpret_cast<nvmlDevice_t>(&devices[index]);
      return NVML_SUCCESS;
    }
  }
  return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
  for (unsigned i = 0; i < device_count; ++i) {
    if (reinterpret_cast<nvmlDevice_t>(&devices[i]) == device && index != nullptr) {
      *index = i;
      return NVML_SUCCESS;
    }
  }
  return NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
  if (const nvmlReturn_t rc = check_device_call(device, name, false); rc != NVML_SUCCESS) {
    return rc;
  }
  const char *fake_name = device_of(device)->name;
  if (std::strlen(fake_name) + 1 > length) {
    return NVML_ERROR_INSUFFICIENT_SIZE;
  }
  std::memcpy(name, fake_name, std::strlen(fake_name) + 1);
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
  if (const nvmlReturn_t rc = check_device_call(device, memory, true); rc != NVML_SUCCESS) {
    return rc;
  }
  const FakeDevice &fake = *device_of(device);
  memory->total = fake.total;
  memory->free = fake.free.load();
  memory->used = fake.used.load();
  return NVML_SUCCESS;
}

#ifndef FAKE_NVML_WITHOUT_MEMORY_V2
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
  if (const nvmlReturn_t rc = check_device_call(device, memory, true); rc != NVML_SUCCESS) {
    return rc;
  }
  if (memory->version != nvmlMemory_v2) {
    return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
  }
  const FakeDevice &fake = *device_of(device);
  memory->total = fake.total;
  memory->reserved = fake.reserved;
  memory->free = fake.free.load();
  memory->used = fake.used.load() - fake.reserved; // v2 reports the reserved part apart
  return NVML_SUCCESS;
}
#endif

#ifndef FAKE_NVML_WITHOUT_UTILIZATION
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
  if (const nvmlReturn_t rc = check_device_call(device, utilization, true); rc != NVML_SUCCESS) {
    return rc;
  }
  const FakeDevice &fake = *device_of(device);
  utilization->gpu = fake.gpu_percent.load();
  utilization->memory = fake.memory_percent.load();
  return NVML_SUCCESS;
}
#endif

// Test hooks.

int fake_nvml_init_count() {
  return init_count.load();
}

void fake_nvml_set_device(unsigned int index, unsigned long long free, unsigned long long used,
                          unsigned int gpu_percent) {
  if (index < device_count) {
    devices[index].free.store(free);
    devices[index].used.store(used);
    devices[index].gpu_percent.store(gpu_percent);
  }
}

// Memory and utilization calls return `rc` until called again with 0.
void fake_nvml_fail_reads(int rc) {
  failing_reads.store(rc);
}

} // extern "C"
