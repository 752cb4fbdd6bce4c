#include "dynbatch/nvml_telemetry.hpp"

#include <utility>

namespace dynbatch {
namespace {

void copy_device_values(const NvmlDeviceReading &reading, TelemetrySample &sample) {
  if (reading.memory_ok) {
    sample.memory_total_bytes = reading.memory_total_bytes;
    sample.memory_available_bytes = reading.memory_free_bytes;
  }
  if (reading.utilization_ok) {
    sample.utilization = reading.utilization;
  }
}

} // namespace

std::shared_ptr<NvmlTelemetrySource>
NvmlTelemetrySource::open(std::shared_ptr<const NvmlLibrary> library, unsigned index,
                          std::string &why_not) {
  if (!library->available()) {
    why_not = library->reason();
    return nullptr;
  }
  if (index >= library->device_count()) {
    why_not = "device index " + std::to_string(index) + " is out of range: NVML sees " +
              std::to_string(library->device_count()) + " device(s)";
    return nullptr;
  }
  // Memory is what sizing needs; a device without utilization counters (a MIG instance) is
  // still worth reading.
  const NvmlDeviceReading first = library->read_device(index, /*with_name=*/true);
  if (!first.memory_ok) {
    why_not = "cannot read device " + std::to_string(index) + ": " + first.error;
    return nullptr;
  }
  return std::shared_ptr<NvmlTelemetrySource>(new NvmlTelemetrySource(std::move(library), first));
}

NvmlTelemetrySource::NvmlTelemetrySource(std::shared_ptr<const NvmlLibrary> library,
                                         const NvmlDeviceReading &first)
    : library_(std::move(library)), index_(first.index),
      name_("nvml:" + std::to_string(first.index) + " " + first.name) {
  copy_device_values(first, last_good_);
}

TelemetrySample NvmlTelemetrySource::read() {
  const NvmlDeviceReading reading = library_->read_device(index_, /*with_name=*/false);
  copy_device_values(reading, last_good_);
  TelemetrySample sample = last_good_;
  sample.time_ns = now_ns();
  sample.process_rss_bytes = host_process_rss_bytes();
  return sample;
}

TelemetryChoice choose_telemetry_source(int device_index, std::shared_ptr<const NvmlLibrary> nvml) {
  TelemetryChoice choice;
  if (device_index < 0) {
    choice.nvml_reason = "host telemetry was asked for (device_index < 0)";
  } else if (auto source = NvmlTelemetrySource::open(
                 std::move(nvml), static_cast<unsigned>(device_index), choice.nvml_reason)) {
    choice.source = std::move(source);
    return choice;
  }
  choice.source = std::make_shared<HostTelemetrySource>();
  return choice;
}

std::shared_ptr<TelemetrySource> make_telemetry_source(int device_index) {
  if (device_index < 0) {
    return std::make_shared<HostTelemetrySource>(); // without loading NVML
  }
  return choose_telemetry_source(device_index, NvmlLibrary::process_default()).source;
}

} // namespace dynbatch
