// Per-device, once-per-process host work (kernel attributes, device properties): the first
// call on a device runs it, every later call on that device skips it.
#pragma once

#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <array>
#include <mutex>

namespace lora_kernels {

constexpr int kMaxDevices = 64;

// static PerDeviceOnce once;  once([&] { ... });   (on the current device)
class PerDeviceOnce {
 public:
  template <typename Fn>
  void operator()(Fn&& fn) {
    const int device = c10::cuda::current_device();
    TORCH_CHECK(device >= 0 && device < kMaxDevices, "lora_kernels: device index ", device, " out of range");
    std::call_once(flags_[device], std::forward<Fn>(fn));
  }

 private:
  std::array<std::once_flag, kMaxDevices> flags_;
};

}  // namespace lora_kernels
