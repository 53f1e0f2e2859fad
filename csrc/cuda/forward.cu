// The forward's fused GEMM on the sm_80 kernels: y = xa Bᵀ + x W0ᵀ + b, W0 and B k-major
// (gemm_tc.cuh: low-rank k-tiles first; gemm_simt.cuh for fp32/fp64). The op around it
// (cuda_lora_forward: checks, the thin product xa, the choice of the sm_90a kernel) is ops.cpp's.
#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"

namespace lora_kernels {

LaunchStatus launch_forward_gemm(DType dtype, const GemmParams& p, bool has_bias, cudaStream_t stream) {
  return LORA_DISPATCH_FLOAT_TYPES(dtype, [&] {
    return LORA_BOOL_SWITCH(has_bias, kBias, [&] {
      if constexpr (kTensorCoreType<scalar_t>) {
        return tc::launch_gemm<scalar_t, /*B_KMAJOR=*/true, kBias, /*MASK=*/false>(p, stream);
      } else {
        return simt::launch_gemm<scalar_t, kBias, /*MASK=*/false>(p, stream);
      }
    });
  });
}

}  // namespace lora_kernels
