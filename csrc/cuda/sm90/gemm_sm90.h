// The sm_90a GEMM of the CUDA backend, as the launchers see it (no CUTLASS here, so
// forward.cu / backward.cu compile without it):
//
//   C[M, N] = X Wᵀ + L Uᵀ (+ bias[n])      X (M, K), L (M, R) row-major; C (M, N) row-major
//   W_KMAJOR:  W (N, K), U (N, R) row-major     (the forward:  W0, lora_B)
//   otherwise: W (K, N), U (R, N) row-major     (the backward: W0 read as W0ᵀ, lora_A as Aᵀ)
//
// The kernels (gemm_sm90.cuh) are instantiated once per .cu file
// (gemm_sm90_{fwd,bwd}_{bf16,fp16}.cu) and exist only in builds with the sm_90a target
// (LORA_KERNELS_SM90, set by setup.py). Whether a call may use them: sm90_gemm_eligible.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

// TMA needs 16-byte aligned bases and row strides (8 elements of 2 bytes) for every operand,
// and the mainloop needs K, R > 0; int32 problem extents. The row strides are K (X, and W when
// k-major), R (L, and U when k-major), N (C, and W, U otherwise).
// (The same holds for both layouts of W and U: their rows are K / R long when k-major, N otherwise.)
inline bool sm90_gemm_eligible(const GemmArgs& a) {
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool ptrs = al16(a.x) && al16(a.w) && al16(a.l) && al16(a.u) && al16(a.c) && (!a.bias || al16(a.bias));
  const bool sizes = a.M > 0 && a.N > 0 && a.K > 0 && a.R > 0 && a.K % 8 == 0 && a.R % 8 == 0 && a.N % 8 == 0;
  const bool fits = a.M < (int64_t{1} << 31) && a.N < (int64_t{1} << 31) && a.K < (int64_t{1} << 30);
  return ptrs && sizes && fits;
}

// T: __half or __nv_bfloat16 (declared by the .cu files that instantiate it).
template <typename T, bool W_KMAJOR>
void run_gemm(const GemmArgs& args, cudaStream_t stream);

}  // namespace lora_kernels::sm90
