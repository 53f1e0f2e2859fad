// The sm_90a GEMM of the CUDA backend, as the launchers see it (no CUTLASS here, so
// forward.cu / backward.cu compile without it):
//
//   C[M, N] = X Wᵀ + L Uᵀ (+ bias[n])      X (M, K), L (M, R) row-major; C (M, N) row-major
//   W_KMAJOR:  W (N, K), U (N, R) row-major     (the forward:  W0, lora_B)
//   otherwise: W (K, N), U (R, N) row-major     (the backward: W0 read as W0ᵀ, lora_A as Aᵀ)
//
// The kernels (gemm_sm90.cuh) are instantiated once per variant by gemm_sm90.cu and exist
// only in builds with the sm_90a target
// (LORA_KERNELS_SM90, set by setup.py). Whether a call may use them: sm90_gemm_eligible.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../launch.h"

namespace lora_kernels::sm90 {

struct GemmArgs {
  const void* x;
  const void* w;
  const void* l;
  const void* u;
  const void* bias;  // (N,) or nullptr
  void* c;
  int64_t M, N, K, R;
};

// The k-tile depth of the kernel (its TileShape's K; gemm_sm90.cuh asserts they agree). The
// reduction runs over ceil(K/kBlockK) tiles of (X, W), then ceil(R/kBlockK) tiles of (L, U).
constexpr int64_t kBlockK = 64;
inline int64_t k_tiles_base(int64_t K) { return (K + kBlockK - 1) / kBlockK; }
inline int64_t k_tiles_lora(int64_t R) { return (R + kBlockK - 1) / kBlockK; }

// The forward's GEMM, y = x W0ᵀ + xa Bᵀ + b: x (M, K), W0 (N, K), xa (M, r), B (N, r), y (M, N).
inline GemmArgs forward_args(const void* x, const void* w0, const void* xa, const void* lora_B, const void* bias,
                             void* y, int64_t M, int64_t N, int64_t K, int64_t r) {
  return {x, w0, xa, lora_B, bias, y, M, N, K, r};
}

// The backward's GEMM, dx = dy W0 + g A (no bias): an (M, K) output reducing over the N columns
// of dy; W0 (N, K) and A (r, K) are read in place as the (reduction, output) = row-major "W (K, N)"
// and "U (R, N)" of the header comment, i.e. W_KMAJOR = false.
inline GemmArgs backward_args(const void* dy, const void* w0, const void* g, const void* lora_A, void* dx,
                              int64_t M, int64_t N, int64_t K, int64_t r) {
  return {dy, w0, g, lora_A, nullptr, dx, M, /*N=*/K, /*K=*/N, r};
}

// TMA needs 16-byte aligned bases and row strides (8 elements of 2 bytes) for every operand,
// and the mainloop needs K, R > 0; int32 problem extents, and the virtual reduction axis
// (k_tiles_base(K) + k_tiles_lora(R)) · kBlockK must fit an int as well. The row strides are K (X,
// and W when k-major), R (L, and U when k-major), N (C, and W, U otherwise).
// (The same holds for both layouts of W and U: their rows are K / R long when k-major, N otherwise.)
// NOTE: the bias is loaded element by element by CUTLASS's row broadcast (predicated), so its
// alignment is not a TMA requirement; it is still asked for, as CUTLASS's AlignmentBias declares.
// NOTE: with -DNDEBUG (required, see setup.py) CuTe does not stop on a failed
// cuTensorMapEncodeTiled: it prints to stderr and the kernel would run with a bad descriptor.
// Every rule of that call that depends on the call (16-byte base and strides) is checked here.
inline bool sm90_gemm_eligible(const GemmArgs& a) {
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool ptrs = al16(a.x) && al16(a.w) && al16(a.l) && al16(a.u) && al16(a.c) && (!a.bias || al16(a.bias));
  const bool sizes = a.M > 0 && a.N > 0 && a.K > 0 && a.R > 0 && a.K % 8 == 0 && a.R % 8 == 0 && a.N % 8 == 0;
  const bool fits = a.M < (int64_t{1} << 31) && a.N < (int64_t{1} << 31) && a.K < (int64_t{1} << 30) &&
                    a.R < (int64_t{1} << 30) && (k_tiles_base(a.K) + k_tiles_lora(a.R)) * kBlockK < (int64_t{1} << 31);
  return ptrs && sizes && fits;
}

// The backward's GEMM takes the sm_90a kernel only without dropout.
// NOTE: the mask D applies to the low-rank term alone, dx = (g A) ⊙ D + dy W0, so with dropout
// the two products cannot share the wgmma accumulator of this mainloop.
inline bool sm90_backward_eligible(const GemmArgs& a, bool dropout) { return !dropout && sm90_gemm_eligible(a); }

// Launches the kernel on `stream` (the current device's). T: __half or __nv_bfloat16 (cuda_fp16.h,
// cuda_bf16.h); instantiated by gemm_sm90.cu.
template <typename T, bool W_KMAJOR>
LaunchStatus run_gemm(const GemmArgs& args, cudaStream_t stream);

}  // namespace lora_kernels::sm90
