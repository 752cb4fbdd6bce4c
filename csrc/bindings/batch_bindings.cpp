#include "batch_bindings.hpp"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "dynbatch/dlpack_export.hpp"
#include "dynbatch/fork_guard.hpp"
#include "dynbatch/staging_pool.hpp"
#include "telemetry_bindings.hpp"

namespace py = pybind11;

namespace dynbatch::bindings {

namespace {

// A consumer waiting in the core wakes this often to let Python deliver Ctrl-C.
constexpr Nanoseconds signal_check_period_ns = 100'000'000;

Nanoseconds nanoseconds_of_ms(std::optional<double> ms, const char *name) {
  if (!ms) {
    return no_deadline;
  }
  if (!(*ms >= 0.0 && *ms <= 3.6e6)) {
    throw py::value_error(std::string(name) + " must be between 0 and 3600000 (an hour)");
  }
  return static_cast<Nanoseconds>(*ms * 1e6);
}

// The next formed batch (or expired ids), waiting with the GIL released and waking every
// signal_check_period_ns for Ctrl-C; nullopt at the end.
std::optional<PyBatch> next_formed(BatchFormer &former, Nanoseconds deadline) {
  {
    PyBatch ready{FormedBatch{}, former.layout()};
    if (former.try_next_batch(ready.batch) != NextStatus::timeout) {
      return ready; // already there: no GIL hand-off
    }
  }
  for (;;) {
    PyBatch out{FormedBatch{}, former.layout()};
    NextStatus status = NextStatus::timeout;
    {
      py::gil_scoped_release release;
      status = former.next_batch(out.batch, std::min(deadline, now_ns() + signal_check_period_ns));
    }
    if (status == NextStatus::batch || status == NextStatus::expired) {
      return out; // an expired-only result has size 0
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
}

} // namespace

const char *reason_name(ReleaseReason reason) {
  switch (reason) {
  case ReleaseReason::full:
    return "full";
  case ReleaseReason::max_delay:
    return "max_delay";
  case ReleaseReason::deadline:
    return "deadline";
  case ReleaseReason::drain:
    return "drain";
  }
  return "unknown";
}

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

BatchLayout make_layout(const std::vector<LeafSpec> &leaves) {
  std::vector<LeafLayout> layouts;
  layouts.reserve(leaves.size());
  for (const LeafSpec &spec : leaves) {
    if (spec.size() != 4 && spec.size() != 5) {
      throw py::value_error("a leaf is (shape, code, bits, lanes[, pad element bytes])");
    }
    const auto shape = spec[0].cast<std::vector<std::int64_t>>();
    const auto bits = spec[2].cast<int>();
    const auto lanes = spec[3].cast<int>();
    LeafLayout leaf;
    leaf.sample_shape = shape;
    leaf.dtype = {spec[1].cast<std::uint8_t>(), static_cast<std::uint8_t>(bits),
                  static_cast<std::uint16_t>(lanes)};
    leaf.padded = spec.size() == 5;
    if (leaf.padded) {
      const auto pad = spec[4].cast<std::string>(); // bytes
      leaf.pad_element.resize(pad.size());
      std::memcpy(leaf.pad_element.data(), pad.data(), pad.size());
    }
    std::size_t elements = 1;
    for (std::size_t dim = leaf.padded ? 1 : 0; dim < shape.size(); ++dim) {
      elements *= static_cast<std::size_t>(std::max<std::int64_t>(shape[dim], 0));
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

py::capsule PyBatch::leaf(std::size_t index) const {
  if (index >= layout->leaf_count()) {
    throw py::index_error("leaf " + std::to_string(index) + " out of range");
  }
  if (!batch.lease) {
    throw py::value_error("this batch was not collated by the core (collate=False)");
  }
  dlpack::DLManagedTensor *tensor =
      export_leaf(batch.lease, *layout, index, batch.ids.size(), batch.padded_length);
  // Unconsumed capsules free their tensor; torch renames consumed ones to "used_dltensor".
  return py::capsule(tensor, "dltensor", [](PyObject *capsule) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto *owned =
          static_cast<dlpack::DLManagedTensor *>(PyCapsule_GetPointer(capsule, "dltensor"));
      owned->deleter(owned);
    }
  });
}

void bind_former(py::module_ &m) {
  py::class_<PyBatch>(m, "Batch")
      .def_property_readonly("sequence", [](const PyBatch &self) { return self.batch.sequence; })
      .def_property_readonly("size", [](const PyBatch &self) { return self.batch.ids.size(); })
      .def_property_readonly("ids", [](const PyBatch &self) { return self.batch.ids; })
      .def_property_readonly(
          "first_id",
          [](const PyBatch &self) { return self.batch.ids.empty() ? 0 : self.batch.ids.front(); })
      .def_property_readonly("target", [](const PyBatch &self) { return self.batch.target; })
      .def_property_readonly("collate_ns",
                             [](const PyBatch &self) { return self.batch.collate_ns; })
      .def_property_readonly("reason",
                             [](const PyBatch &self) { return reason_name(self.batch.reason); })
      .def_property_readonly("expired", [](const PyBatch &self) { return self.batch.expired_ids; })
      .def_property_readonly("released_ns",
                             [](const PyBatch &self) { return self.batch.released_ns; })
      .def_property_readonly("lengths", [](const PyBatch &self) { return self.batch.lengths; })
      .def_property_readonly("padded_length",
                             [](const PyBatch &self) { return self.batch.padded_length; })
      .def("leaf", &PyBatch::leaf, py::arg("index"));

  py::class_<BatchFormer, std::shared_ptr<BatchFormer>>(m, "BatchFormer")
      .def(
          py::init([](const std::vector<LeafSpec> &leaves, std::size_t capacity,
                      std::size_t prefetch_depth, std::shared_ptr<StagingPool> pool,
                      std::shared_ptr<SizingPolicy> policy, const PyTelemetry &telemetry,
                      std::shared_ptr<StatsRecorder> stats, std::optional<double> max_delay_ms,
                      double aging_ms, std::size_t pad_to_multiple_of, std::size_t max_tokens,
                      std::size_t bucket_window, bool group_queued, bool collate, bool own_thread) {
            if (!telemetry.sampler) {
              throw py::value_error("telemetry was closed");
            }
            if (!(aging_ms > 0.0)) {
              throw py::value_error("aging_ms must be positive");
            }
            FormerOptions options;
            options.capacity = capacity;
            options.prefetch_depth = prefetch_depth;
            options.max_delay_ns = nanoseconds_of_ms(max_delay_ms, "max_delay_ms");
            options.aging_ns = std::max<Nanoseconds>(nanoseconds_of_ms(aging_ms, "aging_ms"), 1);
            options.pad_to_multiple_of = pad_to_multiple_of;
            options.max_tokens = max_tokens;
            options.bucket_window = bucket_window;
            options.group_queued = group_queued;
            options.collate = collate;
            options.own_thread = own_thread;
            return make_fork_safe_shared<BatchFormer>(make_layout(leaves), options, std::move(pool),
                                                      std::move(policy), telemetry.sampler,
                                                      std::move(stats));
          }),
          py::arg("leaves"), py::arg("capacity"), py::arg("prefetch_depth"), py::arg("pool"),
          py::arg("policy"), py::arg("telemetry"), py::arg("stats"),
          py::arg("max_delay_ms") = py::none(), py::arg("aging_ms") = 100.0,
          py::arg("pad_to_multiple_of") = 1, py::arg("max_tokens") = 0,
          py::arg("bucket_window") = 0, py::arg("group_queued") = false, py::arg("collate") = true,
          py::arg("own_thread") = true)
      .def(
          "push",
          [](BatchFormer &former, std::uint64_t first_id, std::size_t count,
             const std::vector<std::uintptr_t> &addresses,
             const std::vector<std::uint32_t> &lengths) {
            std::vector<std::uint64_t> ids(count);
            for (std::size_t i = 0; i < ids.size(); ++i) {
              ids[i] = first_id + i;
            }
            const std::vector<const void *> sources = as_pointers(addresses);
            if (lengths.empty()) {
              return former.push(ids, sources); // never blocks: no GIL release on the hot path
            }
            if (lengths.size() != count) {
              throw py::value_error("push: one length per request");
            }
            std::vector<RequestOptions> options(count);
            for (std::size_t i = 0; i < count; ++i) {
              options[i].length = lengths[i];
            }
            return former.push(ids, sources, options);
          },
          py::arg("first_id"), py::arg("count"), py::arg("addresses"),
          py::arg("lengths") = std::vector<std::uint32_t>{})
      .def(
          "submit",
          // The per-request call of the serving path: one id, never blocks, keeps the GIL.
          [](BatchFormer &former, std::uint64_t id, const std::vector<std::uintptr_t> &addresses,
             std::int32_t priority, Nanoseconds timeout_ns, std::uint32_t length) {
            const std::vector<const void *> sources = as_pointers(addresses);
            const RequestOptions options{priority, timeout_ns < 0 ? no_deadline : timeout_ns,
                                         length};
            return former.push(std::span(&id, 1), sources, std::span(&options, 1)) == 1;
          },
          py::arg("id"), py::arg("addresses"), py::arg("priority") = 0, py::arg("timeout_ns") = -1,
          py::arg("length") = 0)
      .def(
          "submit_one",
          // submit() for a sample with one leaf: no list to build or convert.
          [](BatchFormer &former, std::uint64_t id, std::uintptr_t address, std::int32_t priority,
             Nanoseconds timeout_ns) {
            const void *source = reinterpret_cast<const void *>(address);
            const RequestOptions options{priority, timeout_ns < 0 ? no_deadline : timeout_ns};
            return former.push(std::span(&id, 1), std::span(&source, 1), std::span(&options, 1)) ==
                   1;
          },
          py::arg("id"), py::arg("address"), py::arg("priority") = 0, py::arg("timeout_ns") = -1)
      .def(
          "submit_many",
          [](BatchFormer &former, const std::vector<std::uint64_t> &ids,
             const std::vector<std::uintptr_t> &addresses, std::int32_t priority,
             Nanoseconds timeout_ns, const std::vector<std::uint32_t> &lengths) {
            if (!lengths.empty() && lengths.size() != ids.size()) {
              throw py::value_error("submit_many: one length per request");
            }
            const std::vector<const void *> sources = as_pointers(addresses);
            std::vector<RequestOptions> options(
                ids.size(), RequestOptions{priority, timeout_ns < 0 ? no_deadline : timeout_ns});
            for (std::size_t i = 0; i < lengths.size(); ++i) {
              options[i].length = lengths[i];
            }
            return former.push(ids, sources, options);
          },
          py::arg("ids"), py::arg("addresses"), py::arg("priority") = 0, py::arg("timeout_ns") = -1,
          py::arg("lengths") = std::vector<std::uint32_t>{})
      .def(
          "wait_for_room",
          [](BatchFormer &former, std::optional<double> timeout_s) {
            const Nanoseconds deadline = deadline_after(timeout_s);
            py::gil_scoped_release release; // only when the queue is full: not the hot path
            return former.wait_for_room(deadline);
          },
          py::arg("timeout_s") = py::none())
      .def("close_input", &BatchFormer::close_input)
      .def(
          "next_batch",
          [](BatchFormer &former, std::optional<double> timeout_s) -> std::optional<PyBatch> {
            return next_formed(former, deadline_after(timeout_s));
          },
          py::arg("timeout_s") = py::none())
      .def(
          "next_plan",
          // The per-batch call of a consumer that stacks lone small tensors itself: the last
          // batch's feedback (batch_size 0: none), the samples read since (first_id ..
          // first_id + count - 1; input_done: no more), and the next batch, in one call rather
          // than four, positional (keywords cost ~0.5 us a call to parse).
          [](BatchFormer &former, std::uint64_t sequence, std::size_t batch_size,
             Nanoseconds compute_ns, Nanoseconds collate_ns, std::uint64_t peak_memory_bytes,
             std::uint64_t reclaimable_bytes, std::uint64_t first_id, std::size_t count,
             bool input_done) {
            if (batch_size > 0) {
              BatchFeedback feedback;
              feedback.batch_size = batch_size;
              feedback.compute_ns = compute_ns;
              feedback.collate_ns = collate_ns;
              feedback.peak_memory_bytes = peak_memory_bytes;
              feedback.reclaimable_bytes = reclaimable_bytes;
              former.report_feedback(sequence, feedback);
            }
            std::size_t accepted = 0;
            if (count > 0) {
              std::vector<std::uint64_t> ids(count);
              for (std::size_t i = 0; i < count; ++i) {
                ids[i] = first_id + i;
              }
              accepted = former.push(ids, {});
            }
            if (input_done) {
              former.close_input();
            }
            std::optional<std::tuple<std::uint64_t, std::size_t, std::uint64_t, std::size_t>> plan;
            if (accepted == count) { // else the caller reports the refusal
              if (const std::optional<PyBatch> next = next_formed(former, no_deadline)) {
                const FormedBatch &batch = next->batch;
                plan.emplace(batch.ids.empty() ? 0 : batch.ids.front(), batch.ids.size(),
                             batch.sequence, batch.target);
              }
            }
            return std::pair(accepted, plan);
          },
          py::arg("sequence"), py::arg("batch_size"), py::arg("compute_ns"), py::arg("collate_ns"),
          py::arg("peak_memory_bytes"), py::arg("reclaimable_bytes"), py::arg("first_id"),
          py::arg("count"), py::arg("input_done"))
      .def(
          "wait_late",
          [](BatchFormer &former, std::optional<double> timeout_s)
              -> std::optional<std::pair<std::vector<std::uint64_t>, std::vector<std::uint64_t>>> {
            const Nanoseconds deadline = deadline_after(timeout_s);
            std::vector<std::uint64_t> expired;
            std::vector<std::uint64_t> late;
            NextStatus status = NextStatus::timeout;
            {
              py::gil_scoped_release release; // a watcher thread, woken only at deadlines
              status = former.wait_late(expired, late, deadline);
            }
            if (status == NextStatus::finished) {
              return std::nullopt;
            }
            return std::pair(std::move(expired), std::move(late));
          },
          py::arg("timeout_s") = py::none())
      .def("report_feedback", &BatchFormer::report_feedback, py::arg("sequence"),
           py::arg("feedback"))
      .def("report_dispatch", &BatchFormer::report_dispatch, py::arg("released_ns"))
      .def_property_readonly("bucket", &BatchFormer::bucket)
      .def_property_readonly("sample_bytes", &BatchFormer::sample_bytes)
      .def("close",
           [](BatchFormer &former) {
             py::gil_scoped_release release;
             former.close();
           })
      .def_property_readonly("capacity", &BatchFormer::capacity)
      .def_property_readonly("queued", &BatchFormer::queued)
      .def_property_readonly("backlog", &BatchFormer::backlog);
}

} // namespace dynbatch::bindings
