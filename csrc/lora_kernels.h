// The torch side's helpers for the CUDA ops (cuda/ops.cpp): input-check macros and the dropout
// parameters made from an op's arguments. The kernels' side of the boundary (parameter blocks,
// the dtype dispatch, the launchers) is cuda/launch.h, which has no PyTorch header.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "cuda/launch.h"

// --------------------------------------------------------------------------- //
// Input checks
// --------------------------------------------------------------------------- //

#define LORA_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define LORA_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be ", (d), "-D, got shape ", (x).sizes())
#define LORA_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define LORA_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())
#define LORA_CHECK_SHAPE(x, ...)                                                             \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (", \
              at::IntArrayRef({__VA_ARGS__}), "), got ", (x).sizes())
#define LORA_CHECK_FLOAT(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16 ||             \
                  (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,            \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
// A CUDA tensor of the given rank, on ref's device.
#define LORA_CHECK_INPUT(x, d, ref) \
  LORA_CHECK_CUDA(x);               \
  LORA_CHECK_DIM(x, d);             \
  LORA_CHECK_SAME_DEVICE(x, ref)

namespace lora_kernels {

// --------------------------------------------------------------------------- //
// Dropout (the struct: launch.h)
// --------------------------------------------------------------------------- //

// The seed is a 0-dim int64 tensor: on x's device it is read by the kernels (nothing waits on the
// host, and a captured CUDA graph uses the seed each replay draws); on the CPU its value is read
// here and passed by value. Unused (and unchecked) at p = 0.
inline Dropout make_dropout(double p, const at::Tensor& seed, int64_t cols, const at::Tensor& x) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  Dropout d;
  d.enabled = p > 0.0;
  if (d.enabled) {
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
                "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " with ", seed.numel(),
                " elements");
    TORCH_CHECK(seed.device() == x.device() || seed.device().is_cpu(), "seed must be on x's device (",
                x.device(), ") or on the CPU, got ", seed.device());
    if (seed.device().is_cpu()) {
      d.seed.value = static_cast<uint64_t>(*seed.data_ptr<int64_t>());
    } else {
      d.seed.ptr = seed.data_ptr<int64_t>();
    }
  }
  // round(p * 2**24) with Python's round-half-to-even: nearbyint in the default rounding mode.
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  d.keep_scale = 1.0 / (1.0 - p);
  d.groups = (cols + 3) / 4;
  return d;
}

}  // namespace lora_kernels
