// NVML shim and telemetry against fake libnvidia-ml builds (fake_nvml.cpp): the shim loads
// the library and reports exactly its values, v1 memory when v2 is absent, clear reasons when a
// library is missing, lacks a required symbol or fails to initialize, balanced init/shutdown,
// and the factory's fall back to host telemetry. No GPU or driver needed.
//
// The "process_default" test runs twice under ctest: plainly, and with DYNBATCH_NVML_LIBRARY
// naming the fake (cpp.nvml_env_default).

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <dlfcn.h>
#include <memory>
#include <string>
#include <thread>

#include "dynbatch/nvml_shim.hpp"
#include "dynbatch/nvml_telemetry.hpp"
#include "dynbatch/platform.hpp"
#include "dynbatch/telemetry.hpp"
#include "test_support.hpp"

using dynbatch::testing::eventually;

using dynbatch::choose_telemetry_source;
using dynbatch::make_telemetry_source;
using dynbatch::Nanoseconds;
using dynbatch::now_ns;
using dynbatch::NvmlDeviceReading;
using dynbatch::NvmlLibrary;
using dynbatch::NvmlTelemetrySource;
using dynbatch::TelemetrySample;
using dynbatch::TelemetrySampler;

namespace {

constexpr std::uint64_t GiB = 1ull << 30;
constexpr std::uint64_t MiB = 1ull << 20;

bool contains(const std::string &text, const std::string &part) {
  return text.find(part) != std::string::npos;
}

// The fake's test hooks, through a handle of our own (the same loaded object the shim uses).
// Puts the scripted values back when done, for the next test.
class FakeHooks {
public:
  explicit FakeHooks(const char *path) : handle_(dlopen(path, RTLD_NOW | RTLD_LOCAL)) {
    REQUIRE(handle_ != nullptr);
    init_count = reinterpret_cast<int (*)()>(dlsym(handle_, "fake_nvml_init_count"));
    set_device =
        reinterpret_cast<void (*)(unsigned, unsigned long long, unsigned long long, unsigned)>(
            dlsym(handle_, "fake_nvml_set_device"));
    fail_reads = reinterpret_cast<void (*)(int)>(dlsym(handle_, "fake_nvml_fail_reads"));
    REQUIRE(init_count != nullptr && set_device != nullptr && fail_reads != nullptr);
  }
  ~FakeHooks() {
    if (set_device != nullptr) {
      fail_reads(0);
      set_device(0, 12 * GiB, 4 * GiB, 37);
      set_device(1, 20 * GiB, 60 * GiB, 91);
    }
    dlclose(handle_);
  }
  FakeHooks(const FakeHooks &) = delete;
  FakeHooks &operator=(const FakeHooks &) = delete;

  int (*init_count)() = nullptr;
  void (*set_device)(unsigned, unsigned long long, unsigned long long, unsigned) = nullptr;
  void (*fail_reads)(int) = nullptr;

private:
  void *handle_;
};

} // namespace

TEST_CASE(loads_fake_library_and_resolves_the_table) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML);
  CHECK(nvml.available());
  CHECK_EQ(nvml.reason(), std::string());
  CHECK_EQ(nvml.path(), std::string(DYNBATCH_FAKE_NVML));
  CHECK_EQ(nvml.device_count(), 2u);
  CHECK(nvml.api().required.nvmlInit_v2 != nullptr);
  CHECK(nvml.api().required.nvmlErrorString != nullptr);
  CHECK(nvml.api().optional.nvmlDeviceGetMemoryInfo_v2 != nullptr);
  CHECK_EQ(nvml.error_string(9), std::string("Driver Not Loaded (NVML error 9)"));
}

TEST_CASE(pci_bus_id_maps_a_cuda_device_to_nvml_numbering) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML);
  CHECK_EQ(nvml.index_of_pci_bus_id("00000000:3B:00.0"), 0);
  CHECK_EQ(nvml.index_of_pci_bus_id("00000000:5E:00.0"), 1);
  CHECK_EQ(nvml.index_of_pci_bus_id("00000000:99:00.0"), -1);
  NvmlLibrary missing("/nonexistent/libnvidia-ml.so.1");
  CHECK_EQ(missing.index_of_pci_bus_id("00000000:3B:00.0"), -1);
}

TEST_CASE(reads_exact_fake_values_through_memory_v2) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML);
  const NvmlDeviceReading zero = nvml.read_device(0, true);
  CHECK_EQ(zero.error, std::string());
  CHECK(zero.memory_ok);
  CHECK(zero.utilization_ok);
  CHECK_EQ(zero.index, 0u);
  CHECK_EQ(zero.name, std::string("Fake GPU 0"));
  CHECK_EQ(zero.memory_total_bytes, 16 * GiB);
  CHECK_EQ(zero.memory_free_bytes, 12 * GiB);
  CHECK_EQ(zero.memory_reserved_bytes, 300 * MiB);       // only v2 reports it
  CHECK_EQ(zero.memory_used_bytes, 4 * GiB - 300 * MiB); // the fake's v2 `used`
  CHECK_EQ(zero.utilization, 0.37);
  CHECK_EQ(zero.memory_utilization, 0.12);

  const NvmlDeviceReading one = nvml.read_device(1, false);
  CHECK_EQ(one.name, std::string()); // not asked for
  CHECK_EQ(one.memory_total_bytes, 80 * GiB);
  CHECK_EQ(one.memory_free_bytes, 20 * GiB);
  CHECK_EQ(one.utilization, 0.91);

  const NvmlDeviceReading missing = nvml.read_device(2, true);
  CHECK(!missing.memory_ok);
  CHECK(contains(missing.error, "nvmlDeviceGetHandleByIndex_v2(2)"));
  CHECK(contains(missing.error, "Invalid Argument"));
}

TEST_CASE(older_driver_without_memory_v2_reads_v1) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML_V1_ONLY);
  REQUIRE(nvml.available());
  CHECK(nvml.api().optional.nvmlDeviceGetMemoryInfo_v2 == nullptr);
  const NvmlDeviceReading zero = nvml.read_device(0, true);
  CHECK_EQ(zero.error, std::string());
  CHECK_EQ(zero.memory_total_bytes, 16 * GiB);
  CHECK_EQ(zero.memory_free_bytes, 12 * GiB);
  CHECK_EQ(zero.memory_used_bytes, 4 * GiB); // v1 `used`
  CHECK_EQ(zero.memory_reserved_bytes, 0u);
  CHECK_EQ(zero.utilization, 0.37);
}

TEST_CASE(telemetry_source_reports_fake_values_and_follows_changes) {
  FakeHooks hooks(DYNBATCH_FAKE_NVML);
  auto nvml = std::make_shared<const NvmlLibrary>(DYNBATCH_FAKE_NVML);
  std::string why_not;
  auto source = NvmlTelemetrySource::open(nvml, 1, why_not);
  REQUIRE(source != nullptr);
  CHECK_EQ(why_not, std::string());
  CHECK_EQ(source->name(), std::string("nvml:1 Fake GPU 1"));
  CHECK_EQ(source->device_index(), 1u);

  const Nanoseconds before = now_ns();
  TelemetrySample sample = source->read();
  CHECK_GE(sample.time_ns, before);
  CHECK_EQ(sample.memory_total_bytes, 80 * GiB);
  CHECK_EQ(sample.memory_available_bytes, 20 * GiB);
  CHECK_EQ(sample.utilization, 0.91);
#if defined(__linux__)
  CHECK_GT(sample.process_rss_bytes, 0u); // the host's RSS of this process
#endif

  hooks.set_device(1, 5 * GiB, 75 * GiB, 100);
  sample = source->read();
  CHECK_EQ(sample.memory_available_bytes, 5 * GiB);
  CHECK_EQ(sample.utilization, 1.0);

  // A failing read keeps the last good values rather than reporting a full device.
  hooks.fail_reads(15);
  const NvmlDeviceReading failed = nvml->read_device(1, false);
  CHECK(!failed.memory_ok);
  CHECK(!failed.utilization_ok);
  CHECK(contains(failed.error, "nvmlDeviceGetMemoryInfo failed: GPU is lost (NVML error 15)"));
  CHECK(contains(failed.error, "nvmlDeviceGetUtilizationRates failed: GPU is lost"));
  sample = source->read();
  CHECK_EQ(sample.memory_total_bytes, 80 * GiB);
  CHECK_EQ(sample.memory_available_bytes, 5 * GiB);
  CHECK_EQ(sample.utilization, 1.0);
  hooks.fail_reads(0);
}

TEST_CASE(sampler_polls_the_nvml_source) {
  FakeHooks hooks(DYNBATCH_FAKE_NVML);
  std::string why_not;
  auto source = NvmlTelemetrySource::open(std::make_shared<const NvmlLibrary>(DYNBATCH_FAKE_NVML),
                                          0, why_not);
  REQUIRE(source != nullptr);
  TelemetrySampler sampler(source, 1'000'000);
  CHECK_EQ(sampler.source_name(), std::string("nvml:0 Fake GPU 0"));
  CHECK_EQ(sampler.latest().memory_available_bytes, 12 * GiB);
  hooks.set_device(0, 3 * GiB, 13 * GiB, 80);
  CHECK(eventually([&] { return sampler.latest().memory_available_bytes == 3 * GiB; }));
  CHECK(eventually([&] { return sampler.min_available_bytes() == 3 * GiB; }));
  CHECK_EQ(sampler.latest().utilization, 0.8);
}

TEST_CASE(missing_required_symbol_names_it) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML_NO_UTILIZATION);
  CHECK(!nvml.available());
  CHECK(contains(nvml.reason(), "lacks the required symbol nvmlDeviceGetUtilizationRates"));
  CHECK(contains(nvml.reason(), DYNBATCH_FAKE_NVML_NO_UTILIZATION));
  CHECK_EQ(nvml.device_count(), 0u);
  CHECK(nvml.api().required.nvmlInit_v2 == nullptr); // no partial table
  const NvmlDeviceReading reading = nvml.read_device(0, true);
  CHECK(!reading.memory_ok);
  CHECK_EQ(reading.error, nvml.reason());
  // It never got as far as initializing NVML.
  FakeHooks hooks(DYNBATCH_FAKE_NVML_NO_UTILIZATION);
  CHECK_EQ(hooks.init_count(), 0);
}

TEST_CASE(init_failure_gives_the_nvml_error_string) {
  NvmlLibrary nvml(DYNBATCH_FAKE_NVML_INIT_FAILS);
  CHECK(!nvml.available());
  CHECK_EQ(nvml.reason(), std::string("nvmlInit_v2 failed: Driver Not Loaded (NVML error 9)"));
  CHECK_EQ(nvml.device_count(), 0u);
}

TEST_CASE(missing_library_says_it_cannot_be_loaded) {
  const std::string path = "/nonexistent/dynbatch/libnvidia-ml.so.1";
  NvmlLibrary nvml(path);
  CHECK(!nvml.available());
  CHECK(contains(nvml.reason(), "cannot load NVML library '" + path + "'"));
  CHECK(contains(nvml.reason(), "No such file or directory")); // dlerror's words
  CHECK_EQ(nvml.device_count(), 0u);
  std::string why_not;
  CHECK(NvmlTelemetrySource::open(std::make_shared<const NvmlLibrary>(path), 0, why_not) ==
        nullptr);
  CHECK(contains(why_not, "cannot load NVML library"));
}

TEST_CASE(each_library_balances_its_init_with_shutdown) {
  FakeHooks hooks(DYNBATCH_FAKE_NVML);
  const int before = hooks.init_count(); // the process default may hold one (env run)
  auto first = std::make_unique<NvmlLibrary>(DYNBATCH_FAKE_NVML);
  CHECK_EQ(hooks.init_count(), before + 1);
  auto second = std::make_unique<NvmlLibrary>(DYNBATCH_FAKE_NVML);
  CHECK_EQ(hooks.init_count(), before + 2);
  first.reset();
  CHECK_EQ(hooks.init_count(), before + 1);
  CHECK(second->read_device(0, false).memory_ok); // still initialized for the other
  second.reset();
  CHECK_EQ(hooks.init_count(), before);
}

TEST_CASE(choice_falls_back_to_host_with_a_reason) {
  auto fake = std::make_shared<const NvmlLibrary>(DYNBATCH_FAKE_NVML);

  auto chosen = choose_telemetry_source(0, fake);
  CHECK_EQ(chosen.source->name(), std::string("nvml:0 Fake GPU 0"));
  CHECK_EQ(chosen.nvml_reason, std::string());

  auto host = choose_telemetry_source(-1, fake);
  CHECK_EQ(host.source->name(), std::string("host"));
  CHECK(contains(host.nvml_reason, "device_index < 0"));

  auto out_of_range = choose_telemetry_source(2, fake);
  CHECK_EQ(out_of_range.source->name(), std::string("host"));
  CHECK(contains(out_of_range.nvml_reason, "device index 2 is out of range: NVML sees 2"));

  for (const char *broken : {DYNBATCH_FAKE_NVML_NO_UTILIZATION, DYNBATCH_FAKE_NVML_INIT_FAILS,
                             "/nonexistent/libnvidia-ml.so.1"}) {
    auto library = std::make_shared<const NvmlLibrary>(broken);
    auto fallback = choose_telemetry_source(0, library);
    CHECK_EQ(fallback.source->name(), std::string("host"));
    CHECK_EQ(fallback.nvml_reason, library->reason());
    CHECK(!fallback.nvml_reason.empty());
#if defined(__linux__)
    CHECK_GT(fallback.source->read().memory_total_bytes, 0u); // a working host source
#endif
  }
}

TEST_CASE(process_default_follows_the_environment) {
  const char *override_path = std::getenv("DYNBATCH_NVML_LIBRARY");
  if (std::getenv("DYNBATCH_TEST_EXPECT_NVML_OVERRIDE") != nullptr) { // cpp.nvml_env_default
    REQUIRE(override_path != nullptr && *override_path != '\0');
  }
  CHECK_EQ(make_telemetry_source(-1)->name(), std::string("host"));
  const auto &nvml = NvmlLibrary::process_default();
  CHECK(nvml.get() == NvmlLibrary::process_default().get()); // one per process
  CHECK_EQ(nvml->path(), NvmlLibrary::default_path());
  if (override_path != nullptr && *override_path != '\0') {
    CHECK_EQ(NvmlLibrary::default_path(), std::string(override_path));
    CHECK(nvml->available());
    CHECK_EQ(nvml->device_count(), 2u);
    CHECK_EQ(make_telemetry_source(1)->name(), std::string("nvml:1 Fake GPU 1"));
    CHECK_EQ(make_telemetry_source(7)->name(), std::string("host"));
  } else {
    CHECK_EQ(NvmlLibrary::default_path(), std::string("libnvidia-ml.so.1"));
    // Whatever this machine has: NVML when the driver sees a device, the host otherwise.
    const std::string name = make_telemetry_source(0)->name();
    if (nvml->available() && nvml->device_count() > 0) {
      CHECK(name.rfind("nvml:0 ", 0) == 0);
    } else {
      CHECK_EQ(name, std::string("host"));
      CHECK(!nvml->available() || nvml->device_count() == 0);
    }
  }
}

int main(int argc, char **argv) {
  return dynbatch::testing::run_all(argc, argv);
}
