// Telemetry bindings: host and NVML readings, the sampler handle, scripted readings for tests.
#include "telemetry_bindings.hpp"

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dynbatch/fork_guard.hpp"
#include "dynbatch/nvml_shim.hpp"
#include "dynbatch/nvml_telemetry.hpp"

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

// library=None: the process-wide default (DYNBATCH_NVML_LIBRARY or libnvidia-ml.so.1);
// otherwise a library of its own at that path (str or os.PathLike).
std::shared_ptr<const NvmlLibrary> open_nvml(const py::object &library) {
  if (library.is_none()) {
    py::gil_scoped_release release; // the first call loads and initializes NVML
    return NvmlLibrary::process_default();
  }
  const auto path = py::module_::import("os").attr("fspath")(library).cast<std::string>();
  py::gil_scoped_release release;
  return std::make_shared<const NvmlLibrary>(path);
}

// Drops a library reference without the GIL: the last one runs nvmlShutdown and dlclose.
void release_nvml(std::shared_ptr<const NvmlLibrary> &nvml) {
  py::gil_scoped_release release;
  nvml.reset();
}

py::dict nvml_status_dict(const NvmlLibrary &nvml) {
  py::dict out;
  out["available"] = nvml.available();
  out["reason"] = nvml.reason();
  out["device_count"] = nvml.device_count();
  out["library"] = nvml.path();
  return out;
}

py::dict reading_to_dict(const NvmlDeviceReading &reading) {
  py::dict out;
  out["index"] = reading.index;
  out["name"] = reading.name;
  const auto bytes = [&](std::uint64_t value) -> py::object {
    return reading.memory_ok ? py::object(py::int_(value)) : py::object(py::none());
  };
  out["memory_total_bytes"] = bytes(reading.memory_total_bytes);
  out["memory_free_bytes"] = bytes(reading.memory_free_bytes);
  out["memory_used_bytes"] = bytes(reading.memory_used_bytes);
  out["memory_reserved_bytes"] = bytes(reading.memory_reserved_bytes);
  const auto share = [&](double value) -> py::object {
    return reading.utilization_ok ? py::object(py::float_(value)) : py::object(py::none());
  };
  out["utilization"] = share(reading.utilization);
  out["memory_utilization"] = share(reading.memory_utilization);
  out["error"] = reading.error;
  return out;
}

// A closed handle raises instead of dereferencing a sampler it no longer holds.
TelemetrySampler &open_sampler(const PyTelemetry &self) {
  if (!self.sampler) {
    throw std::runtime_error("this Telemetry is closed");
  }
  if (self.sampler->forked()) {
    throw ForkedError("this Telemetry");
  }
  return *self.sampler;
}

} // namespace

void bind_telemetry(py::module_ &m) {
  m.def(
      "nvml_status",
      [](const py::object &library) {
        std::shared_ptr<const NvmlLibrary> nvml = open_nvml(library);
        py::dict out = nvml_status_dict(*nvml);
        release_nvml(nvml);
        return out;
      },
      py::arg("library") = py::none());

  m.def(
      "nvml_index_of_pci_bus_id",
      [](const std::string &pci_bus_id, const py::object &library) {
        std::shared_ptr<const NvmlLibrary> nvml = open_nvml(library);
        int index = -1;
        {
          py::gil_scoped_release release;
          index = nvml->index_of_pci_bus_id(pci_bus_id);
        }
        release_nvml(nvml);
        return index;
      },
      py::arg("pci_bus_id"), py::arg("library") = py::none());

  m.def(
      "nvml_devices",
      [](const py::object &library) {
        std::shared_ptr<const NvmlLibrary> nvml = open_nvml(library);
        std::vector<NvmlDeviceReading> readings;
        {
          py::gil_scoped_release release;
          for (unsigned index = 0; index < nvml->device_count(); ++index) {
            readings.push_back(nvml->read_device(index, /*with_name=*/true));
          }
        }
        release_nvml(nvml);
        py::list out;
        for (const NvmlDeviceReading &reading : readings) {
          out.append(reading_to_dict(reading));
        }
        return out;
      },
      py::arg("library") = py::none());

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
            return PyTelemetry{make_fork_safe_shared<TelemetrySampler>(
                                   std::make_shared<HostTelemetrySource>(), period),
                               nullptr};
          },
          py::arg("period_s") = 0.05)
      .def_static(
          "auto",
          [](int device_index, double period_s) {
            const Nanoseconds period = period_ns(period_s);
            py::gil_scoped_release release;
            return PyTelemetry{make_fork_safe_shared<TelemetrySampler>(
                                   make_telemetry_source(device_index), period),
                               nullptr};
          },
          py::arg("device_index") = -1, py::arg("period_s") = 0.05)
      .def_static(
          "nvml",
          [](int device_index, double period_s, const py::object &library) {
            if (device_index < 0) {
              throw py::value_error("device_index must be an NVML device index >= 0, got " +
                                    std::to_string(device_index));
            }
            const Nanoseconds period = period_ns(period_s);
            std::shared_ptr<const NvmlLibrary> nvml = open_nvml(library);
            std::string why_not;
            std::shared_ptr<TelemetrySampler> sampler;
            {
              py::gil_scoped_release release;
              auto source = NvmlTelemetrySource::open(std::move(nvml),
                                                      static_cast<unsigned>(device_index), why_not);
              if (source) {
                sampler = make_fork_safe_shared<TelemetrySampler>(std::move(source), period);
              }
            }
            if (!sampler) {
              throw std::runtime_error("NVML telemetry for device " + std::to_string(device_index) +
                                       " is unavailable: " + why_not);
            }
            return PyTelemetry{std::move(sampler), nullptr};
          },
          py::arg("device_index"), py::arg("period_s") = 0.05, py::arg("library") = py::none())
      .def_static(
          "scripted",
          [](std::uint64_t total, std::uint64_t available, std::uint64_t rss, double utilization,
             double period_s) {
            auto source = std::make_shared<ScriptedTelemetrySource>(
                make_sample(total, available, rss, utilization));
            const Nanoseconds period = period_ns(period_s);
            py::gil_scoped_release release;
            return PyTelemetry{make_fork_safe_shared<TelemetrySampler>(source, period), source};
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
            const std::shared_ptr<TelemetrySampler> sampler = self.sampler; // kept across release
            if (!sampler) {
              throw std::runtime_error("this Telemetry is closed");
            }
            if (sampler->forked()) {
              throw ForkedError("this Telemetry");
            }
            py::gil_scoped_release release;
            sampler->refresh();
          },
          py::arg("memory_total_bytes"), py::arg("memory_available_bytes"),
          py::arg("process_rss_bytes") = 0, py::arg("utilization") = 0.0)
      .def("latest",
           [](const PyTelemetry &self) {
             return sample_to_dict(open_sampler(self).latest(), open_sampler(self).source_name());
           })
      .def_property_readonly(
          "source", [](const PyTelemetry &self) { return open_sampler(self).source_name(); })
      .def_property_readonly(
          "peak_rss_bytes",
          [](const PyTelemetry &self) { return open_sampler(self).peak_rss_bytes(); })
      .def_property_readonly(
          "min_available_bytes",
          [](const PyTelemetry &self) { return open_sampler(self).min_available_bytes(); })
      .def("reset_peak", [](PyTelemetry &self) { open_sampler(self).reset_peak(); })
      .def("close", [](PyTelemetry &self) {
        // Drops this handle's reference; the thread stops when no former uses it any more.
        // The handle changes under the GIL; only the (joining) destruction runs without it.
        std::shared_ptr<TelemetrySampler> sampler = std::move(self.sampler);
        self.scripted.reset();
        py::gil_scoped_release release;
        sampler.reset();
      });
}

} // namespace dynbatch::bindings
