// Device helpers shared by the kernels: number conversions, the Philox
// generator of the dropout mask, grouped tile order, and the sm_80 tensor-core
// primitives (cp.async, ldmatrix, mma.sync) as inline PTX. CUDA headers and launch.h
// only (no PyTorch): the host side of the ops is ops.cpp.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launch.h"

namespace lora_kernels {

// --------------------------------------------------------------------------- //
// Number types
// --------------------------------------------------------------------------- //

// Accumulator type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// fp16/bf16 go through the tensor-core kernel; fp32/fp64 through the SIMT one.
template <typename T>
constexpr bool kTensorCoreType = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<__half> {
  static __device__ __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct FromAcc<float> {
  static __device__ __forceinline__ float cvt(float v) { return v; }
};
template <>
struct FromAcc<double> {
  static __device__ __forceinline__ double cvt(double v) { return v; }
};
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// Round an accumulator value to T (to nearest even).
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return FromAcc<T>::cvt(v);
}

// --------------------------------------------------------------------------- //
// Dropout mask: Philox-4x32-10, exactly reference.philox4x32
// --------------------------------------------------------------------------- //

// The four 32-bit words for one counter. Counter (c & 0xffffffff, c >> 32, 0, 0),
// key (seed & 0xffffffff, seed >> 32); the same generator as Triton's tl.randint4x.
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
#ifdef __CUDA_ARCH__
    const uint32_t hi_b = __umulhi(c2, 0xCD9E8D57u);
    const uint32_t hi_a = __umulhi(c0, 0xD2511F53u);
#else
    const uint32_t hi_b = static_cast<uint32_t>((static_cast<uint64_t>(c2) * 0xCD9E8D57u) >> 32);
    const uint32_t hi_a = static_cast<uint32_t>((static_cast<uint64_t>(c0) * 0xD2511F53u) >> 32);
#endif
    const uint32_t lo_b = c2 * 0xCD9E8D57u;
    const uint32_t lo_a = c0 * 0xD2511F53u;
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The Philox words of the four columns [4·(col/4), 4·(col/4) + 4) of row `row` of a
// (rows, cols) mask with groups = ceil(cols / 4).
// The seed: passed by value, or read from device memory (through the read-only cache).
__device__ __forceinline__ uint64_t load_seed(const Seed& seed) {
  return seed.ptr != nullptr ? static_cast<uint64_t>(__ldg(seed.ptr)) : seed.value;
}

__device__ __forceinline__ uint4 mask_words(uint64_t seed, int64_t row, int64_t col, int64_t groups) {
  return philox4x32_10(seed, static_cast<uint64_t>(row) * static_cast<uint64_t>(groups) +
                                 static_cast<uint64_t>(col >> 2));
}

__device__ __forceinline__ bool keep_bit(uint32_t word, uint32_t threshold) {
  return (word >> 8) >= threshold;
}

// --------------------------------------------------------------------------- //
// Tile order
// --------------------------------------------------------------------------- //

// Grouped ("super-row") order of output tiles for L2 reuse: consecutive blocks
// walk down a group of kGroup tile rows before moving to the next tile column.
__device__ __forceinline__ void grouped_tile(int64_t pid, int64_t num_m, int64_t num_n, int64_t& tile_m,
                                             int64_t& tile_n) {
  constexpr int64_t kGroup = 8;
  const int64_t width = kGroup * num_n;
  const int64_t first_m = (pid / width) * kGroup;
  const int64_t group_rows = min(num_m - first_m, kGroup);
  const int64_t in_group = pid % width;
  tile_m = first_m + in_group % group_rows;
  tile_n = in_group / group_rows;
}

// --------------------------------------------------------------------------- //
// sm_80 primitives
// --------------------------------------------------------------------------- //

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination (out of bounds).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  __trap();
#endif
}

// d += a · b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();
#endif
}

// Two adjacent values rounded to T and stored with one 4-byte store (ptr 4-byte aligned).
__device__ __forceinline__ void store_pair(__half* ptr, float a, float b) {
  *reinterpret_cast<__half2*>(ptr) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* ptr, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(ptr) = __floats2bfloat162_rn(a, b);
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lora_kernels
