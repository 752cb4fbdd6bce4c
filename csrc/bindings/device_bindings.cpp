// Python bindings of the device seam: devices (CUDA and simulated), the copy engine and its
// transfers, streams, events and the gather. Handles cross as integers.
#include "device_bindings.hpp"

#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "batch_bindings.hpp"
#include "dynbatch/copy_engine.hpp"
#include "dynbatch/device.hpp"
#include "dynbatch/simulated_device.hpp"

namespace py = pybind11;

namespace dynbatch::bindings {
namespace {

StreamView stream_of(std::uintptr_t handle) {
  return StreamView(handle);
}

std::vector<void *> as_mutable_pointers(const std::vector<std::uintptr_t> &addresses) {
  std::vector<void *> pointers(addresses.size());
  for (std::size_t i = 0; i < addresses.size(); ++i) {
    pointers[i] = reinterpret_cast<void *>(addresses[i]);
  }
  return pointers;
}

py::dict engine_stats(const CopyEngine &engine) {
  const CopyEngineStats stats = engine.stats();
  py::dict out;
  out["transfers"] = stats.transfers;
  out["copies"] = stats.copies;
  out["bytes"] = stats.bytes;
  out["released"] = stats.released;
  out["in_flight"] = stats.in_flight;
  out["failures"] = stats.failures;
  return out;
}

py::dict simulated_stats(const SimulatedDevice &device) {
  const SimulatedDeviceStats stats = device.stats();
  py::dict out;
  out["copies"] = stats.copies;
  out["copied_bytes"] = stats.copied_bytes;
  out["gathers"] = stats.gathers;
  out["waits"] = stats.waits;
  out["pinned_bytes"] = stats.pinned_bytes;
  out["device_bytes"] = stats.device_bytes;
  out["streams"] = stats.streams;
  out["events"] = stats.events;
  return out;
}

} // namespace

void bind_device(py::module_ &m) {
  py::register_exception<DeviceError>(m, "DeviceError", PyExc_RuntimeError);

  py::class_<Device, std::shared_ptr<Device>>(m, "Device")
      .def_property_readonly("name", &Device::name)
      .def(
          "gather",
          [](Device &device, std::uintptr_t stream, const std::vector<std::uintptr_t> &sources,
             std::uintptr_t destination, std::uint64_t row_bytes, std::uint64_t rows,
             const std::vector<std::uint32_t> &lengths, const py::bytes &pad) {
            const std::vector<const void *> pointers = as_pointers(sources);
            const std::string element = pad;
            GatherLaunch launch;
            launch.shape = gather::Shape{pointers.size(), row_bytes, rows};
            launch.sources = pointers;
            launch.lengths = lengths;
            launch.destination = reinterpret_cast<void *>(destination);
            launch.pad = pad_pattern(
                std::span(reinterpret_cast<const std::byte *>(element.data()), element.size()));
            device.gather(launch, stream_of(stream));
          },
          py::arg("stream"), py::arg("sources"), py::arg("destination"), py::arg("row_bytes"),
          py::arg("rows") = 1, py::arg("lengths") = std::vector<std::uint32_t>{},
          py::arg("pad") = py::bytes());

  m.def("cuda_device", &make_cuda_device, py::arg("index"));

  py::class_<SimulatedDevice::Gate, std::shared_ptr<SimulatedDevice::Gate>>(m, "Gate").def(
      "open", &SimulatedDevice::Gate::open);

  py::class_<SimulatedDevice, Device, std::shared_ptr<SimulatedDevice>>(m, "SimulatedDevice")
      .def(py::init([](double min_delay_us, double max_delay_us, std::uint64_t seed, bool real_time,
                       std::optional<std::size_t> pinned_limit_bytes,
                       std::size_t wait_log_capacity) {
             SimulatedDeviceOptions options;
             options.min_delay_ns = static_cast<Nanoseconds>(min_delay_us * 1e3);
             options.max_delay_ns = static_cast<Nanoseconds>(max_delay_us * 1e3);
             options.seed = seed;
             options.real_time = real_time;
             options.pinned_limit_bytes = pinned_limit_bytes.value_or(SIZE_MAX);
             options.wait_log_capacity = wait_log_capacity;
             return std::make_shared<SimulatedDevice>(options);
           }),
           py::arg("min_delay_us") = 0.0, py::arg("max_delay_us") = 0.0, py::arg("seed") = 0,
           py::arg("real_time") = true, py::arg("pinned_limit_bytes") = py::none(),
           py::arg("wait_log_capacity") = 4096)
      .def(
          "host_work",
          [](SimulatedDevice &device, Nanoseconds ns) {
            py::gil_scoped_release release; // it may sleep
            device.host_work(ns);
          },
          py::arg("ns"))
      .def("host_time_ns", &SimulatedDevice::host_time_ns)
      .def(
          "event_time_ns",
          [](const SimulatedDevice &device, std::uintptr_t event) {
            return device.event_time_ns(EventView(event));
          },
          py::arg("event"))
      .def(
          "enqueue_delay",
          [](SimulatedDevice &device, std::uintptr_t stream, Nanoseconds ns) {
            device.enqueue_delay(stream_of(stream), ns);
          },
          py::arg("stream"), py::arg("ns"))
      .def(
          "hold",
          // The stream stops here until the gate opens: deterministic races in tests.
          [](SimulatedDevice &device, std::uintptr_t stream) {
            return device.enqueue_gate(stream_of(stream));
          },
          py::arg("stream"))
      .def("fail", &SimulatedDevice::fail, py::arg("reason"))
      .def("first_error", &SimulatedDevice::first_error)
      .def("errors", &SimulatedDevice::errors)
      .def("waits",
           [](const SimulatedDevice &device) {
             py::list out;
             for (const WaitRecord &record : device.waits()) {
               out.append(
                   py::make_tuple(record.stream.value(), record.event.value(), record.generation));
             }
             return out;
           })
      .def("stats", &simulated_stats);

  py::class_<OwnedStream, std::shared_ptr<OwnedStream>>(m, "Stream")
      .def(py::init([](std::shared_ptr<Device> device) {
             return std::make_shared<OwnedStream>(std::move(device));
           }),
           py::arg("device"))
      .def_property_readonly("handle",
                             [](const OwnedStream &stream) { return stream.view().value(); });

  py::class_<OwnedEvent, std::shared_ptr<OwnedEvent>>(m, "Event")
      .def(py::init([](std::shared_ptr<Device> device) {
             return std::make_shared<OwnedEvent>(std::move(device));
           }),
           py::arg("device"))
      .def_property_readonly("handle", [](const OwnedEvent &event) { return event.view().value(); })
      .def(
          "record",
          [](OwnedEvent &event, Device &device, std::uintptr_t stream) {
            device.record_event(event.view(), stream_of(stream));
          },
          py::arg("device"), py::arg("stream"))
      .def(
          "synchronize",
          [](OwnedEvent &event, Device &device) {
            py::gil_scoped_release release;
            device.synchronize_event(event.view());
          },
          py::arg("device"));

  py::class_<Transfer, std::shared_ptr<Transfer>>(m, "Transfer")
      .def_property_readonly("sequence", &Transfer::sequence)
      .def_property_readonly("event",
                             [](const Transfer &transfer) { return transfer.event().value(); })
      .def_property_readonly("holding", &Transfer::holding)
      .def("done", &Transfer::done)
      .def("synchronize",
           [](Transfer &transfer) {
             py::gil_scoped_release release;
             transfer.synchronize();
           })
      .def(
          "wait_on",
          [](Transfer &transfer, std::uintptr_t stream) {
            transfer.make_stream_wait(stream_of(stream));
          },
          py::arg("stream"));

  py::class_<CopyEngine, std::shared_ptr<CopyEngine>>(m, "CopyEngine")
      .def(py::init([](std::shared_ptr<Device> device) {
             return std::make_shared<CopyEngine>(std::move(device));
           }),
           py::arg("device"))
      .def_property_readonly("stream",
                             [](const CopyEngine &engine) { return engine.stream().value(); })
      .def_property_readonly("device", &CopyEngine::device)
      .def(
          "stage",
          // Every leaf of a collated batch from its staging slot, the slot held until copied.
          [](CopyEngine &engine, const PyBatch &batch,
             const std::vector<std::uintptr_t> &destinations) {
            if (batch.batch.lease == nullptr) {
              throw py::value_error("stage: the batch has no staging slot");
            }
            const std::vector<void *> pointers = as_mutable_pointers(destinations);
            const std::vector<LeafCopy> copies =
                batch_leaf_copies(*batch.layout, batch.batch.lease->data(), batch.batch.ids.size(),
                                  batch.batch.padded_length, pointers);
            return engine.enqueue(copies, batch.batch.lease);
          },
          py::arg("batch"), py::arg("destinations"))
      .def(
          "copy",
          // Copies of arbitrary host buffers; with `batch`, its slot is held until they ran.
          [](CopyEngine &engine, const std::vector<std::uintptr_t> &sources,
             const std::vector<std::uintptr_t> &destinations, const std::vector<std::size_t> &sizes,
             const PyBatch *batch) {
            if (sources.size() != destinations.size() || sources.size() != sizes.size()) {
              throw py::value_error("copy: sources, destinations and sizes differ in length");
            }
            std::vector<LeafCopy> copies(sources.size());
            for (std::size_t i = 0; i < copies.size(); ++i) {
              copies[i] = LeafCopy{reinterpret_cast<void *>(destinations[i]),
                                   reinterpret_cast<const void *>(sources[i]), sizes[i]};
            }
            std::shared_ptr<const void> hold;
            if (batch != nullptr) {
              hold = batch->batch.lease;
            }
            return engine.enqueue(copies, std::move(hold));
          },
          py::arg("sources"), py::arg("destinations"), py::arg("sizes"), py::arg("batch") = nullptr)
      .def("stats", &engine_stats)
      .def("first_error", &CopyEngine::first_error);
}

} // namespace dynbatch::bindings
