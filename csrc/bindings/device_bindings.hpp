#pragma once
// Python bindings of the device seam (device.hpp), the simulated device and the copy engine.

#include <pybind11/pybind11.h>

namespace dynbatch::bindings {

void bind_device(pybind11::module_ &m);

} // namespace dynbatch::bindings
