// The fused GEMM on CUDA cores, for fp32 (fp32 FFMA, never TF32) and fp64:
//
//   C[M, N] = pre(L · Uᵀ) + X · Wᵀ (+ bias)          (see GemmParams)
//
// Same structure as the tensor-core kernel (gemm_tc.cuh): one virtual
// reduction axis, the low-rank tiles first, pre() on the accumulator, then the
// base tiles, one store. 64x64 tiles, 256 threads with 4x4 outputs each, a
// register-staged double buffer. Operands are read through their strides, so
// the transposed views of the backward (W0ᵀ, Aᵀ) cost no copies.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace simt {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
constexpr int kPerThread = kBM * kBK / kThreads;  // elements of each operand tile a thread loads (4)

// Position (r, k) in a kRows x kBK tile of load slot e: the unit-stride axis runs fastest across threads.
template <int kRows>
__device__ __forceinline__ void tile_slot(int e, bool k_contiguous, int& r, int& k) {
  const int idx = e * kThreads + threadIdx.x;
  if (k_contiguous) {
    r = idx / kBK;
    k = idx % kBK;
  } else {
    r = idx % kRows;
    k = idx / kRows;
  }
}

template <typename T, bool BIAS, bool MASK>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc sX[kBK][kBM + 4];
  __shared__ Acc sW[kBK][kBN + 4];

  const int tid = threadIdx.x;
  const int tm = tid / 16;  // rows tm*4 .. tm*4+3
  const int tn = tid % 16;  // cols tn*4 .. tn*4+3

  int64_t tile_m, tile_n;
  grouped_tile(blockIdx.x, ceil_div(p.M, kBM), ceil_div(p.N, kBN), tile_m, tile_n);
  const int64_t m0 = tile_m * kBM;
  const int64_t n0 = tile_n * kBN;

  const int kt_lr = static_cast<int>(ceil_div(p.R, kBK));
  const int kt = kt_lr + static_cast<int>(ceil_div(p.K, kBK));

  Acc rx[kPerThread], rw[kPerThread];
  // Registers <- k-tile t of the virtual reduction axis (low-rank tiles first).
  auto fetch = [&](int t) {
    const bool lr = t < kt_lr;
    const int64_t k0 = static_cast<int64_t>(lr ? t : t - kt_lr) * kBK;
    const int64_t kmax = lr ? p.R : p.K;
    const T* x = static_cast<const T*>(lr ? p.l : p.x);
    const int64_t sxm = lr ? p.slm : p.sxm, sxk = lr ? p.slk : p.sxk;
    const T* w = static_cast<const T*>(lr ? p.u : p.w);
    const int64_t swn = lr ? p.sun : p.swn, swk = lr ? p.suk : p.swk;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      int r, k;
      tile_slot<kBM>(e, sxk == 1, r, k);
      const int64_t gm = m0 + r, gk = k0 + k;
      rx[e] = (gm < p.M && gk < kmax) ? to_acc(x[gm * sxm + gk * sxk]) : Acc(0);
      tile_slot<kBN>(e, swk == 1, r, k);
      const int64_t gn = n0 + r, gk2 = k0 + k;
      rw[e] = (gn < p.N && gk2 < kmax) ? to_acc(w[gn * swn + gk2 * swk]) : Acc(0);
    }
  };
  auto stash = [&](int t) {
    const bool lr = t < kt_lr;
    const bool xk = (lr ? p.slk : p.sxk) == 1;
    const bool wk = (lr ? p.suk : p.swk) == 1;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      int r, k;
      tile_slot<kBM>(e, xk, r, k);
      sX[k][r] = rx[e];
      tile_slot<kBN>(e, wk, r, k);
      sW[k][r] = rw[e];
    }
  };

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  auto apply_pre = [&]() {
    const Acc ps = static_cast<Acc>(p.pre_scale);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (MASK) {
        // Columns n0 + tn*4 .. +3 are one Philox group (n0 and tn*4 are multiples of 4).
        const uint4 w = mask_words(load_seed(p.seed), m0 + tm * 4 + i, n0 + tn * 4, p.mask_groups);
        acc[i][0] *= keep_bit(w.x, p.threshold) ? ps : Acc(0);
        acc[i][1] *= keep_bit(w.y, p.threshold) ? ps : Acc(0);
        acc[i][2] *= keep_bit(w.z, p.threshold) ? ps : Acc(0);
        acc[i][3] *= keep_bit(w.w, p.threshold) ? ps : Acc(0);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] *= ps;
      }
    }
  };

  if (kt > 0) {
    fetch(0);
    stash(0);
  }
  __syncthreads();
  for (int t = 0; t < kt; ++t) {
    if (t == kt_lr) apply_pre();
    if (t + 1 < kt) fetch(t + 1);  // global loads in flight during this tile's FMAs
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sX[k][tm * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sW[k][tn * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma_acc(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
    if (t + 1 < kt) stash(t + 1);
    __syncthreads();
  }
  if (kt == kt_lr) apply_pre();  // no base tiles (K == 0)

  T* c = static_cast<T*>(p.c);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = n0 + tn * 4 + j;
    if (col >= p.N) continue;
    Acc b = Acc(0);
    if constexpr (BIAS) b = to_acc(bias[col]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + tm * 4 + i;
      if (row < p.M) c[row * p.ldc + col] = from_acc<T>(acc[i][j] + b);
    }
  }
}

template <typename T, bool BIAS, bool MASK>
LaunchStatus launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return {};
  const int64_t blocks = ceil_div(p.M, kBM) * ceil_div(p.N, kBN);
  if (blocks > INT32_MAX) return refuse("lora_kernels: output too large for one launch");
  gemm_kernel<T, BIAS, MASK>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return launched();
}

}  // namespace simt
}  // namespace lora_kernels
