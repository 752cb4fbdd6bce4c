// dynbatch._core: argument conversion and GIL release only; the logic lives in csrc/dynbatch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "batch_bindings.hpp"
#include "device_bindings.hpp"
#include "dynbatch/batch_former.hpp"
#include "dynbatch/blocking_queue.hpp"
#include "dynbatch/build_info.hpp"
#include "dynbatch/collator.hpp"
#include "dynbatch/device.hpp"
#include "dynbatch/dlpack_export.hpp"
#include "dynbatch/fork_guard.hpp"
#include "dynbatch/memory_release.hpp"
#include "dynbatch/sizing_controller.hpp"
#include "dynbatch/sizing_policy.hpp"
#include "dynbatch/staging_pool.hpp"
#include "dynbatch/stats.hpp"
#include "dynbatch/telemetry.hpp"
#include "telemetry_bindings.hpp"

namespace py = pybind11;
using namespace dynbatch;
using dynbatch::bindings::as_pointers;
using dynbatch::bindings::bind_device;
using dynbatch::bindings::bind_former;
using dynbatch::bindings::bind_scheduler;
using dynbatch::bindings::bind_telemetry;
using dynbatch::bindings::deadline_after;
using dynbatch::bindings::LeafSpec;
using dynbatch::bindings::make_layout;
using dynbatch::bindings::PyBatch;
using dynbatch::bindings::PyTelemetry;
using dynbatch::bindings::reason_name;

namespace {

py::dict state_to_dict(const SizingState &state) {
  py::dict out;
  out["target"] = state.target;
  out["token_budget"] = state.token_budget;
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

// LearnedState as plain data (JSON-able): {"buckets": [{"key", "latency": [[x, y, n], ..],
// "memory": [..]}], "oom_ceiling", "failed_size", "longest"}; n, the measurements behind a
// point, may be left out (1: profiles written before it was kept).
py::dict learned_to_dict(const LearnedState &learned) {
  const auto points = [](const std::vector<LinearFit::Summary> &line) {
    py::list out;
    for (const LinearFit::Summary &point : line) {
      out.append(py::make_tuple(point.x, point.y, point.count));
    }
    return out;
  };
  py::list buckets;
  for (const LearnedState::Bucket &bucket : learned.buckets) {
    py::dict entry;
    entry["key"] = bucket.key;
    entry["latency"] = points(bucket.latency);
    entry["memory"] = points(bucket.memory);
    buckets.append(entry);
  }
  py::dict out;
  out["buckets"] = buckets;
  out["oom_ceiling"] = learned.oom_ceiling;
  out["failed_size"] = learned.failed_size;
  out["longest"] = learned.longest;
  return out;
}

LearnedState learned_from_dict(const py::dict &in) {
  const auto points = [](const py::handle &line) {
    std::vector<LinearFit::Summary> out;
    for (const py::handle &point : line) {
      const auto values = point.cast<std::vector<double>>();
      if (values.size() != 2 && values.size() != 3) {
        throw py::value_error("learned state: a point must be [size, value, measurements]");
      }
      const double count = values.size() == 3 ? values[2] : 1.0;
      if (!(count >= 1.0 && count <= 1e6) || count != std::floor(count)) {
        throw py::value_error(
            "learned state: a point's measurements must be a whole number from 1 to 1000000");
      }
      out.push_back({values[0], values[1], static_cast<std::size_t>(count)});
    }
    return out;
  };
  LearnedState learned;
  for (const py::handle &bucket : in["buckets"]) {
    learned.buckets.push_back(
        {bucket["key"].cast<std::uint64_t>(), points(bucket["latency"]), points(bucket["memory"])});
  }
  learned.oom_ceiling = in["oom_ceiling"].cast<std::size_t>();
  learned.failed_size = in["failed_size"].cast<std::size_t>();
  learned.longest = in["longest"].cast<std::size_t>();
  return learned;
}

// Prometheus-style cumulative buckets at every power of two from ~1 us to ~69 s (exact: octave
// edges are bucket edges), with the count and the sum.
py::dict histogram_buckets(const LatencyHistogram &histogram) {
  constexpr std::size_t first_exponent = 10;
  constexpr std::size_t last_exponent = 36;
  py::list buckets;
  for (std::size_t exponent = first_exponent; exponent <= last_exponent; ++exponent) {
    buckets.append(
        py::make_tuple(std::uint64_t{1} << exponent, histogram.count_below_power_of_two(exponent)));
  }
  py::dict out;
  out["buckets"] = buckets; // (upper edge ns, values below it)
  out["count"] = histogram.total();
  out["sum_ns"] = histogram.sum();
  return out;
}

} // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dynbatch's compiled core (private: use the dynbatch package)";
  m.attr("__version__") = DYNBATCH_VERSION; // without the device probe build_info() runs

  watch_forks();
  py::register_exception<ForkedError>(m, "ForkedError", PyExc_RuntimeError);
  m.def("fork_generation", &fork_generation,
        "0 in the process that loaded the core; one more in each forked child.");
  m.def(
      "release_cached_memory",
      [] {
        py::gil_scoped_release release;
        release_cached_memory();
      },
      "Returns the free memory malloc keeps cached in its arenas to the OS (glibc).");

  m.def(
      "attributes_are",
      // A check once per batch in one call: ~50 ns an object here, against ~75 ns for a
      // Python set of the attributes (the stacking path's dtype check, where torch would cast).
      [](const py::sequence &objects, const py::str &name, const py::handle &value) {
        const py::object items = py::reinterpret_steal<py::object>(
            PySequence_Fast(objects.ptr(), "attributes_are: objects must be a sequence"));
        if (!items) {
          throw py::error_already_set();
        }
        PyObject **begin = PySequence_Fast_ITEMS(items.ptr()); // a list or tuple: no copy
        const Py_ssize_t count = PySequence_Fast_GET_SIZE(items.ptr());
        for (Py_ssize_t i = 0; i < count; ++i) {
          PyObject *attribute = PyObject_GetAttr(begin[i], name.ptr());
          if (attribute == nullptr) {
            PyErr_Clear(); // an object without the attribute simply fails the check
            return false;
          }
          const bool same = attribute == value.ptr();
          Py_DECREF(attribute);
          if (!same) {
            return false;
          }
        }
        return true;
      },
      py::arg("objects"), py::arg("name"), py::arg("value"),
      "Whether getattr(o, name) is value for every o in objects (identity; an object "
      "without the attribute fails).");
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

  bind_device(m);

  py::class_<StagingPool, std::shared_ptr<StagingPool>>(m, "StagingPool")
      .def(py::init([](std::size_t slots, std::shared_ptr<Device> device) {
             return StagingPool::create(slots, std::move(device));
           }),
           py::arg("slots"), py::arg("device") = nullptr)
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
        out["pinned_bytes"] = stats.pinned_bytes;
        out["pinned_fallbacks"] = stats.pinned_fallbacks;
        out["pinned_error"] = stats.pinned_error;
        return out;
      });

  py::class_<BatchFeedback>(m, "BatchFeedback")
      .def(py::init([](std::size_t batch_size, Nanoseconds compute_ns, Nanoseconds collate_ns,
                       std::uint64_t peak_memory_bytes, std::uint64_t reclaimable_bytes,
                       bool out_of_memory, std::uint64_t bucket, std::size_t tokens) {
             return BatchFeedback{bucket,
                                  batch_size,
                                  tokens,
                                  compute_ns,
                                  collate_ns,
                                  peak_memory_bytes,
                                  reclaimable_bytes,
                                  out_of_memory};
           }),
           py::arg("batch_size"), py::arg("compute_ns") = 0, py::arg("collate_ns") = 0,
           py::arg("peak_memory_bytes") = 0, py::arg("reclaimable_bytes") = 0,
           py::arg("out_of_memory") = false, py::arg("bucket") = 0, py::arg("tokens") = 0);

  py::class_<SizingPolicy, std::shared_ptr<SizingPolicy>>(m, "SizingPolicy")
      .def(
          "next_batch_size",
          [](SizingPolicy &policy, std::size_t queued, std::size_t bytes_per_sample,
             std::uint64_t memory_available_bytes, std::uint64_t memory_total_bytes,
             double utilization, std::uint64_t bucket, std::size_t longest) {
            SizingInputs inputs;
            inputs.bucket = bucket;
            inputs.queued = queued;
            inputs.bytes_per_sample = bytes_per_sample;
            inputs.longest = longest;
            inputs.telemetry.memory_available_bytes = memory_available_bytes;
            inputs.telemetry.memory_total_bytes = memory_total_bytes;
            inputs.telemetry.utilization = utilization;
            return policy.next_batch_size(inputs);
          },
          py::arg("queued"), py::arg("bytes_per_sample"), py::arg("memory_available_bytes"),
          py::arg("memory_total_bytes") = 0, py::arg("utilization") = 0.0, py::arg("bucket") = 0,
          py::arg("longest") = 0)
      .def("on_feedback", &SizingPolicy::on_feedback, py::arg("feedback"))
      .def("padding_allowance", &SizingPolicy::padding_allowance)
      .def("state", [](const SizingPolicy &policy) { return state_to_dict(policy.state()); });

  py::class_<SizingController, SizingPolicy, std::shared_ptr<SizingController>>(m,
                                                                                "SizingController")
      .def(py::init([](std::size_t min_batch_size, std::size_t max_batch_size,
                       std::optional<double> latency_slo_ms, double knee_tolerance,
                       double memory_margin_fraction, double staged_memory_fraction,
                       double utilization_target, std::size_t history, std::size_t probe_after,
                       double probe_step, bool tokens) {
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
             options.tokens = tokens;
             return std::make_shared<SizingController>(options);
           }),
           py::arg("min_batch_size"), py::arg("max_batch_size"),
           py::arg("latency_slo_ms") = py::none(), py::arg("knee_tolerance") = 0.05,
           py::arg("memory_margin_fraction") = 0.05, py::arg("staged_memory_fraction") = 0.25,
           py::arg("utilization_target") = 0.0, py::arg("history") = 64,
           py::arg("probe_after") = 16, py::arg("probe_step") = 0.1, py::arg("tokens") = false)
      .def("export_state",
           [](const SizingController &controller) {
             return learned_to_dict(controller.export_state());
           })
      .def(
          "import_state",
          [](SizingController &controller, const py::dict &learned) {
            controller.import_state(learned_from_dict(learned));
          },
          py::arg("learned"));

  py::class_<StatsRecorder, std::shared_ptr<StatsRecorder>>(m, "StatsRecorder")
      .def(py::init<std::size_t>(), py::arg("ring_capacity") = 4096)
      .def("reset", &StatsRecorder::reset)
      .def("snapshot",
           [](const StatsRecorder &recorder) {
             const StatsSnapshot snapshot = recorder.snapshot();
             py::dict out;
             out["batches"] = snapshot.batches;
             out["samples"] = snapshot.samples;
             out["collate_ns"] = snapshot.collate_ns;
             out["compute_ns"] = snapshot.compute_ns;
             out["active_ns"] = snapshot.active_ns;
             out["real_rows"] = snapshot.real_rows;
             out["padded_rows"] = snapshot.padded_rows;
             out["histogram"] = snapshot.histogram;
             py::list recent;
             for (const BatchRecord &record : snapshot.recent) {
               recent.append(py::make_tuple(record.sequence, record.batch_size, record.target,
                                            record.first_enqueue_ns, record.formed_ns,
                                            record.delivered_ns, record.collate_ns,
                                            record.compute_ns, record.memory_available_bytes));
             }
             out["recent"] = recent;
             py::dict released_by;
             for (std::size_t reason = 0; reason < release_reason_count; ++reason) {
               released_by[reason_name(static_cast<ReleaseReason>(reason))] =
                   snapshot.released_by[reason];
             }
             out["released_by"] = released_by;
             py::dict priorities;
             for (const auto &[priority, stats] : snapshot.priorities) {
               py::dict entry;
               entry["dispatched"] = stats.dispatched;
               entry["timed_out"] = stats.timed_out;
               entry["cancelled"] = stats.cancelled;
               entry["failed"] = stats.failed;
               entry["queue_wait_p50_ns"] = stats.queue_wait.percentile(0.5);
               entry["queue_wait_p99_ns"] = stats.queue_wait.percentile(0.99);
               entry["queue_wait"] = histogram_buckets(stats.queue_wait);
               priorities[py::int_(priority)] = entry;
             }
             out["priorities"] = priorities;
             out["compute_time"] = histogram_buckets(snapshot.compute_time);
             return out;
           })
      .def(
          "record_outcome",
          [](StatsRecorder &recorder, std::int32_t priority, const std::string &outcome,
             std::uint64_t count) {
            if (outcome == "timed_out") {
              recorder.record_outcome(priority, RequestOutcome::timed_out, count);
            } else if (outcome == "cancelled") {
              recorder.record_outcome(priority, RequestOutcome::cancelled, count);
            } else if (outcome == "failed") {
              recorder.record_outcome(priority, RequestOutcome::failed, count);
            } else {
              throw py::value_error("outcome must be timed_out, cancelled or failed, got " +
                                    outcome);
            }
          },
          py::arg("priority"), py::arg("outcome"), py::arg("count") = 1);

  bind_former(m);
  bind_scheduler(m);

  m.def(
      "collate",
      [](const std::vector<LeafSpec> &leaves, const std::vector<std::uintptr_t> &addresses,
         std::size_t batch_size, std::shared_ptr<StagingPool> pool,
         const std::vector<std::uint32_t> &lengths, std::size_t pad_to_multiple_of) {
        auto layout = std::make_shared<const BatchLayout>(make_layout(leaves));
        const std::vector<const void *> sources = as_pointers(addresses);
        PyBatch out{FormedBatch{}, layout};
        out.batch.ids.resize(batch_size);
        for (std::size_t i = 0; i < batch_size; ++i) {
          out.batch.ids[i] = i;
        }
        if (layout->has_padded_leaves()) {
          if (lengths.size() != batch_size || pad_to_multiple_of < 1) {
            throw py::value_error("collate: padded leaves need one length per sample");
          }
          const std::size_t longest =
              lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
          out.batch.lengths = lengths;
          out.batch.padded_length =
              (longest + pad_to_multiple_of - 1) / pad_to_multiple_of * pad_to_multiple_of;
        }
        {
          py::gil_scoped_release release;
          const Nanoseconds start = now_ns();
          out.batch.lease = pool->acquire(layout->batch_bytes(batch_size, out.batch.padded_length));
          collate(*layout, sources, batch_size, out.batch.lease->data(), out.batch.lengths,
                  out.batch.padded_length, &CopyWorkers::shared());
          out.batch.collate_ns = now_ns() - start;
        }
        return out;
      },
      py::arg("leaves"), py::arg("addresses"), py::arg("batch_size"), py::arg("pool"),
      py::arg("lengths") = std::vector<std::uint32_t>{}, py::arg("pad_to_multiple_of") = 1);
}
