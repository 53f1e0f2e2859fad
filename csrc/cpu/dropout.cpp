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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

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

// Columns [4g, 4g + n) of a row from the four Philox words of its group g: keep = (word >> 8) >= threshold.
inline void keep_group(const uint32_t words[4], uint32_t threshold, int64_t n, bool* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = (words[j] >> 8) >= threshold;
}

// keep[0, cols) of one row whose first group has counter `first`: one Philox call per four columns.
void keep_row_scalar(uint64_t key, uint32_t threshold, uint64_t first, int64_t g0, int64_t cols, bool* out) {
  uint32_t words[4];
  for (int64_t g = g0; 4 * g < cols; ++g) {
    philox4x32_10(key, first + static_cast<uint64_t>(g), words);
    keep_group(words, threshold, std::min<int64_t>(4, cols - 4 * g), out + 4 * g);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORA_KERNELS_AVX2 1
// NOTE: eight counters per AVX2 register (Philox's 32x32-bit products by _mm256_mul_epu32, even and
// odd lanes apart): about 3x the scalar loop. Compiled for AVX2 whatever the build's -march, and
// taken only where the CPU has it (runtime check); the result is the scalar loop's, bit for bit.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void keep_row_avx2(uint64_t key, uint32_t threshold, uint64_t first, int64_t cols,
                                                   bool* out) {
  // kLut[b]: the four bools of a group whose keep bits (one per word) are b.
  static constexpr uint32_t kLut[16] = {
      0x00000000u, 0x00000001u, 0x00000100u, 0x00000101u, 0x00010000u, 0x00010001u, 0x00010100u, 0x00010101u,
      0x01000000u, 0x01000001u, 0x01000100u, 0x01000101u, 0x01010000u, 0x01010001u, 0x01010100u, 0x01010101u};
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  // (word >> 8) >= threshold  <=>  (word >> 8) > threshold − 1, signed: both sides are below 2²⁴.
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  const int64_t full = cols / 4;
  int64_t g = 0;
  for (; g + 8 <= full; g += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t counter = first + static_cast<uint64_t>(g + l);
      lo[l] = static_cast<uint32_t>(counter);
      hi[l] = static_cast<uint32_t>(counter >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int i = 0; i < 10; ++i) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(c2, mul_b, hi_b, lo_b);
      mul_hi_lo(c0, mul_a, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i words[4] = {c0, c1, c2, c3};
    int bits[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i kept = _mm256_cmpgt_epi32(_mm256_srli_epi32(words[j], 8), below);
      bits[j] = _mm256_movemask_ps(_mm256_castsi256_ps(kept));
    }
    for (int l = 0; l < 8; ++l) {
      const int b = ((bits[0] >> l) & 1) | (((bits[1] >> l) & 1) << 1) | (((bits[2] >> l) & 1) << 2) |
                    (((bits[3] >> l) & 1) << 3);
      std::memcpy(out + 4 * (g + l), &kLut[b], 4);
    }
  }
  keep_row_scalar(key, threshold, first, g, cols, out);
}

bool has_avx2() {
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return has;
}
#endif

// keep[0, cols) of row `row` of a mask with `cols` columns.
inline void keep_row(uint64_t key, uint32_t threshold, int64_t row, int64_t cols, bool* out) {
  const uint64_t first = static_cast<uint64_t>(row) * static_cast<uint64_t>((cols + 3) / 4);
#ifdef LORA_KERNELS_AVX2
  if (has_avx2()) return keep_row_avx2(key, threshold, first, cols, out);
#endif
  keep_row_scalar(key, threshold, first, 0, cols, out);
}

uint64_t seed_key(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, op,
              ": seed must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// NOTE: rows in tasks of ~4096 Philox calls (~20 µs): smaller masks run on the calling thread.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, (cols + 3) / 4)); }

// (rows, cols) contiguous bool mask; `seed` is a 0-dim int64 CPU tensor (as the CUDA ops take it).
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, const at::Tensor& seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "dropout_keep_mask: rows and cols must be >= 0, got ", rows, " and ", cols);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout_keep_mask: dropout probability p must be in [0, 1], got ", p);
  const uint64_t key = seed_key(seed, "dropout_keep_mask");
  auto keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  if (rows == 0 || cols == 0) return keep;
  const uint32_t threshold = dropout_threshold(p);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) keep_row(key, threshold, row, cols, out + row * cols);
  });
  return keep;
}

// xs[i] ⊙ D = xs[i] · keep · 1/(1−p) in their dtype for 2-D tensors of one shape and dtype, one draw of
// the mask for all of them; bit for bit reference.dropout_scale (x.mul(keep).mul_(1/(1−p))): the product
// is taken in PyTorch's opmath type (float for half and bfloat16), and a dropped NaN or infinity stays
// NaN as x · 0 does. One pass, row by row: the mask lives one row at a time.
std::vector<at::Tensor> dropout_scale_all(const char* op, c10::ArrayRef<at::Tensor> xs, double p,
                                          const at::Tensor& seed) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
    TORCH_CHECK(x.sizes() == xs[0].sizes() && x.scalar_type() == xs[0].scalar_type(), op,
                ": the tensors must share a shape and a dtype, got ", xs[0].sizes(), " ", xs[0].scalar_type(), " and ",
                x.sizes(), " ", x.scalar_type());
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout probability p must be in [0, 1), got ", p);
  const uint64_t key = seed_key(seed, op);
  std::vector<at::Tensor> ins, outs;
  for (const auto& x : xs) {
    ins.push_back(x.contiguous());
    outs.push_back(at::empty_like(ins.back()));
  }
  const int64_t rows = xs[0].size(0), cols = xs[0].size(1);
  if (rows == 0 || cols == 0) return outs;
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "dropout_scale", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t scale = static_cast<opmath_t>(1.0 / (1.0 - p));
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      std::unique_ptr<bool[]> kept(new bool[cols]);
      std::unique_ptr<opmath_t[]> factor(new opmath_t[cols]);
      for (int64_t row = begin; row < end; ++row) {
        keep_row(key, threshold, row, cols, kept.get());
        // NOTE: x · D with D = keep ? s : 0 has the bits of (x · keep) · s (x · 0 keeps x's sign and NaN); the
        // row's factors first, then plain products: both loops vectorise.
        for (int64_t c = 0; c < cols; ++c) factor[c] = kept[c] ? scale : opmath_t(0);
        for (size_t i = 0; i < ins.size(); ++i) {
          const scalar_t* __restrict__ in_row = ins[i].const_data_ptr<scalar_t>() + row * cols;
          scalar_t* __restrict__ o_row = outs[i].data_ptr<scalar_t>() + row * cols;
          for (int64_t c = 0; c < cols; ++c) o_row[c] = static_cast<scalar_t>(static_cast<opmath_t>(in_row[c]) * factor[c]);
        }
      }
    });
  });
  return outs;
}

at::Tensor dropout_scale_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  return dropout_scale_all("dropout_scale", {x}, p, seed)[0];
}

std::tuple<at::Tensor, at::Tensor> dropout_scale_pair_cpu(const at::Tensor& x, const at::Tensor& other, double p,
                                                          const at::Tensor& seed) {
  auto outs = dropout_scale_all("dropout_scale_pair", {x, other}, p, seed);
  return {outs[0], outs[1]};
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
  // (x ⊙ D, other ⊙ D) for x and other of one shape and dtype: one draw of the mask for both (backward's x
  // and g A).
  m.def("dropout_scale_pair(Tensor x, Tensor other, float p, Tensor seed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("dropout_scale", &dropout_scale_cpu);
  m.impl("dropout_scale_pair", &dropout_scale_pair_cpu);
}

}  // namespace lora_kernels
