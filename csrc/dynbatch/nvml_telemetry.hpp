#pragma once
// GPU telemetry from NVML, and the choice between it and the host's.
//
// Contract
// - NvmlTelemetrySource reads one device: memory total and free (as memory_available_bytes),
//   GPU utilization (0..1), and this process's host RSS. Like every TelemetrySource it is read
//   by one sampler thread at a time; name() is safe from any thread.
// - A read that fails (e.g. the GPU fell off the bus) keeps the last good memory and
//   utilization values, so a transient error never looks like a full device.
// - choose_telemetry_source never throws for an NVML problem: it falls back to the host source
//   and says why NVML was not chosen.

#include <memory>
#include <string>

#include "dynbatch/nvml_shim.hpp"
#include "dynbatch/telemetry.hpp"

namespace dynbatch {

class NvmlTelemetrySource final : public TelemetrySource {
public:
  // Null, with why_not set, when `library` is unavailable or device `index` cannot be read.
  static std::shared_ptr<NvmlTelemetrySource> open(std::shared_ptr<const NvmlLibrary> library,
                                                   unsigned index, std::string &why_not);

  TelemetrySample read() override;
  std::string name() const override { return name_; } // "nvml:<index> <device name>"
  unsigned device_index() const noexcept { return index_; }

private:
  NvmlTelemetrySource(std::shared_ptr<const NvmlLibrary> library, const NvmlDeviceReading &first);

  const std::shared_ptr<const NvmlLibrary> library_;
  const unsigned index_;
  const std::string name_;
  TelemetrySample last_good_;
};

struct TelemetryChoice {
  std::shared_ptr<TelemetrySource> source;
  std::string nvml_reason; // empty when NVML was chosen; otherwise why it was not
};

// NVML for device_index when `nvml` can read it; the host source otherwise (always for a
// negative device_index).
TelemetryChoice choose_telemetry_source(int device_index, std::shared_ptr<const NvmlLibrary> nvml);

// choose_telemetry_source with NvmlLibrary::process_default().
std::shared_ptr<TelemetrySource> make_telemetry_source(int device_index);

} // namespace dynbatch
