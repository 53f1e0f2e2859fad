// The sm_90a GEMM (gemm_sm90.cuh), one instantiation per variant: the forward, y = x W0ᵀ + xa Bᵀ + b
// (W k-major), and the backward, dx = dy W0 + g A, each in bf16 and fp16.
// NOTE: the four in one translation unit: nvcc's cost is mostly CUTLASS's headers, paid once per
// unit (measured on 2 cores, CPU time: one instantiation 46 s, all four 70 s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_sm90.cuh"

LORA_SM90_INSTANTIATE(__nv_bfloat16, /*W_KMAJOR=*/true);
LORA_SM90_INSTANTIATE(__half, /*W_KMAJOR=*/true);
LORA_SM90_INSTANTIATE(__nv_bfloat16, /*W_KMAJOR=*/false);
LORA_SM90_INSTANTIATE(__half, /*W_KMAJOR=*/false);
