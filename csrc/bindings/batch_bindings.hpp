#pragma once
// Python bindings of batches and the batch former, and the conversions they share with the
// module (leaf descriptors, addresses, timeouts).

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "dynbatch/batch_former.hpp"
#include "dynbatch/collator.hpp"

namespace dynbatch::bindings {

// (shape, DLPack code, bits, lanes) for a stacked leaf; a padded leaf adds the bytes of one
// pad element, and its shape starts with -1.
using LeafSpec = pybind11::tuple;

BatchLayout make_layout(const std::vector<LeafSpec> &leaves);
std::vector<const void *> as_pointers(const std::vector<std::uintptr_t> &addresses);
const char *reason_name(ReleaseReason reason);
// now + timeout_s on the core's clock; no_deadline for None or infinity.
Nanoseconds deadline_after(std::optional<double> timeout_s);

// A formed batch on its way to Python: owns the slot until every exported leaf is gone.
struct PyBatch {
  FormedBatch batch;
  std::shared_ptr<const BatchLayout> layout;

  pybind11::capsule leaf(std::size_t index) const;
};

void bind_former(pybind11::module_ &m);
void bind_scheduler(pybind11::module_ &m);

} // namespace dynbatch::bindings
