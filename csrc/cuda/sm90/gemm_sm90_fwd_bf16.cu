// One instantiation of the sm_90a GEMM (gemm_sm90.cuh): the forward, y = x W0ᵀ + xa Bᵀ + b, bf16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_sm90.cuh"

LORA_SM90_INSTANTIATE(__nv_bfloat16, /*W_KMAJOR=*/true);
