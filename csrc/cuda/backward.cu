// The backward's fused GEMM on the sm_80 kernels: dx = (g A) ⊙ D + dy W0, reducing over the N
// columns of dy, W0 and A read in place as W0ᵀ and Aᵀ (gemm_tc.cuh: the low-rank tiles first,
// masked and scaled by 1/(1-p) in the accumulator; gemm_simt.cuh for fp32/fp64). The op around it
// (cuda_lora_backward: checks, the thin products, the choice of the sm_90a kernel) is ops.cpp's.
#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"

namespace lora_kernels {

LaunchStatus launch_backward_gemm(DType dtype, const GemmParams& p, bool mask, cudaStream_t stream) {
  return LORA_DISPATCH_FLOAT_TYPES(dtype, [&] {
    return LORA_BOOL_SWITCH(mask, kMask, [&] {
      if constexpr (kTensorCoreType<scalar_t>) {
        return tc::launch_gemm<scalar_t, /*B_KMAJOR=*/false, /*BIAS=*/false, kMask>(p, stream);
      } else {
        return simt::launch_gemm<scalar_t, /*BIAS=*/false, kMask>(p, stream);
      }
    });
  });
}

}  // namespace lora_kernels
