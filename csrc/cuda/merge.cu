// lora_kernels::cuda_lora_merge_ — W0 += s · B A in place (unmerge: the same with -s).
//
// Bandwidth-bound: each block owns a 32 x 128 tile of W0, issues its 16-byte
// loads of that tile first, computes the rank-r product for the tile in fp32
// (fp64 for an fp64 weight) from B and A slices staged in shared memory while
// those loads are in flight, then adds, rounds once and writes the tile back
// with 16-byte stores. W0 is read once and written once. A and B may come in
// any float dtype (fp32 masters for a bf16 weight): they are converted to the
// accumulator type first, never rounded to the weight's dtype.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"

namespace lora_kernels {
namespace merge {

constexpr int kRows = 32, kCols = 128, kRankChunk = 16, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(T* __restrict__ W, const typename AccOf<T>::type* __restrict__ A,
                 const typename AccOf<T>::type* __restrict__ B, int64_t N, int64_t K, int64_t r,
                 double scaling, bool vec) {
  using Acc = typename AccOf<T>::type;
  constexpr int V = 16 / sizeof(T);                    // elements per 16-byte access
  constexpr int kVecPerRow = kCols / V;                // 16-byte accesses per tile row
  constexpr int kVecPerThread = kRows * kVecPerRow / kThreads;
  static_assert(kRows * kVecPerRow % kThreads == 0, "tile must split evenly");
  __shared__ Acc sB[kRows][kRankChunk + 1];
  __shared__ __align__(16) Acc sA[kRankChunk][kCols];

  const int tid = threadIdx.x;
  const int64_t col_tiles = ceil_div(K, kCols);
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) / col_tiles) * kRows;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) % col_tiles) * kCols;

  // This thread's accesses: access v covers tile row rows[v], columns cols[v] .. cols[v]+V-1.
  int rows[kVecPerThread], cols[kVecPerThread];
#pragma unroll
  for (int v = 0; v < kVecPerThread; ++v) {
    const int lin = v * kThreads + tid;
    rows[v] = lin / kVecPerRow;
    cols[v] = (lin % kVecPerRow) * V;
  }

  // 1. Issue the loads of W (in flight during the product).
  union Vec {
    uint4 u;
    T e[V];
  };
  Vec w[kVecPerThread];
#pragma unroll
  for (int v = 0; v < kVecPerThread; ++v) {
    const int64_t gr = row0 + rows[v], gc = col0 + cols[v];
    if (vec) {
      // K % V == 0: an access is all in or all out.
      if (gr < N && gc < K) w[v].u = *reinterpret_cast<const uint4*>(W + gr * K + gc);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (gr < N && gc + e < K) w[v].e[e] = W[gr * K + gc + e];
    }
  }

  // 2. delta = B[rows, :] A[:, cols] in Acc, over the rank in chunks.
  Acc acc[kVecPerThread][V];
#pragma unroll
  for (int v = 0; v < kVecPerThread; ++v)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[v][e] = Acc(0);

  for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
    for (int idx = tid; idx < kRows * kRankChunk; idx += kThreads) {
      const int rr = idx / kRankChunk, jj = idx % kRankChunk;
      const int64_t gr = row0 + rr, gj = j0 + jj;
      sB[rr][jj] = (gr < N && gj < r) ? B[gr * r + gj] : Acc(0);
    }
    for (int idx = tid; idx < kRankChunk * kCols; idx += kThreads) {
      const int jj = idx / kCols, cc = idx % kCols;
      const int64_t gj = j0 + jj, gc = col0 + cc;
      sA[jj][cc] = (gj < r && gc < K) ? A[gj * K + gc] : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < kRankChunk; ++jj) {
#pragma unroll
      for (int v = 0; v < kVecPerThread; ++v) {
        const Acc b = sB[rows[v]][jj];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[v][e] = fma_acc(b, sA[jj][cols[v] + e], acc[v][e]);
      }
    }
    __syncthreads();
  }

  // 3. W = round(W + s · delta), one rounding, 16-byte stores.
  const Acc s = static_cast<Acc>(scaling);
#pragma unroll
  for (int v = 0; v < kVecPerThread; ++v) {
    const int64_t gr = row0 + rows[v], gc = col0 + cols[v];
    if (gr >= N) continue;
    Vec out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.e[e] = from_acc<T>(fma_acc(s, acc[v][e], to_acc(w[v].e[e])));
    if (vec) {
      if (gc < K) *reinterpret_cast<uint4*>(W + gr * K + gc) = out.u;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (gc + e < K) W[gr * K + gc + e] = out.e[e];
    }
  }
}

}  // namespace merge

void cuda_lora_merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  LORA_CHECK_INPUT(weight, 2, weight);
  LORA_CHECK_INPUT(lora_A, 2, weight);
  LORA_CHECK_INPUT(lora_B, 2, weight);
  LORA_CHECK_FLOAT(weight);
  LORA_CHECK_FLOAT(lora_A);
  LORA_CHECK_FLOAT(lora_B);
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0);
  LORA_CHECK_SHAPE(lora_A, r, K);
  LORA_CHECK_SHAPE(lora_B, N, r);
  TORCH_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  if (N == 0 || K == 0) return;

  const c10::cuda::CUDAGuard device_guard(weight.device());
  // The factors in the accumulator type (a no-op for fp32 factors of an fp16/bf16/fp32 weight).
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor A = lora_A.to(acc_dtype).contiguous();
  const at::Tensor B = lora_B.to(acc_dtype).contiguous();
  // In place on a contiguous weight; a strided one is merged in a contiguous copy and copied back.
  at::Tensor W = weight.is_contiguous() ? weight : weight.contiguous();

  const int64_t blocks = ceil_div(N, merge::kRows) * ceil_div(K, merge::kCols);
  TORCH_CHECK(blocks <= INT32_MAX, "lora_kernels: weight too large for one launch");
  const auto stream = current_stream();
  LORA_DISPATCH_FLOAT_TYPES(W.scalar_type(), "cuda_lora_merge_", [&] {
    using Acc = typename AccOf<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = aligned16(W.data_ptr()) && K % V == 0;
    merge::merge_kernel<scalar_t><<<static_cast<unsigned>(blocks), merge::kThreads, 0, stream>>>(
        static_cast<scalar_t*>(W.data_ptr()), static_cast<const Acc*>(A.data_ptr()),
        static_cast<const Acc*>(B.data_ptr()), N, K, r, scaling, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!W.is_same(weight)) weight.copy_(W);
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_lora_merge_", &cuda_lora_merge_); }

}  // namespace lora_kernels
