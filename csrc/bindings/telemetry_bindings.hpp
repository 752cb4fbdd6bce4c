#pragma once
// Python bindings of the telemetry: the sampler handle the processor and the former share.

#include <pybind11/pybind11.h>

#include <memory>

#include "dynbatch/telemetry.hpp"

namespace dynbatch::bindings {

// The sampler plus, for scripted telemetry, the handle a test uses to change readings.
struct PyTelemetry {
  std::shared_ptr<TelemetrySampler> sampler;
  std::shared_ptr<ScriptedTelemetrySource> scripted;
};

void bind_telemetry(pybind11::module_ &m);

} // namespace dynbatch::bindings
