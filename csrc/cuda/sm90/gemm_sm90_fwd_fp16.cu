// One instantiation of the sm_90a GEMM (gemm_sm90.cuh): the forward, y = x W0ᵀ + xa Bᵀ + b, fp16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_sm90.cuh"

LORA_SM90_INSTANTIATE(__half, /*W_KMAJOR=*/true);
