// dynbatch._core: argument conversion and GIL release only; the logic lives in csrc/dynbatch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "dynbatch/batch_former.hpp"
#include "dynbatch/blocking_queue.hpp"
#include "dynbatch/build_info.hpp"
#include "dynbatch/collator.hpp"
#include "dynbatch/dlpack_export.hpp"
#include "dynbatch/sizing_controller.hpp"
#include "dynbatch/sizing_policy.hpp"
#include "dynbatch/staging_pool.hpp"
#include "dynbatch/stats.hpp"
#include "dynbatch/telemetry.hpp"
#include "telemetry_bindings.hpp"

namespace py = pybind11;
using namespace dynbatch;
using dynbatch::bindings::bind_telemetry;
using dynbatch::bindings::PyTelemetry;

namespace {

// A consumer waiting in the core wakes this often to let Python deliver Ctrl-C.
constexpr Nanoseconds signal_check_period_ns = 100'000'000;

Nanoseconds deadline_after(std::optional<double> timeout_s) {
  if (!timeout_s || std::isinf(*timeout_s)) {
    return no_deadline;
  }
  if (std::isnan(*timeout_s)) {
    throw py::value_error("timeout_s must be a number of seconds, got nan");
  }
  // Beyond a century is "never": keeps the conversion to nanoseconds in range.
  const double seconds = std::clamp(*timeout_s, 0.0, 3.15e9);
  return now_ns() + static_cast<Nanoseconds>(seconds * 1e9);
}

using LeafSpec = std::tuple<std::vector<std::int64_t>, int, int, int>; // shape, code, bits, lanes

BatchLayout make_layout(const std::vector<LeafSpec> &leaves) {
  std::vector<LeafLayout> layouts;
  layouts.reserve(leaves.size());
  for (const auto &[shape, code, bits, lanes] : leaves) {
    LeafLayout leaf;
    leaf.sample_shape = shape;
    leaf.dtype = {static_cast<std::uint8_t>(code), static_cast<std::uint8_t>(bits),
                  static_cast<std::uint16_t>(lanes)};
    std::size_t elements = 1;
    for (const std::int64_t extent : shape) {
      elements *= static_cast<std::size_t>(std::max<std::int64_t>(extent, 0));
    }
    leaf.bytes_per_sample = elements * static_cast<std::size_t>(bits * lanes) / 8;
    layouts.push_back(std::move(leaf));
  }
  return BatchLayout(std::move(layouts));
}

std::vector<const void *> as_pointers(const std::vector<std::uintptr_t> &addresses) {
  std::vector<const void *> pointers(addresses.size());
  for (std::size_t i = 0; i < addresses.size(); ++i) {
    pointers[i] = reinterpret_cast<const void *>(addresses[i]);
  }
  return pointers;
}

// A formed batch on its way to Python: owns the slot until every exported leaf is gone.
struct PyBatch {
  FormedBatch batch;
  std::shared_ptr<const BatchLayout> layout;

  py::capsule leaf(std::size_t index) const {
    if (index >= layout->leaf_count()) {
      throw py::index_error("leaf " + std::to_string(index) + " out of range");
    }
    dlpack::DLManagedTensor *tensor = export_leaf(batch.lease, *layout, index, batch.ids.size());
    // Unconsumed capsules free their tensor; torch renames consumed ones to "used_dltensor".
    return py::capsule(tensor, "dltensor", [](PyObject *capsule) {
      if (PyCapsule_IsValid(capsule, "dltensor")) {
        auto *owned =
            static_cast<dlpack::DLManagedTensor *>(PyCapsule_GetPointer(capsule, "dltensor"));
        owned->deleter(owned);
      }
    });
  }
};

py::dict state_to_dict(const SizingState &state) {
  py::dict out;
  out["target"] = state.target;
  out["memory_ceiling"] = state.memory_ceiling;
  out["oom_ceiling"] = state.oom_ceiling;
  out["slo_ceiling"] = state.slo_ceiling;
  out["knee"] = state.knee;
  out["exploring"] = state.exploring;
  out["ooms"] = state.ooms;
  out["latency_intercept_ns"] = state.latency_intercept_ns;
  out["latency_slope_ns"] = state.latency_slope_ns;
  out["memory_intercept_bytes"] = state.memory_intercept_bytes;
  out["memory_slope_bytes"] = state.memory_slope_bytes;
  out["observations"] = state.observations;
  return out;
}

} // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dynbatch's compiled core (private: use the dynbatch package)";
  m.attr("__version__") = DYNBATCH_VERSION; // without the device probe build_info() runs

  m.def("build_info", [] {
    const BuildInfo info = build_info();
    DeviceProbe probe;
    {
      py::gil_scoped_release release;
      probe = probe_cuda_devices();
    }
    py::dict out;
    out["version"] = info.version;
    out["compiler"] = info.compiler;
    out["cuda_compiled"] = info.cuda_compiled;
    out["cuda_architectures"] = info.cuda_architectures;
    out["cuda_runtime_version"] = info.cuda_runtime_version;
    out["gpu_usable"] = probe.usable;
    out["gpu_count"] = probe.device_count;
    out["gpu_detail"] = probe.reason;
    return out;
  });

  py::class_<BlockingQueue<std::uint64_t>>(m, "RequestQueue")
      .def(py::init<std::size_t, std::uint64_t>(), py::arg("capacity"),
           py::arg("start_position") = 0)
      .def("try_push", [](BlockingQueue<std::uint64_t> &queue,
                          std::uint64_t value) { return queue.try_push(value) == PushResult::ok; })
      .def("try_pop",
           [](BlockingQueue<std::uint64_t> &queue) -> std::optional<std::uint64_t> {
             std::uint64_t value = 0;
             if (queue.try_pop_bulk(&value, 1) == 1) {
               return value;
             }
             return std::nullopt;
           })
      .def("push_many",
           [](BlockingQueue<std::uint64_t> &queue, const std::vector<std::uint64_t> &values) {
             std::size_t pushed = 0;
             while (pushed < values.size() && queue.try_push(values[pushed]) == PushResult::ok) {
               ++pushed;
             }
             return pushed;
           })
      .def(
          "pop_many",
          [](BlockingQueue<std::uint64_t> &queue, std::size_t max_items,
             std::optional<double> timeout_s) {
            std::vector<std::uint64_t> out(max_items);
            std::size_t count = 0;
            if (timeout_s && *timeout_s == 0.0) {
              count = queue.try_pop_bulk(out.data(), max_items);
            } else {
              py::gil_scoped_release release;
              count = queue.pop_bulk_until(out.data(), max_items, deadline_after(timeout_s));
            }
            out.resize(count);
            return out;
          },
          py::arg("max_items"), py::arg("timeout_s") = 0.0)
      .def("close", &BlockingQueue<std::uint64_t>::close)
      .def_property_readonly("closed", &BlockingQueue<std::uint64_t>::closed)
      .def_property_readonly("capacity", &BlockingQueue<std::uint64_t>::capacity)
      .def("was_size", &BlockingQueue<std::uint64_t>::was_size);

  bind_telemetry(m);

  py::class_<StagingPool, std::shared_ptr<StagingPool>>(m, "StagingPool")
      .def(py::init([](std::size_t slots) { return StagingPool::create(slots); }), py::arg("slots"))
      .def("stats", [](const StagingPool &pool) {
        const StagingPoolStats stats = pool.stats();
        py::dict out;
        out["pooled_slots"] = stats.pooled_slots;
        out["slots_in_use"] = stats.slots_in_use;
        out["pooled_bytes"] = stats.pooled_bytes;
        out["one_off_in_use"] = stats.one_off_in_use;
        out["acquisitions"] = stats.acquisitions;
        out["one_off_allocations"] = stats.one_off_allocations;
        out["slot_growths"] = stats.slot_growths;
        return out;
      });

  py::class_<BatchFeedback>(m, "BatchFeedback")
      .def(py::init([](std::size_t batch_size, Nanoseconds compute_ns, Nanoseconds collate_ns,
                       std::uint64_t peak_memory_bytes, std::uint64_t reclaimable_bytes,
                       bool out_of_memory, std::uint64_t bucket) {
             return BatchFeedback{bucket,       batch_size,        compute_ns,
                                  collate_ns,   peak_memory_bytes, reclaimable_bytes,
                                  out_of_memory};
           }),
           py::arg("batch_size"), py::arg("compute_ns") = 0, py::arg("collate_ns") = 0,
           py::arg("peak_memory_bytes") = 0, py::arg("reclaimable_bytes") = 0,
           py::arg("out_of_memory") = false, py::arg("bucket") = 0);

  py::class_<SizingPolicy, std::shared_ptr<SizingPolicy>>(m, "SizingPolicy")
      .def(
          "next_batch_size",
          [](SizingPolicy &policy, std::size_t queued, std::size_t bytes_per_sample,
             std::uint64_t memory_available_bytes, std::uint64_t memory_total_bytes,
             double utilization, std::uint64_t bucket) {
            SizingInputs inputs;
            inputs.bucket = bucket;
            inputs.queued = queued;
            inputs.bytes_per_sample = bytes_per_sample;
            inputs.telemetry.memory_available_bytes = memory_available_bytes;
            inputs.telemetry.memory_total_bytes = memory_total_bytes;
            inputs.telemetry.utilization = utilization;
            return policy.next_batch_size(inputs);
          },
          py::arg("queued"), py::arg("bytes_per_sample"), py::arg("memory_available_bytes"),
          py::arg("memory_total_bytes") = 0, py::arg("utilization") = 0.0, py::arg("bucket") = 0)
      .def("on_feedback", &SizingPolicy::on_feedback, py::arg("feedback"))
      .def("state", [](const SizingPolicy &policy) { return state_to_dict(policy.state()); });

  py::class_<SizingController, SizingPolicy, std::shared_ptr<SizingController>>(m,
                                                                                "SizingController")
      .def(py::init([](std::size_t min_batch_size, std::size_t max_batch_size,
                       std::optional<double> latency_slo_ms, double knee_tolerance,
                       double memory_margin_fraction, double staged_memory_fraction,
                       double utilization_target, std::size_t history, std::size_t probe_after,
                       double probe_step) {
             ControllerOptions options;
             options.min_batch_size = min_batch_size;
             options.max_batch_size = max_batch_size;
             options.latency_slo_ns =
                 latency_slo_ms ? static_cast<Nanoseconds>(*latency_slo_ms * 1e6) : 0;
             options.knee_tolerance = knee_tolerance;
             options.memory_margin_fraction = memory_margin_fraction;
             options.staged_memory_fraction = staged_memory_fraction;
             options.utilization_target = utilization_target;
             options.history = history;
             options.probe_after = probe_after;
             options.probe_step = probe_step;
             return std::make_shared<SizingController>(options);
           }),
           py::arg("min_batch_size"), py::arg("max_batch_size"),
           py::arg("latency_slo_ms") = py::none(), py::arg("knee_tolerance") = 0.05,
           py::arg("memory_margin_fraction") = 0.05, py::arg("staged_memory_fraction") = 0.25,
           py::arg("utilization_target") = 0.0, py::arg("history") = 64,
           py::arg("probe_after") = 16, py::arg("probe_step") = 0.1);

  py::class_<StatsRecorder, std::shared_ptr<StatsRecorder>>(m, "StatsRecorder")
      .def(py::init<std::size_t>(), py::arg("ring_capacity") = 4096)
      .def("reset", &StatsRecorder::reset)
      .def("snapshot", [](const StatsRecorder &recorder) {
        const StatsSnapshot snapshot = recorder.snapshot();
        py::dict out;
        out["batches"] = snapshot.batches;
        out["samples"] = snapshot.samples;
        out["collate_ns"] = snapshot.collate_ns;
        out["compute_ns"] = snapshot.compute_ns;
        out["active_ns"] = snapshot.active_ns;
        out["histogram"] = snapshot.histogram;
        py::list recent;
        for (const BatchRecord &record : snapshot.recent) {
          recent.append(py::make_tuple(record.sequence, record.batch_size, record.target,
                                       record.first_enqueue_ns, record.formed_ns,
                                       record.delivered_ns, record.collate_ns, record.compute_ns,
                                       record.memory_available_bytes));
        }
        out["recent"] = recent;
        return out;
      });

  py::class_<PyBatch>(m, "Batch")
      .def_property_readonly("sequence", [](const PyBatch &self) { return self.batch.sequence; })
      .def_property_readonly("size", [](const PyBatch &self) { return self.batch.ids.size(); })
      .def_property_readonly("ids", [](const PyBatch &self) { return self.batch.ids; })
      .def_property_readonly("target", [](const PyBatch &self) { return self.batch.target; })
      .def_property_readonly("collate_ns",
                             [](const PyBatch &self) { return self.batch.collate_ns; })
      .def("leaf", &PyBatch::leaf, py::arg("index"));

  py::class_<BatchFormer>(m, "BatchFormer")
      .def(py::init([](const std::vector<LeafSpec> &leaves, std::size_t capacity,
                       std::size_t prefetch_depth, std::shared_ptr<StagingPool> pool,
                       std::shared_ptr<SizingPolicy> policy, const PyTelemetry &telemetry,
                       std::shared_ptr<StatsRecorder> stats, double max_delay_ms) {
             if (!telemetry.sampler) {
               throw py::value_error("telemetry was closed");
             }
             if (!(max_delay_ms >= 0.0 && max_delay_ms <= 3.6e6)) {
               throw py::value_error("max_delay_ms must be between 0 and 3600000 (an hour)");
             }
             FormerOptions options;
             options.capacity = capacity;
             options.prefetch_depth = prefetch_depth;
             options.max_delay_ns = static_cast<Nanoseconds>(max_delay_ms * 1e6);
             return std::make_unique<BatchFormer>(make_layout(leaves), options, std::move(pool),
                                                  std::move(policy), telemetry.sampler,
                                                  std::move(stats));
           }),
           py::arg("leaves"), py::arg("capacity"), py::arg("prefetch_depth"), py::arg("pool"),
           py::arg("policy"), py::arg("telemetry"), py::arg("stats"), py::arg("max_delay_ms") = 0.0)
      .def(
          "push",
          [](BatchFormer &former, std::uint64_t first_id, std::size_t count,
             const std::vector<std::uintptr_t> &addresses) {
            std::vector<std::uint64_t> ids(count);
            for (std::size_t i = 0; i < ids.size(); ++i) {
              ids[i] = first_id + i;
            }
            const std::vector<const void *> sources = as_pointers(addresses);
            return former.push(ids, sources); // never blocks: no GIL release on the hot path
          },
          py::arg("first_id"), py::arg("count"), py::arg("addresses"))
      .def("close_input", &BatchFormer::close_input)
      .def(
          "next_batch",
          [](BatchFormer &former, std::optional<double> timeout_s) -> std::optional<PyBatch> {
            const Nanoseconds deadline = deadline_after(timeout_s);
            for (;;) {
              PyBatch out{FormedBatch{}, former.layout()};
              NextStatus status = NextStatus::timeout;
              {
                py::gil_scoped_release release;
                status = former.next_batch(out.batch,
                                           std::min(deadline, now_ns() + signal_check_period_ns));
              }
              if (status == NextStatus::batch) {
                return out;
              }
              if (status == NextStatus::finished) {
                return std::nullopt;
              }
              if (PyErr_CheckSignals() != 0) {
                throw py::error_already_set();
              }
              if (now_ns() >= deadline) {
                PyErr_SetString(PyExc_TimeoutError, "no batch within the timeout");
                throw py::error_already_set();
              }
            }
          },
          py::arg("timeout_s") = py::none())
      .def("report_feedback", &BatchFormer::report_feedback, py::arg("sequence"),
           py::arg("feedback"))
      .def_property_readonly("bucket", &BatchFormer::bucket)
      .def_property_readonly("sample_bytes", &BatchFormer::sample_bytes)
      .def("close",
           [](BatchFormer &former) {
             py::gil_scoped_release release;
             former.close();
           })
      .def_property_readonly("capacity", &BatchFormer::capacity)
      .def_property_readonly("queued", &BatchFormer::queued);

  m.def(
      "collate",
      [](const std::vector<LeafSpec> &leaves, const std::vector<std::uintptr_t> &addresses,
         std::size_t batch_size, std::shared_ptr<StagingPool> pool) {
        auto layout = std::make_shared<const BatchLayout>(make_layout(leaves));
        const std::vector<const void *> sources = as_pointers(addresses);
        PyBatch out{FormedBatch{}, layout};
        out.batch.ids.resize(batch_size);
        {
          py::gil_scoped_release release;
          const Nanoseconds start = now_ns();
          out.batch.lease = pool->acquire(layout->batch_bytes(batch_size));
          collate(*layout, sources, batch_size, out.batch.lease->data());
          out.batch.collate_ns = now_ns() - start;
        }
        return out;
      },
      py::arg("leaves"), py::arg("addresses"), py::arg("batch_size"), py::arg("pool"));
}
