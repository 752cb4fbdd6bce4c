#include "dynbatch/nvml_shim.hpp"

#include <atomic>
#include <cstdlib>
#include <dlfcn.h>
#include <utility>

#include "dynbatch/fork_guard.hpp"

namespace dynbatch {
namespace {

using nvml::NVML_SUCCESS;

std::string last_dl_error() {
  const char *error = dlerror();
  return error != nullptr ? std::string(error) : std::string("unknown dlerror");
}

// dlsym into a typed slot; on POSIX a data pointer converts to a function pointer.
template <class Function> bool resolve(void *handle, const char *name, Function &slot) {
  slot = reinterpret_cast<Function>(dlsym(handle, name));
  return slot != nullptr;
}

void append_error(std::string &errors, const std::string &error) {
  if (!errors.empty()) {
    errors += "; ";
  }
  errors += error;
}

} // namespace

NvmlLibrary::NvmlLibrary(std::string path) : path_(std::move(path)) {
  if (open_and_resolve()) {
    initialize();
  }
}

NvmlLibrary::~NvmlLibrary() {
  if (initialized_) {
    api_.required.nvmlShutdown();
  }
  if (handle_ != nullptr) {
    dlclose(handle_);
  }
}

bool NvmlLibrary::open_and_resolve() {
  // RTLD_LOCAL: NVML's symbols stay out of the global scope that libraries loaded later resolve
  // against; dynbatch reaches them only through dlsym on this handle.
  handle_ = dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle_ == nullptr) {
    reason_ = "cannot load NVML library '" + path_ + "' (no NVIDIA driver?): " + last_dl_error();
    return false;
  }
  NvmlApi::Required &required = api_.required;
  const auto require = [&](const char *name, auto &slot) {
    if (reason_.empty() && !resolve(handle_, name, slot)) {
      reason_ =
          "NVML library '" + path_ + "' lacks the required symbol " + name + " (driver too old?)";
    }
  };
  require("nvmlInit_v2", required.nvmlInit_v2);
  require("nvmlShutdown", required.nvmlShutdown);
  require("nvmlDeviceGetCount_v2", required.nvmlDeviceGetCount_v2);
  require("nvmlDeviceGetHandleByIndex_v2", required.nvmlDeviceGetHandleByIndex_v2);
  require("nvmlDeviceGetMemoryInfo", required.nvmlDeviceGetMemoryInfo);
  require("nvmlDeviceGetUtilizationRates", required.nvmlDeviceGetUtilizationRates);
  require("nvmlDeviceGetName", required.nvmlDeviceGetName);
  require("nvmlErrorString", required.nvmlErrorString);
  if (!reason_.empty()) {
    api_ = NvmlApi{}; // a partial table is never handed out
    return false;
  }
  resolve(handle_, "nvmlDeviceGetMemoryInfo_v2", api_.optional.nvmlDeviceGetMemoryInfo_v2);
  resolve(handle_, "nvmlDeviceGetHandleByPciBusId_v2",
          api_.optional.nvmlDeviceGetHandleByPciBusId_v2);
  resolve(handle_, "nvmlDeviceGetIndex", api_.optional.nvmlDeviceGetIndex);
  return true;
}

void NvmlLibrary::initialize() {
  const nvml::nvmlReturn_t init = api_.required.nvmlInit_v2();
  if (init != NVML_SUCCESS) {
    reason_ = "nvmlInit_v2 failed: " + error_string(init);
    return;
  }
  initialized_ = true;
  unsigned count = 0;
  const nvml::nvmlReturn_t counted = api_.required.nvmlDeviceGetCount_v2(&count);
  if (counted != NVML_SUCCESS) {
    reason_ = "nvmlDeviceGetCount_v2 failed: " + error_string(counted);
    return;
  }
  device_count_ = count;
}

const std::string &NvmlLibrary::default_path() {
  static const std::string path = [] {
    const char *override_path = std::getenv("DYNBATCH_NVML_LIBRARY");
    return std::string(override_path != nullptr && *override_path != '\0' ? override_path
                                                                          : default_library);
  }();
  return path;
}

const std::shared_ptr<const NvmlLibrary> &NvmlLibrary::process_default() {
  // Leaked on purpose, so neither nvmlShutdown nor dlclose runs at static destruction. By then
  // a sampler thread owned by a Python object the interpreter has not freed yet, or another
  // static destructor of this or another shared object (their order is unspecified), may
  // still call into NVML, and unloading its code under them would crash the exit. The OS
  // releases everything NVML holds when the process ends. A forked child opens its own (the
  // parent's is leaked there too: shutting it down would tear down the parent's NVML state).
  struct Instance {
    ForkStamp stamp;
    std::shared_ptr<const NvmlLibrary> library;
  };
  static std::atomic<Instance *> current{nullptr};
  Instance *instance = current.load(std::memory_order_acquire); // pairs with the exchange
  while (instance == nullptr || instance->stamp.forked()) {
    auto *fresh = new Instance{ForkStamp{}, std::make_shared<const NvmlLibrary>(default_path())};
    if (current.compare_exchange_strong(instance, fresh, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) { // publishes `fresh`
      instance = fresh;
    } else {
      delete fresh; // another thread opened it first (its nvmlInit is balanced here)
    }
  }
  return instance->library;
}

std::string NvmlLibrary::error_string(nvml::nvmlReturn_t rc) const {
  const char *text =
      api_.required.nvmlErrorString != nullptr ? api_.required.nvmlErrorString(rc) : nullptr;
  return std::string(text != nullptr ? text : "unknown error") + " (NVML error " +
         std::to_string(rc) + ")";
}

NvmlDeviceReading NvmlLibrary::read_device(unsigned index, bool with_name) const {
  NvmlDeviceReading reading;
  reading.index = index;
  if (!available()) {
    reading.error = reason_;
    return reading;
  }
  const NvmlApi::Required &nvml = api_.required;
  nvml::nvmlDevice_t device = nullptr;
  const nvml::nvmlReturn_t got = nvml.nvmlDeviceGetHandleByIndex_v2(index, &device);
  if (got != NVML_SUCCESS) {
    reading.error =
        "nvmlDeviceGetHandleByIndex_v2(" + std::to_string(index) + ") failed: " + error_string(got);
    return reading;
  }

  if (with_name) {
    char name[nvml::NVML_DEVICE_NAME_V2_BUFFER_SIZE] = {};
    const nvml::nvmlReturn_t named = nvml.nvmlDeviceGetName(device, name, sizeof(name));
    if (named == NVML_SUCCESS) {
      reading.name = name;
    } else {
      append_error(reading.error, "nvmlDeviceGetName failed: " + error_string(named));
    }
  }

  // v2 when the driver has it. Should it fail (a driver that rejects the struct version, or a
  // device that does not support it), the v1 call decides; its error is the one reported.
  bool have_memory = false;
  if (api_.optional.nvmlDeviceGetMemoryInfo_v2 != nullptr) {
    nvml::nvmlMemory_v2_t memory{};
    memory.version = nvml::nvmlMemory_v2;
    if (api_.optional.nvmlDeviceGetMemoryInfo_v2(device, &memory) == NVML_SUCCESS) {
      reading.memory_total_bytes = memory.total;
      reading.memory_free_bytes = memory.free;
      reading.memory_used_bytes = memory.used;
      reading.memory_reserved_bytes = memory.reserved;
      have_memory = true;
    }
  }
  if (!have_memory) {
    nvml::nvmlMemory_t memory{};
    const nvml::nvmlReturn_t rc = nvml.nvmlDeviceGetMemoryInfo(device, &memory);
    if (rc == NVML_SUCCESS) {
      reading.memory_total_bytes = memory.total;
      reading.memory_free_bytes = memory.free;
      reading.memory_used_bytes = memory.used;
      have_memory = true;
    } else {
      append_error(reading.error, "nvmlDeviceGetMemoryInfo failed: " + error_string(rc));
    }
  }
  reading.memory_ok = have_memory;

  nvml::nvmlUtilization_t utilization{};
  const nvml::nvmlReturn_t rc = nvml.nvmlDeviceGetUtilizationRates(device, &utilization);
  if (rc == NVML_SUCCESS) {
    reading.utilization = static_cast<double>(utilization.gpu) / 100.0;
    reading.memory_utilization = static_cast<double>(utilization.memory) / 100.0;
    reading.utilization_ok = true;
  } else {
    append_error(reading.error, "nvmlDeviceGetUtilizationRates failed: " + error_string(rc));
  }
  return reading;
}

int NvmlLibrary::index_of_pci_bus_id(const std::string &pci_bus_id) const {
  const auto &by_bus_id = api_.optional.nvmlDeviceGetHandleByPciBusId_v2;
  const auto &index_of = api_.optional.nvmlDeviceGetIndex;
  if (!available() || by_bus_id == nullptr || index_of == nullptr) {
    return -1;
  }
  nvml::nvmlDevice_t device = nullptr;
  unsigned int index = 0;
  if (by_bus_id(pci_bus_id.c_str(), &device) != NVML_SUCCESS ||
      index_of(device, &index) != NVML_SUCCESS) {
    return -1;
  }
  return static_cast<int>(index);
}

} // namespace dynbatch
