// The dropout keep-mask on the CPU: one C++ loop over Philox counters, bit for bit
// lora_kernels/reference.py (dropout_keep_mask). The reference path uses it when the
// extension is built (with or without its CUDA kernels: this file needs only the C++
// compiler); otherwise it computes the same mask with PyTorch integer ops.
//
//   words      = philox4x32_10(seed, row · ⌈cols/4⌉ + ⌊col/4⌋)     four words, four columns
//   keep[r, c] = (words[c mod 4] >> 8) >= round(p · 2²⁴)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace lora_kernels {
namespace {

// Philox-4x32-10 of counter (counter mod 2³², counter >> 32, 0, 0) under key
// (seed mod 2³², seed >> 32): the host branch of cuda/common.cuh's philox4x32_10.
inline void philox4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t prod_b = static_cast<uint64_t>(c2) * 0xCD9E8D57u;
    const uint64_t prod_a = static_cast<uint64_t>(c0) * 0xD2511F53u;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(prod_b);
    c2 = n2;
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// reference.dropout_threshold: round(p · 2²⁴), halves to even as Python's round().
uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::nearbyint(p * static_cast<double>(1 << 24)));
}

// (rows, cols) contiguous bool mask; `seed` is a 0-dim int64 CPU tensor (as the CUDA ops take it).
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, const at::Tensor& seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "dropout_keep_mask: rows and cols must be >= 0, got ", rows, " and ", cols);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout_keep_mask: dropout probability p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "dropout_keep_mask: seed must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  auto keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  if (rows == 0 || cols == 0) return keep;
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t groups = (cols + 3) / 4;
  const int64_t full = cols / 4;  // groups whose four columns all exist
  bool* out = keep.data_ptr<bool>();
  // NOTE: a grain of ~4096 Philox calls (~0.1 ms) per task: smaller masks run on the calling thread.
  const int64_t grain_rows = std::max<int64_t>(1, 4096 / groups);
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    uint32_t words[4];
    for (int64_t row = begin; row < end; ++row) {
      bool* out_row = out + row * cols;
      const uint64_t first = static_cast<uint64_t>(row) * static_cast<uint64_t>(groups);
      for (int64_t g = 0; g < full; ++g) {
        philox4x32_10(key, first + static_cast<uint64_t>(g), words);
        for (int j = 0; j < 4; ++j) out_row[4 * g + j] = (words[j] >> 8) >= threshold;
      }
      if (full < groups) {  // the last, partial group: cols mod 4 columns
        philox4x32_10(key, first + static_cast<uint64_t>(full), words);
        for (int64_t j = 0; j < cols - 4 * full; ++j) out_row[4 * full + j] = (words[j] >> 8) >= threshold;
      }
    }
  });
  return keep;
}

// x ⊙ D = x · keep · 1/(1−p) in x's dtype, bit for bit reference.dropout_scale (x.mul(keep).mul_(1/(1−p))):
// the product is taken in PyTorch's opmath type (float for half and bfloat16), and a dropped NaN or
// infinity stays NaN as x · 0 does. One pass: the mask is never stored.
at::Tensor dropout_scale_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, "dropout_scale: x must be 2-D, got shape ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_scale: dropout probability p must be in [0, 1), got ", p);
  const auto xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const auto keep = dropout_keep_mask_cpu(rows, cols, p, seed);
  auto out = at::empty_like(xc);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dropout_scale", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t scale = static_cast<opmath_t>(1.0 / (1.0 - p));
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    const bool* kept = keep.const_data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * cols, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const opmath_t v = static_cast<opmath_t>(in[i]) * static_cast<opmath_t>(kept[i] ? 1 : 0);
        o[i] = static_cast<scalar_t>(v * scale);
      }
    });
  });
  return out;
}

}  // namespace

// NOTE: a FRAGMENT, not TORCH_LIBRARY: the namespace's one TORCH_LIBRARY block is the CUDA
// schemas' (lora.cpp), absent from the CPU-only build.
TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  // The (rows, cols) bool dropout keep-mask of reference.dropout_keep_mask, bit for bit; seed: 0-dim int64
  // tensor on the CPU.
  m.def("dropout_keep_mask(int rows, int cols, float p, Tensor seed) -> Tensor");
  // x ⊙ D (reference.dropout_scale) for 2-D x on the CPU, in x's dtype; the same mask as dropout_keep_mask.
  m.def("dropout_scale(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("dropout_scale", &dropout_scale_cpu);
}

}  // namespace lora_kernels
