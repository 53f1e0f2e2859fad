// The merge kernel of lora_kernels::cuda_lora_merge_ (ops.cpp): W0 += s · B A in place (unmerge: -s).
//
// Bandwidth-bound: each block owns a 32 x 128 tile of W0, issues its 16-byte
// loads of that tile first, computes the rank-r product for the tile in fp32
// (fp64 for an fp64 weight) from B and A slices staged in shared memory while
// those loads are in flight, then adds, rounds once and writes the tile back
// with 16-byte stores. W0 is read once and written once. A and B may come in
// any float dtype (fp32 masters for a bf16 weight): they are converted to the
// accumulator type first (ops.cpp), never rounded to the weight's dtype.
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

LaunchStatus launch_merge(DType dtype, void* W, const void* A, const void* B, int64_t N, int64_t K, int64_t r,
                          double scaling, cudaStream_t stream) {
  const int64_t blocks = ceil_div(N, merge::kRows) * ceil_div(K, merge::kCols);
  if (blocks > INT32_MAX) return refuse("lora_kernels: weight too large for one launch");
  return LORA_DISPATCH_FLOAT_TYPES(dtype, [&] {
    using Acc = typename AccOf<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = aligned16(W) && K % V == 0;
    merge::merge_kernel<scalar_t><<<static_cast<unsigned>(blocks), merge::kThreads, 0, stream>>>(
        static_cast<scalar_t*>(W), static_cast<const Acc*>(A), static_cast<const Acc*>(B), N, K, r, scaling, vec);
    return launched();
  });
}

}  // namespace lora_kernels
