// Per-device, once-per-process host work (kernel attributes, device properties): on each device,
// the first call that succeeds runs it, every later call there skips it. No PyTorch header, so
// that the kernels' translation units can use it (launch.h).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <mutex>

namespace lora_kernels {

constexpr int kMaxDevices = 64;

// static PerDeviceOnce once;  cudaError_t err = once([&] { ...; return cudaSuccess; });  (on the current device)
// A call whose fn returns an error (or throws) leaves the device to the next call, as std::call_once
// does for an exception. The ops refuse devices beyond kMaxDevices before they launch (ops.cpp).
class PerDeviceOnce {
 public:
  template <typename Fn>
  cudaError_t operator()(Fn&& fn) {
    int device = 0;
    const cudaError_t got = cudaGetDevice(&device);
    if (got != cudaSuccess) return got;
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    if (done_[device].load(std::memory_order_acquire)) return cudaSuccess;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (done_[device].load(std::memory_order_relaxed)) return cudaSuccess;
    const cudaError_t err = fn();
    if (err == cudaSuccess) done_[device].store(true, std::memory_order_release);
    return err;
  }

 private:
  std::array<std::atomic<bool>, kMaxDevices> done_{};
  std::mutex mutex_;
};

}  // namespace lora_kernels
