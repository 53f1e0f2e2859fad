// The fused GEMM on tensor cores (fp16 / bf16, fp32 accumulation):
//
//   C[M, N] = pre(L · Uᵀ) + X · Wᵀ (+ bias)          (see GemmParams)
//
// One 128x128 output tile per block of 8 warps (2 x 4, 64x32 per warp). The
// K loop runs over a virtual reduction axis: first the ceil(R/32) tiles of
// the low-rank product (L, U), then the ceil(K/32) tiles of the base product
// (X, W), through one 3-stage cp.async pipeline. When the low-rank tiles are
// done, pre() is applied to the accumulator (the scaling s in the forward, the
// dropout mask D in the backward); the base product then accumulates on top,
// and the tile is stored once.
//
// B_KMAJOR: W and U are stored with the reduction axis contiguous (W0 and the
// LoRA B in the forward: fragments by ldmatrix); otherwise with the output axis
// contiguous (W0 read as W0ᵀ and A read as Aᵀ in the backward: ldmatrix.trans).
#pragma once

#include "common.cuh"
#include "device_once.h"

namespace lora_kernels {
namespace tc {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3, kThreads = 256;
constexpr int kPad = 8;               // 16 bytes of padding per smem row: ldmatrix without bank conflicts
constexpr int kLdK = kBK + kPad;      // row length of [rows][k] tiles (elements)
constexpr int kLdN = kBN + kPad;      // row length of [k][n] tiles (elements)
constexpr int kTileA = kBM * kLdK;    // elements per stage of the X / L tile
template <bool B_KMAJOR>
constexpr int tile_b() {
  return B_KMAJOR ? kBN * kLdK : kBK * kLdN;
}
template <bool B_KMAJOR>
constexpr int smem_bytes() {
  return kStages * (kTileA + tile_b<B_KMAJOR>()) * 2;
}

// One 8-element (16-byte) chunk of a row-major operand into shared memory:
// element (row, col .. col+7), rows < rows_max and cols < cols_max valid, zero elsewhere.
// vec: cp.async is legal (16-byte aligned rows, cols_max % 8 == 0: a chunk is all in or all out).
__device__ __forceinline__ void load_chunk(uint16_t* dst, const uint16_t* base, int64_t row, int64_t col,
                                           int64_t ld, int64_t rows_max, int64_t cols_max, bool vec) {
  if (vec) {
    const bool ok = row < rows_max && col < cols_max;
    const uint16_t* src = ok ? base + row * ld + col : base;
    cp_async_16(dst, src, ok ? 16 : 0);
  } else {
    uint32_t packed[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      uint32_t lo = 0u, hi = 0u;
      if (row < rows_max) {
        const uint16_t* src = base + row * ld + col + 2 * e;
        if (col + 2 * e < cols_max) lo = src[0];
        if (col + 2 * e + 1 < cols_max) hi = src[1];
      }
      packed[e] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

template <typename T, bool B_KMAJOR, bool BIAS, bool MASK>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);  // [kStages][kBM][kLdK]
  uint16_t* sB = sA + kStages * kTileA;                  // [kStages][kBN][kLdK] or [kStages][kBK][kLdN]
  constexpr int kTileB = tile_b<B_KMAJOR>();

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp >> 2;  // 0..1: rows warp_m * 64
  const int warp_n = warp & 3;   // 0..3: cols warp_n * 32

  int64_t tile_m, tile_n;
  grouped_tile(blockIdx.x, ceil_div(p.M, kBM), ceil_div(p.N, kBN), tile_m, tile_n);
  const int64_t m0 = tile_m * kBM;
  const int64_t n0 = tile_n * kBN;

  const int kt_lr = static_cast<int>(ceil_div(p.R, kBK));
  const int kt = kt_lr + static_cast<int>(ceil_div(p.K, kBK));

  // Stage `stage` <- k-tile t of the virtual reduction axis.
  auto load_tile = [&](int stage, int t) {
    const bool lr = t < kt_lr;
    const int64_t k0 = static_cast<int64_t>(lr ? t : t - kt_lr) * kBK;
    const int64_t kmax = lr ? p.R : p.K;
    const uint16_t* a = static_cast<const uint16_t*>(lr ? p.l : p.x);
    const int64_t lda = lr ? p.slm : p.sxm;
    const bool avec = lr ? p.l_vec : p.x_vec;
    const uint16_t* b = static_cast<const uint16_t*>(lr ? p.u : p.w);
    const bool bvec = lr ? p.u_vec : p.w_vec;
    uint16_t* dA = sA + stage * kTileA;
    uint16_t* dB = sB + stage * kTileB;
    // X / L tile: kBM rows x kBK cols = 512 chunks of 8.
#pragma unroll
    for (int i = 0; i < (kBM * kBK / 8) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c >> 2, kc = (c & 3) * 8;
      load_chunk(dA + row * kLdK + kc, a, m0 + row, k0 + kc, lda, p.M, kmax, avec);
    }
    if constexpr (B_KMAJOR) {
      // W / U as [n][k]: kBN rows x kBK cols.
      const int64_t ldb = lr ? p.sun : p.swn;
#pragma unroll
      for (int i = 0; i < (kBN * kBK / 8) / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int row = c >> 2, kc = (c & 3) * 8;
        load_chunk(dB + row * kLdK + kc, b, n0 + row, k0 + kc, ldb, p.N, kmax, bvec);
      }
    } else {
      // W / U as [k][n]: kBK rows x kBN cols.
      const int64_t ldb = lr ? p.suk : p.swk;
#pragma unroll
      for (int i = 0; i < (kBK * kBN / 8) / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int krow = c >> 4, nc = (c & 15) * 8;
        load_chunk(dB + krow * kLdN + nc, b, k0 + krow, n0 + nc, ldb, kmax, p.N, bvec);
      }
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Fragment coordinates: accumulator element e of (mi, ni) sits at
  // row = warp_m*64 + mi*16 + lane/4 + (e/2)*8, col = warp_n*32 + ni*8 + (lane%4)*2 + e%2.
  const int frag_row = lane >> 2;
  const int frag_col = (lane & 3) * 2;

  // pre(): scale (and mask) the low-rank product held in acc.
  auto apply_pre = [&]() {
    const float ps = static_cast<float>(p.pre_scale);
    if constexpr (MASK) {
      // First the 64 keep bits of this thread's fragments, one Philox call per (mi, h, ni)
      // (columns col, col+1 of one 4-column group), in a rolled loop to keep registers low;
      // bit 2q + e belongs to acc[mi][ni][2h + e] with q = mi*8 + h*4 + ni.
      uint64_t keep = 0;
#pragma unroll 1
      for (int q = 0; q < 32; ++q) {
        const int mi = q >> 3, h = (q >> 2) & 1, ni = q & 3;
        const int64_t row = m0 + warp_m * 64 + mi * 16 + frag_row + h * 8;
        const int64_t col = n0 + warp_n * 32 + ni * 8 + frag_col;  // even: words col%4, col%4 + 1
        const uint4 w = mask_words(load_seed(p.seed), row, col, p.mask_groups);
        const bool second_pair = (col & 2) != 0;
        const uint64_t k0 = keep_bit(second_pair ? w.z : w.x, p.threshold) ? 1u : 0u;
        const uint64_t k1 = keep_bit(second_pair ? w.w : w.y, p.threshold) ? 1u : 0u;
        keep |= (k0 | (k1 << 1)) << (2 * q);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int q = mi * 8 + h * 4 + ni;
            acc[mi][ni][2 * h] *= ((keep >> (2 * q)) & 1u) ? ps : 0.f;
            acc[mi][ni][2 * h + 1] *= ((keep >> (2 * q + 1)) & 1u) ? ps : 0.f;
          }
    } else {
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] *= ps;
    }
  };

  // Pipeline prologue: kStages - 1 tiles in flight.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kt) load_tile(s, s);
    cp_async_commit();
  }

  for (int t = 0; t < kt; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t visible to all; everyone is done with tile t-1's stage
    {
      const int next = t + kStages - 1;
      if (next < kt) load_tile(next % kStages, next);
      cp_async_commit();
    }
    if (t == kt_lr) apply_pre();

    const uint16_t* tA = sA + (t % kStages) * kTileA;
    const uint16_t* tB = sB + (t % kStages) * kTileB;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = warp_m * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], tA + row * kLdK + kk + (lane >> 4) * 8);
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        if constexpr (B_KMAJOR) {
          const int n = warp_n * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(r, tB + n * kLdK + kk + ((lane >> 3) & 1) * 8);
        } else {
          const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(r, tB + k * kLdN + warp_n * 32 + nj * 16 + (lane >> 4) * 8);
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();
  if (kt == kt_lr) apply_pre();  // no base tiles (K == 0)

  // Epilogue: bias, round once, store.
  T* c = static_cast<T*>(p.c);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int64_t col = n0 + warp_n * 32 + ni * 8 + frag_col;
    float b0 = 0.f, b1 = 0.f;
    if constexpr (BIAS) {
      if (col < p.N) b0 = to_acc(bias[col]);
      if (col + 1 < p.N) b1 = to_acc(bias[col + 1]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m * 64 + mi * 16 + frag_row + h * 8;
        if (row >= p.M) continue;
        const float v0 = acc[mi][ni][2 * h] + b0;
        const float v1 = acc[mi][ni][2 * h + 1] + b1;
        T* dst = c + row * p.ldc + col;
        if (p.c_vec2 && col + 1 < p.N) {
          store_pair(dst, v0, v1);
        } else {
          if (col < p.N) dst[0] = from_acc<T>(v0);
          if (col + 1 < p.N) dst[1] = from_acc<T>(v1);
        }
      }
  }
}

template <typename T, bool B_KMAJOR, bool BIAS, bool MASK>
LaunchStatus launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return {};
  auto kernel = gemm_kernel<T, B_KMAJOR, BIAS, MASK>;
  constexpr int smem = smem_bytes<B_KMAJOR>();
  static PerDeviceOnce once;  // an attribute per device, set on the first launch there
  const cudaError_t err =
      once([&] { return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); });
  if (err != cudaSuccess) return {err, {}};
  const int64_t blocks = ceil_div(p.M, kBM) * ceil_div(p.N, kBN);
  if (blocks > INT32_MAX) return refuse("lora_kernels: output too large for one launch");
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return launched();
}

}  // namespace tc
}  // namespace lora_kernels
