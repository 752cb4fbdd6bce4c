// Telemetry bindings: host readings, the sampler handle, scripted readings for tests.
#include "telemetry_bindings.hpp"

#include <cmath>
#include <string>

namespace py = pybind11;

namespace dynbatch::bindings {
namespace {

py::dict sample_to_dict(const TelemetrySample &sample, const std::string &source) {
  py::dict out;
  out["source"] = source;
  out["time_ns"] = sample.time_ns;
  out["memory_total_bytes"] = sample.memory_total_bytes;
  out["memory_available_bytes"] = sample.memory_available_bytes;
  out["process_rss_bytes"] = sample.process_rss_bytes;
  out["utilization"] = sample.utilization;
  return out;
}

TelemetrySample make_sample(std::uint64_t total, std::uint64_t available, std::uint64_t rss,
                            double utilization) {
  TelemetrySample sample;
  sample.memory_total_bytes = total;
  sample.memory_available_bytes = available;
  sample.process_rss_bytes = rss;
  sample.utilization = utilization;
  return sample;
}

Nanoseconds period_ns(double period_s) {
  if (!(period_s > 0.0) || !std::isfinite(period_s)) {
    throw py::value_error("period_s must be a positive number of seconds");
  }
  return static_cast<Nanoseconds>(period_s * 1e9);
}

} // namespace

void bind_telemetry(py::module_ &m) {
  m.def("host_telemetry", [] {
    HostTelemetrySource source;
    TelemetrySample sample;
    {
      py::gil_scoped_release release;
      sample = source.read();
    }
    return sample_to_dict(sample, source.name());
  });

  py::class_<PyTelemetry>(m, "Telemetry")
      .def_static(
          "host",
          [](double period_s) {
            const Nanoseconds period = period_ns(period_s);
            py::gil_scoped_release release;
            return PyTelemetry{
                std::make_shared<TelemetrySampler>(std::make_shared<HostTelemetrySource>(), period),
                nullptr};
          },
          py::arg("period_s") = 0.05)
      .def_static(
          "scripted",
          [](std::uint64_t total, std::uint64_t available, std::uint64_t rss, double utilization,
             double period_s) {
            auto source = std::make_shared<ScriptedTelemetrySource>(
                make_sample(total, available, rss, utilization));
            const Nanoseconds period = period_ns(period_s);
            py::gil_scoped_release release;
            return PyTelemetry{std::make_shared<TelemetrySampler>(source, period), source};
          },
          py::arg("memory_total_bytes"), py::arg("memory_available_bytes"),
          py::arg("process_rss_bytes") = 0, py::arg("utilization") = 0.0,
          py::arg("period_s") = 0.05)
      .def(
          "set_scripted",
          [](PyTelemetry &self, std::uint64_t total, std::uint64_t available, std::uint64_t rss,
             double utilization) {
            if (!self.scripted) {
              throw py::type_error("set_scripted() needs telemetry made by Telemetry.scripted()");
            }
            self.scripted->set(make_sample(total, available, rss, utilization));
            py::gil_scoped_release release;
            self.sampler->refresh();
          },
          py::arg("memory_total_bytes"), py::arg("memory_available_bytes"),
          py::arg("process_rss_bytes") = 0, py::arg("utilization") = 0.0)
      .def("latest",
           [](const PyTelemetry &self) {
             return sample_to_dict(self.sampler->latest(), self.sampler->source_name());
           })
      .def_property_readonly("source",
                             [](const PyTelemetry &self) { return self.sampler->source_name(); })
      .def_property_readonly("peak_rss_bytes",
                             [](const PyTelemetry &self) { return self.sampler->peak_rss_bytes(); })
      .def_property_readonly(
          "min_available_bytes",
          [](const PyTelemetry &self) { return self.sampler->min_available_bytes(); })
      .def("reset_peak", [](PyTelemetry &self) { self.sampler->reset_peak(); })
      .def("close", [](PyTelemetry &self) {
        // Drops this handle's reference; the thread stops when no former uses it any more.
        py::gil_scoped_release release;
        self.sampler.reset();
        self.scripted.reset();
      });
}

} // namespace dynbatch::bindings
