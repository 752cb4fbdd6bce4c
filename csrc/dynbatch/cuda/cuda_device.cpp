// The CUDA backend of the device seam: each call maps to one runtime API call (the gather to
// an upload of its pointer table and one kernel launch). Compiled only in CUDA builds.
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "dynbatch/cuda/gather_kernel.hpp"
#include "dynbatch/device.hpp"

namespace dynbatch::detail {
namespace {

std::string describe(cudaError_t error) {
  return std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error);
}

cudaStream_t native(StreamView stream) {
  return reinterpret_cast<cudaStream_t>(stream.value());
}

cudaEvent_t native(EventView event) {
  return reinterpret_cast<cudaEvent_t>(event.value());
}

class CudaDevice final : public Device {
public:
  CudaDevice(int index, std::string name) : index_(index), name_(std::move(name)) {}

  std::string name() const override { return name_; }

  void *allocate_pinned(std::size_t bytes) override {
    activate("cudaHostAlloc");
    void *pointer = nullptr;
    // Portable: a slot may feed a copy issued while another device is current.
    check(cudaHostAlloc(&pointer, bytes, cudaHostAllocPortable),
          "cudaHostAlloc(" + std::to_string(bytes) + " bytes)");
    return pointer;
  }

  void free_pinned(void *pointer) noexcept override {
    cudaFreeHost(pointer); // an error here (a context already gone at exit) leaks, nothing worse
  }

  void *allocate_device(std::size_t bytes, StreamView stream) override {
    activate("cudaMallocAsync");
    void *pointer = nullptr;
    check(cudaMallocAsync(&pointer, bytes, native(stream)),
          "cudaMallocAsync(" + std::to_string(bytes) + " bytes)");
    return pointer;
  }

  void free_device(void *pointer, StreamView stream) noexcept override {
    if (cudaSetDevice(index_) == cudaSuccess) {
      cudaFreeAsync(pointer, native(stream));
    }
  }

  StreamView create_stream() override {
    activate("cudaStreamCreateWithFlags");
    cudaStream_t stream = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return StreamView(reinterpret_cast<std::uintptr_t>(stream));
  }

  void destroy_stream(StreamView stream) noexcept override {
    cudaStreamDestroy(native(stream)); // pending work still completes
  }

  EventView create_event() override {
    activate("cudaEventCreateWithFlags");
    cudaEvent_t event = nullptr;
    // Blocking sync: a host thread waiting on a copy sleeps instead of spinning on a core.
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventBlockingSync),
          "cudaEventCreateWithFlags");
    return EventView(reinterpret_cast<std::uintptr_t>(event));
  }

  void destroy_event(EventView event) noexcept override { cudaEventDestroy(native(event)); }

  void copy_to_device(void *destination, const void *source, std::size_t bytes,
                      StreamView stream) override {
    activate("cudaMemcpyAsync");
    check(cudaMemcpyAsync(destination, source, bytes, cudaMemcpyHostToDevice, native(stream)),
          "cudaMemcpyAsync(" + std::to_string(bytes) + " bytes, host to device)");
  }

  void record_event(EventView event, StreamView stream) override {
    activate("cudaEventRecord");
    check(cudaEventRecord(native(event), native(stream)), "cudaEventRecord");
  }

  bool event_done(EventView event) override {
    const cudaError_t status = cudaEventQuery(native(event));
    if (status == cudaErrorNotReady) {
      cudaGetLastError(); // not an error: clear it so a later check does not see it
      return false;
    }
    check(status, "cudaEventQuery");
    return true;
  }

  void synchronize_event(EventView event) override {
    check(cudaEventSynchronize(native(event)), "cudaEventSynchronize");
  }

  void stream_wait_event(StreamView stream, EventView event) override {
    activate("cudaStreamWaitEvent");
    check(cudaStreamWaitEvent(native(stream), native(event), 0), "cudaStreamWaitEvent");
  }

protected:
  void enqueue_gather(const GatherLaunch &launch, StreamView stream) override {
    activate("gather");
    // The kernel reads the pointer table (and lengths) from device memory: upload them on the
    // same stream. A pageable source is staged before cudaMemcpyAsync returns, so the local
    // vector may go at once; the table is freed in stream order after the kernel.
    const std::size_t pointer_bytes = launch.sources.size() * sizeof(void *);
    const std::size_t length_bytes = launch.lengths.size() * sizeof(std::uint32_t);
    std::vector<unsigned char> table(pointer_bytes + length_bytes);
    std::memcpy(table.data(), launch.sources.data(), pointer_bytes);
    if (length_bytes > 0) {
      std::memcpy(table.data() + pointer_bytes, launch.lengths.data(), length_bytes);
    }
    void *device_table = allocate_device(table.size(), stream);
    try {
      check(cudaMemcpyAsync(device_table, table.data(), table.size(), cudaMemcpyHostToDevice,
                            native(stream)),
            "cudaMemcpyAsync(gather table)");
      GatherKernelParams params;
      params.shape = launch.shape;
      params.sources = static_cast<const void *const *>(device_table);
      params.lengths = length_bytes > 0
                           ? reinterpret_cast<const std::uint32_t *>(
                                 static_cast<unsigned char *>(device_table) + pointer_bytes)
                           : nullptr;
      params.destination = launch.destination;
      params.width = gather::vector_width(launch.shape.row_bytes, gather_address_bits(launch));
      std::memcpy(params.pad.bytes, launch.pad.data(), sizeof(params.pad.bytes));
      check(launch_gather(params, native(stream)), "gather kernel launch");
    } catch (...) {
      free_device(device_table, stream);
      throw;
    }
    free_device(device_table, stream);
  }

private:
  void check(cudaError_t error, const std::string &call) const {
    if (error != cudaSuccess) {
      throw DeviceError(name_ + ": " + call + " failed: " + describe(error));
    }
  }

  void activate(const char *call) const {
    check(cudaSetDevice(index_), std::string("cudaSetDevice before ") + call);
  }

  int index_;
  std::string name_;
};

} // namespace

std::shared_ptr<Device> make_cuda_backend(int index) {
  const std::string label = "cuda:" + std::to_string(index);
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();
    throw DeviceError(label + ": no usable CUDA driver or device (cudaGetDeviceCount failed: " +
                      describe(error) + ")");
  }
  if (index < 0 || index >= count) {
    throw DeviceError(label + ": no such device; this machine has " + std::to_string(count) +
                      " CUDA device(s)");
  }
  cudaDeviceProp properties{};
  const cudaError_t queried = cudaGetDeviceProperties(&properties, index);
  if (queried != cudaSuccess) {
    throw DeviceError(label + ": cudaGetDeviceProperties failed: " + describe(queried));
  }
  return std::make_shared<CudaDevice>(index, label + " (" + properties.name + ")");
}

} // namespace dynbatch::detail
