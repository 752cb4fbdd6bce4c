#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>

#include "batch_bindings.hpp"
#include "dynbatch/device_scheduler.hpp"
#include "dynbatch/fork_guard.hpp"
#include "telemetry_bindings.hpp"

namespace py = pybind11;

namespace dynbatch::bindings {

namespace {

// A worker waiting for its turn wakes this often to let Python deliver Ctrl-C.
constexpr Nanoseconds signal_check_period_ns = 100'000'000;

} // namespace

void bind_scheduler(py::module_ &m) {
  m.def("now_ns", &now_ns, "The core's clock (steady, nanoseconds).");
  py::class_<DeviceScheduler, std::shared_ptr<DeviceScheduler>>(m, "DeviceScheduler")
      .def(py::init([](std::size_t concurrency, double aging_ms, double margin_fraction,
                       const PyTelemetry &telemetry, double max_hold_ms) {
             if (!telemetry.sampler) {
               throw py::value_error("telemetry was closed");
             }
             if (!(aging_ms > 0.0 && aging_ms <= 3.6e6)) {
               throw py::value_error("aging_ms must be in (0, 3600000]");
             }
             if (!(max_hold_ms >= 0.0 && max_hold_ms <= 3.6e6)) {
               throw py::value_error("max_hold_ms must be in [0, 3600000]");
             }
             SchedulerOptions options;
             options.concurrency = concurrency;
             options.aging_ns = std::max<Nanoseconds>(static_cast<Nanoseconds>(aging_ms * 1e6), 1);
             options.margin_fraction = margin_fraction;
             options.max_hold_ns = static_cast<Nanoseconds>(max_hold_ms * 1e6);
             return make_fork_safe_shared<DeviceScheduler>(options, telemetry.sampler);
           }),
           py::arg("concurrency"), py::arg("aging_ms"), py::arg("margin_fraction"),
           py::arg("telemetry"), py::arg("max_hold_ms") = 50.0)
      .def_readonly_static("exclusive", &DeviceScheduler::exclusive)
      .def(
          "try_acquire", // once per batch, never blocks: keeps the GIL
          [](DeviceScheduler &scheduler, std::uint64_t task, std::int32_t priority,
             std::uint64_t reservation_bytes) {
            return scheduler.try_acquire(GrantRequest{task, priority, reservation_bytes});
          },
          py::arg("task"), py::arg("priority"), py::arg("reservation_bytes"))
      .def(
          "acquire",
          [](DeviceScheduler &scheduler, std::uint64_t task, std::int32_t priority,
             std::uint64_t reservation_bytes, std::optional<double> timeout_s,
             std::optional<Nanoseconds> since_ns) {
            const GrantRequest request{task, priority, reservation_bytes};
            const Nanoseconds deadline = deadline_after(timeout_s);
            // Waiting in slices (for Ctrl-C) must not reset the batch's age: it ranks it.
            const Nanoseconds since = since_ns.value_or(now_ns());
            for (;;) {
              bool granted = false;
              {
                py::gil_scoped_release release;
                granted = scheduler.acquire_until(
                    request, std::min(deadline, now_ns() + signal_check_period_ns), since);
              }
              if (granted || now_ns() >= deadline || scheduler.closed()) {
                return granted;
              }
              if (PyErr_CheckSignals() != 0) {
                throw py::error_already_set();
              }
            }
          },
          py::arg("task"), py::arg("priority"), py::arg("reservation_bytes"),
          py::arg("timeout_s") = py::none(), py::arg("since_ns") = py::none())
      .def(
          "release",
          [](DeviceScheduler &scheduler, std::uint64_t task, std::int32_t priority,
             std::uint64_t reservation_bytes, bool more_queued) {
            scheduler.release(GrantRequest{task, priority, reservation_bytes}, more_queued);
          },
          py::arg("task"), py::arg("priority"), py::arg("reservation_bytes"),
          py::arg("more_queued") = false)
      .def("close", &DeviceScheduler::close)
      .def("state", [](const DeviceScheduler &scheduler) {
        const SchedulerState state = scheduler.state();
        py::dict out;
        out["running"] = state.running;
        out["waiting"] = state.waiting;
        out["reserved_bytes"] = state.reserved_bytes;
        out["budget_bytes"] = state.budget_bytes;
        out["grants"] = state.grants;
        out["waited_grants"] = state.waited_grants;
        out["holds"] = state.holds;
        out["holding"] = state.holding;
        out["grants_by_task"] = state.grants_by_task;
        return out;
      });
}

} // namespace dynbatch::bindings
