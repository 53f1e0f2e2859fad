// The thin products of LoRA: one output axis is the rank r.
//
//   out[i, j] = scale · Σ_l (P ⊙ D)[i, l] · Q[j, l]        i < I, j < R (= r), l < L
//
//   xa  = (x ⊙ D) Aᵀ     I = M, L = K, mask on P = x
//   g   = s · dy B       I = M, L = N
//   dB  = s · dyᵀ xa     I = N, L = M
//   dAᵀ = (x ⊙ D)ᵀ g     I = K, L = M, mask on P = xᵀ; written straight into dA (r, K)
//
// Each block computes a 64 x 32 tile of out over one slice of the reduction
// axis l. The slices (split-K) fill the GPU when I·R is small (few tokens, or a
// reduction over the tokens for dA/dB); their fp32 partial sums are added by a
// second, tiny kernel in a fixed order, so results are deterministic. The
// dropout mask is regenerated while P is loaded: each thread loads P in groups
// of four neighbouring mask columns, one Philox call per group. The host plans the
// launches (plan_skinny, plan_dy_pass in host_plan.h; ops.cpp allocates the partials).
#include <algorithm>

#include "common.cuh"
#include "device_once.h"

namespace lora_kernels {
namespace skinny {

constexpr int kBI = kSkinnyBI, kBJ = kSkinnyBJ, kBL = kSkinnyBL, kThreads = 256;

using Params = SkinnyParams;

template <typename T, bool MASK>
__global__ void __launch_bounds__(kThreads) skinny_kernel(const Params p) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc sP[kBL][kBI + 1];
  __shared__ Acc sQ[kBL][kBJ + 1];

  const int tid = threadIdx.x;
  const int ti = tid / 16;  // out rows ti*4 .. ti*4+3
  const int tj = tid % 16;  // out cols tj*2, tj*2+1
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBJ;
  const int64_t l_begin = static_cast<int64_t>(blockIdx.z) * p.l_per_split;
  const int64_t l_end = min(p.L, l_begin + p.l_per_split);
  const T* P = static_cast<const T*>(p.p);
  const T* Q = static_cast<const T*>(p.q);
  const Acc keep_scale = static_cast<Acc>(p.keep_scale);

  Acc acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = Acc(0);

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kBL) {
    // P tile: kBI x kBL = 512 groups of 4 elements, 2 per thread.
#pragma unroll
    for (int gi = 0; gi < (kBI * kBL / 4) / kThreads; ++gi) {
      const int g = tid + gi * kThreads;
      int il, ll;
      if (p.group_along_l) {
        il = g / (kBL / 4);
        ll = (g % (kBL / 4)) * 4;
      } else {
        ll = g / (kBI / 4);
        il = (g % (kBI / 4)) * 4;
      }
      Acc v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t gi_ = i0 + il + (p.group_along_l ? 0 : e);
        const int64_t gl = l0 + ll + (p.group_along_l ? e : 0);
        v[e] = (gi_ < p.I && gl < l_end) ? to_acc(P[gi_ * p.psi + gl * p.psl]) : Acc(0);
      }
      if constexpr (MASK) {
        // The group's first element is a multiple-of-4 column of the mask.
        const int64_t row = p.mask_col_is_l ? i0 + il : l0 + ll;
        const int64_t col = p.mask_col_is_l ? l0 + ll : i0 + il;
        const uint4 w = mask_words(load_seed(p.seed), row, col, p.groups);
        v[0] *= keep_bit(w.x, p.threshold) ? keep_scale : Acc(0);
        v[1] *= keep_bit(w.y, p.threshold) ? keep_scale : Acc(0);
        v[2] *= keep_bit(w.z, p.threshold) ? keep_scale : Acc(0);
        v[3] *= keep_bit(w.w, p.threshold) ? keep_scale : Acc(0);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (p.group_along_l)
          sP[ll + e][il] = v[e];
        else
          sP[ll][il + e] = v[e];
      }
    }
    // Q tile: kBJ x kBL, 4 elements per thread, the unit-stride axis fastest.
#pragma unroll
    for (int e = 0; e < (kBJ * kBL) / kThreads; ++e) {
      const int idx = e * kThreads + tid;
      int jj, ll;
      if (p.qsl == 1) {
        jj = idx / kBL;
        ll = idx % kBL;
      } else {
        jj = idx % kBJ;
        ll = idx / kBJ;
      }
      const int64_t gj = j0 + jj, gl = l0 + ll;
      sQ[ll][jj] = (gj < p.R && gl < l_end) ? to_acc(Q[gj * p.qsj + gl * p.qsl]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int l = 0; l < kBL; ++l) {
      Acc a[4], b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sP[l][ti * 4 + i];
      b[0] = sQ[l][tj * 2];
      b[1] = sQ[l][tj * 2 + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[i][0] = fma_acc(a[i], b[0], acc[i][0]);
        acc[i][1] = fma_acc(a[i], b[1], acc[i][1]);
      }
    }
    __syncthreads();
  }

  const Acc scale = static_cast<Acc>(p.scale);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gi_ = i0 + ti * 4 + i;
    if (gi_ >= p.I) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t gj = j0 + tj * 2 + j;
      if (gj >= p.R) continue;
      if (gridDim.z == 1) {
        static_cast<T*>(p.out)[gi_ * p.osi + gj * p.osj] = from_acc<T>(scale * acc[i][j]);
      } else {
        static_cast<Acc*>(p.partial)[(static_cast<int64_t>(blockIdx.z) * p.I + gi_) * p.R + gj] = acc[i][j];
      }
    }
  }
}

// out[i, j] = scale · Σ_s partial[s, i, j], the slices added in order.
template <typename T>
__global__ void __launch_bounds__(256) reduce_splits_kernel(const Params p, int splits) {
  using Acc = typename AccOf<T>::type;
  const Acc* partial = static_cast<const Acc*>(p.partial);
  const int64_t total = p.I * p.R;
  const Acc scale = static_cast<Acc>(p.scale);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = Acc(0);
    for (int s = 0; s < splits; ++s) sum += partial[s * total + idx];
    const int64_t i = idx / p.R, j = idx % p.R;
    static_cast<T*>(p.out)[i * p.osi + j * p.osj] = from_acc<T>(scale * sum);
  }
}


// --------------------------------------------------------------------------- //
// fp16 / bf16: the same product on tensor cores (mma.sync m16n8k16, fp32 accumulators)
// --------------------------------------------------------------------------- //
//
// A block of 4 warps computes a 64 x BJ tile of out (BJ = 16, 32 or 64, fitted to r; each warp
// 16 rows) over its slice of l, in 64-wide steps. Tiles are staged in shared memory in their
// global layout, moved with 16-byte loads: P as [i][l] (P_LCONTIG: xa, g) or [l][i] (dB, dAᵀ),
// Q as [j][l] (Q_LCONTIG: xa) or [l][j] (g, dB, dAᵀ); fragments come from ldmatrix, with .trans
// for the layouts where the mma's reduction axis is not the contiguous one. The next step's
// tiles are loaded into registers while this step's are multiplied.
//
// Dropout: the mask is applied to P on its way to shared memory, dropped elements set to zero
// (exact); 1/(1-p) is folded into the final scale. The mask's (row, col) are the staged tile's
// (row, col): (i, l) for xa, (l, i) for dAᵀ.
namespace tc {

constexpr int kBI = kSkinnyBI, kBL = kSkinnyTcBL, kThreads = 128, kPad = 8;

// A tile of ROWS x COLS elements (COLS contiguous in memory) in chunks of 8: ROWS*COLS/8/kThreads
// 16-byte chunks per thread. OOB elements read as zero.
template <int ROWS, int COLS>
struct TileLoader {
  static constexpr int kChunks = ROWS * COLS / 8 / kThreads;
  static_assert(ROWS * COLS / 8 % kThreads == 0, "tile must split evenly over the threads");
  uint4 regs[kChunks];

  __device__ __forceinline__ static void chunk_pos(int c, int& row, int& col) {
    const int idx = threadIdx.x + c * kThreads;
    row = idx / (COLS / 8);
    col = (idx % (COLS / 8)) * 8;
  }

  // base[row * ld + col], rows < rows_max, cols < cols_max; vec: 16-byte aligned rows.
  __device__ __forceinline__ void load(const uint16_t* base, int64_t ld, int64_t row0, int64_t col0,
                                       int64_t rows_max, int64_t cols_max, bool vec) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      int r, cl;
      chunk_pos(c, r, cl);
      const int64_t row = row0 + r, col = col0 + cl;
      if (vec && row < rows_max && col + 8 <= cols_max) {
        regs[c] = __ldg(reinterpret_cast<const uint4*>(base + row * ld + col));
      } else {
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (row < rows_max) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (col + e < cols_max) w[e / 2] |= static_cast<uint32_t>(base[row * ld + col + e]) << (16 * (e % 2));
          }
        }
        regs[c] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // Zero the elements the dropout mask drops; (mask_row0 + r, mask_col0 + cl) is a chunk's mask position.
  __device__ __forceinline__ void apply_mask(uint64_t seed, int64_t mask_row0, int64_t mask_col0, int64_t groups,
                                             uint32_t threshold) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      int r, cl;
      chunk_pos(c, r, cl);
      const uint4 lo = mask_words(seed, mask_row0 + r, mask_col0 + cl, groups);      // columns cl .. cl+3
      const uint4 hi = mask_words(seed, mask_row0 + r, mask_col0 + cl + 4, groups);  // cl+4 .. cl+7
      const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      uint32_t* v = reinterpret_cast<uint32_t*>(&regs[c]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (!keep_bit(words[e], threshold)) v[e / 2] &= (e % 2) ? 0x0000ffffu : 0xffff0000u;
      }
    }
  }

  __device__ __forceinline__ void store(uint16_t* smem, int ld_smem) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      int r, cl;
      chunk_pos(c, r, cl);
      *reinterpret_cast<uint4*>(smem + r * ld_smem + cl) = regs[c];
    }
  }
};

template <typename T, bool P_LCONTIG, bool Q_LCONTIG, bool MASK, int BJ>
__global__ void __launch_bounds__(kThreads) skinny_tc_kernel(const Params p, bool p_vec, bool q_vec) {
  static_assert(BJ % 16 == 0, "BJ: pairs of n8 tiles");
  constexpr int NT = BJ / 8;
  // Shared-memory tiles, rows padded by 16 bytes (conflict-free ldmatrix).
  constexpr int kLdP = (P_LCONTIG ? kBL : kBI) + kPad;
  constexpr int kLdQ = (Q_LCONTIG ? kBL : BJ) + kPad;
  __shared__ __align__(16) uint16_t sP[(P_LCONTIG ? kBI : kBL) * kLdP];
  __shared__ __align__(16) uint16_t sQ[(Q_LCONTIG ? BJ : kBL) * kLdQ];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BJ;
  const int64_t l_begin = static_cast<int64_t>(blockIdx.z) * p.l_per_split;
  const int64_t l_end = min(p.L, l_begin + p.l_per_split);
  const uint16_t* P = static_cast<const uint16_t*>(p.p);
  const uint16_t* Q = static_cast<const uint16_t*>(p.q);
  // P as (rows, cols) with cols contiguous: (i, l) or (l, i); Q: (j, l) or (l, j).
  const int64_t p_ld = P_LCONTIG ? p.psi : p.psl;
  const int64_t q_ld = Q_LCONTIG ? p.qsj : p.qsl;

  TileLoader<P_LCONTIG ? kBI : kBL, P_LCONTIG ? kBL : kBI> tp;
  TileLoader<Q_LCONTIG ? BJ : kBL, Q_LCONTIG ? kBL : BJ> tq;
  auto load = [&](int64_t l0) {
    if constexpr (P_LCONTIG) {
      tp.load(P, p_ld, i0, l0, p.I, l_end, p_vec);
      if constexpr (MASK) tp.apply_mask(load_seed(p.seed), i0, l0, p.groups, p.threshold);
    } else {
      tp.load(P, p_ld, l0, i0, l_end, p.I, p_vec);
      if constexpr (MASK) tp.apply_mask(load_seed(p.seed), l0, i0, p.groups, p.threshold);
    }
    if constexpr (Q_LCONTIG) {
      tq.load(Q, q_ld, j0, l0, p.R, l_end, q_vec);
    } else {
      tq.load(Q, q_ld, l0, j0, l_end, p.R, q_vec);
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  if (l_begin < l_end) load(l_begin);
  for (int64_t l0 = l_begin; l0 < l_end; l0 += kBL) {
    __syncthreads();  // everyone is done reading the previous step's tiles
    tp.store(sP, kLdP);
    tq.store(sQ, kLdQ);
    __syncthreads();
    if (l0 + kBL < l_end) load(l0 + kBL);  // in flight while this step is multiplied
#pragma unroll
    for (int kk = 0; kk < kBL; kk += 16) {
      uint32_t af[4];
      if constexpr (P_LCONTIG) {
        ldmatrix_x4(af, sP + (warp * 16 + (lane & 15)) * kLdP + kk + (lane >> 4) * 8);
      } else {
        const int q = lane >> 3;
        ldmatrix_x4_trans(af, sP + (kk + (q >> 1) * 8 + (lane & 7)) * kLdP + warp * 16 + (q & 1) * 8);
      }
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        uint32_t r[4];
        if constexpr (Q_LCONTIG) {
          const int n = nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(r, sQ + n * kLdQ + kk + ((lane >> 3) & 1) * 8);
        } else {
          const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(r, sQ + k * kLdQ + nj * 16 + (lane >> 4) * 8);
        }
        const uint32_t b0[2] = {r[0], r[1]};
        const uint32_t b1[2] = {r[2], r[3]};
        mma_16816<T>(acc[2 * nj], af, b0);
        mma_16816<T>(acc[2 * nj + 1], af, b1);
      }
    }
  }

  // Accumulator element e of n-tile n: row warp*16 + lane/4 + (e/2)*8, col n*8 + (lane%4)*2 + e%2.
  const float scale = static_cast<float>(p.scale * (MASK ? p.keep_scale : 1.0));
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t gi = i0 + warp * 16 + (lane >> 2) + (e >> 1) * 8;
      const int64_t gj = j0 + n * 8 + (lane & 3) * 2 + (e & 1);
      if (gi >= p.I || gj >= p.R) continue;
      if (gridDim.z == 1) {
        static_cast<T*>(p.out)[gi * p.osi + gj * p.osj] = from_acc<T>(scale * acc[n][e]);
      } else {
        // NOTE: partials are unscaled; the reduction applies p.scale, so keep_scale goes in here.
        static_cast<float*>(p.partial)[(static_cast<int64_t>(blockIdx.z) * p.I + gi) * p.R + gj] =
            (MASK ? static_cast<float>(p.keep_scale) : 1.f) * acc[n][e];
      }
    }
}

// The backward's one pass over dy (fp16/bf16): g = s · dy B and dB = dyᵀ xa from the same dy tiles.
// The grid is plan_dy_pass's (host_plan.h): blockIdx = (column range, row range, j tile). A program
// visits its 64 x 64 tiles of dy row block by row block, the column tiles of its range inside:
//   g  (64 x BJ of the row block) += dy_tile · B_tile       in registers, stored after the range's
//                                                            last column tile (complete or a partial)
//   dB (64 x BJ of the column tile) += dy_tileᵀ · xa_tile   in shared memory over the row range,
//                                                            stored at the end (complete or a partial)
// Each warp owns 16 rows of both products (rows of dy for g, columns of dy for dB). The dB
// accumulators are kept in the mma's fragment order, one slot per (tile, warp, fragment, lane):
// every element has one owner thread, so it needs no synchronisation and adds in a fixed order.
// (DyPassParams: launch.h.)

template <typename T, int BJ>
__global__ void __launch_bounds__(kThreads) dy_pass_kernel(const DyPassParams p, bool dy_vec, bool b_vec,
                                                           bool xa_vec) {
  static_assert(BJ % 16 == 0, "BJ: pairs of n8 tiles");
  constexpr int NT = BJ / 8;
  constexpr int kLdDy = 64 + kPad, kLdJ = BJ + kPad;
  __shared__ __align__(16) uint16_t sDy[64 * kLdDy];  // [m][n]
  __shared__ __align__(16) uint16_t sB[64 * kLdJ];    // [n][j]
  __shared__ __align__(16) uint16_t sXa[64 * kLdJ];   // [m][j]
  extern __shared__ float sAcc[];                      // dB: [tile][warp][NT][4][lane]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ct0 = static_cast<int64_t>(blockIdx.x) * p.cb;  // first column tile of the range
  const int64_t rb0 = static_cast<int64_t>(blockIdx.y) * p.rb;  // first row block of the range
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * BJ;
  const int ncb = static_cast<int>(min(p.cb, p.col_tiles - ct0));
  const int nrb = static_cast<int>(min(p.rb, p.row_blocks - rb0));
  const int steps = ncb * nrb;
  const uint16_t* dy = static_cast<const uint16_t*>(p.dy);
  const uint16_t* B = static_cast<const uint16_t*>(p.b);
  const uint16_t* xa = static_cast<const uint16_t*>(p.xa);
  auto acc_slot = [&](int t, int n, int e) { return ((((t * 4 + warp) * NT + n) * 4 + e) << 5) + lane; };

  TileLoader<64, 64> tdy;
  TileLoader<64, BJ> tb, txa;
  // Step s: row block rb0 + s / ncb, column tile ct0 + s % ncb; xa only at a row block's first step.
  auto load = [&](int s) {
    const int64_t m0 = (rb0 + s / ncb) * 64, n0 = (ct0 + s % ncb) * 64;
    tdy.load(dy, p.N, m0, n0, p.M, p.N, dy_vec);
    tb.load(B, p.R, n0, j0, p.N, p.R, b_vec);
    if (s % ncb == 0) txa.load(xa, p.R, m0, j0, p.M, p.R, xa_vec);
  };

  for (int t = 0; t < ncb; ++t)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sAcc[acc_slot(t, n, e)] = 0.f;
  float gacc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) gacc[n][0] = gacc[n][1] = gacc[n][2] = gacc[n][3] = 0.f;

  load(0);
  for (int s = 0; s < steps; ++s) {
    const int t = s % ncb;
    __syncthreads();  // everyone is done reading the previous step's tiles
    tdy.store(sDy, kLdDy);
    tb.store(sB, kLdJ);
    if (t == 0) txa.store(sXa, kLdJ);
    __syncthreads();
    if (s + 1 < steps) load(s + 1);  // in flight while this step is multiplied

    float dacc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) dacc[n][0] = dacc[n][1] = dacc[n][2] = dacc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 64; kk += 16) {
      const int q = lane >> 3;
      // g: A = dy rows warp*16.. (k = n, contiguous), B = B_tile [k = n][j] (.trans).
      uint32_t af[4];
      ldmatrix_x4(af, sDy + (warp * 16 + (lane & 15)) * kLdDy + kk + (lane >> 4) * 8);
      // dB: A = dyᵀ, rows = dy columns warp*16.., k = m: sDy read as [k][i] (.trans).
      uint32_t aT[4];
      ldmatrix_x4_trans(aT, sDy + (kk + (q >> 1) * 8 + (lane & 7)) * kLdDy + warp * 16 + (q & 1) * 8);
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
        uint32_t rB[4], rx[4];
        ldmatrix_x4_trans(rB, sB + k * kLdJ + nj * 16 + (lane >> 4) * 8);
        ldmatrix_x4_trans(rx, sXa + k * kLdJ + nj * 16 + (lane >> 4) * 8);
        const uint32_t b0[2] = {rB[0], rB[1]}, b1[2] = {rB[2], rB[3]};
        const uint32_t x0[2] = {rx[0], rx[1]}, x1[2] = {rx[2], rx[3]};
        mma_16816<T>(gacc[2 * nj], af, b0);
        mma_16816<T>(gacc[2 * nj + 1], af, b1);
        mma_16816<T>(dacc[2 * nj], aT, x0);
        mma_16816<T>(dacc[2 * nj + 1], aT, x1);
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sAcc[acc_slot(t, n, e)] += dacc[n][e];

    if (t == ncb - 1) {  // the row block's last column tile of this range: store g
      const int64_t m0 = (rb0 + s / ncb) * 64;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t gi = m0 + warp * 16 + (lane >> 2) + (e >> 1) * 8;
          const int64_t gj = j0 + n * 8 + (lane & 3) * 2 + (e & 1);
          if (gi < p.M && gj < p.R) {
            if (p.g_partial) {
              p.g_partial[(static_cast<int64_t>(blockIdx.x) * p.M + gi) * p.R + gj] = gacc[n][e];
            } else {
              static_cast<T*>(p.g)[gi * p.R + gj] = from_acc<T>(p.scale * gacc[n][e]);
            }
          }
          gacc[n][e] = 0.f;
        }
    }
  }

  // dB of the range's column tiles (each thread its own slots: no synchronisation needed).
  for (int t = 0; t < ncb; ++t)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t gi = (ct0 + t) * 64 + warp * 16 + (lane >> 2) + (e >> 1) * 8;
        const int64_t gj = j0 + n * 8 + (lane & 3) * 2 + (e & 1);
        if (gi >= p.N || gj >= p.R) continue;
        const float v = sAcc[acc_slot(t, n, e)];
        if (p.db_partial) {
          p.db_partial[(static_cast<int64_t>(blockIdx.y) * p.N + gi) * p.R + gj] = v;
        } else {
          static_cast<T*>(p.db)[gi * p.R + gj] = from_acc<T>(v);
        }
      }
}

}  // namespace tc


template <typename T, bool P_LCONTIG, bool Q_LCONTIG, bool MASK>
LaunchStatus launch_skinny_tc_layout(const Params& prm, cudaStream_t stream) {
  const auto aligned = [](const void* ptr, int64_t ld) { return aligned16(ptr) && ld % 8 == 0; };
  const bool p_vec = aligned(prm.p, P_LCONTIG ? prm.psi : prm.psl);
  const bool q_vec = aligned(prm.q, Q_LCONTIG ? prm.qsj : prm.qsl);
  const int64_t bj = skinny_tc_block_j(prm.R);
  const int64_t splits = ceil_div(std::max<int64_t>(prm.L, 1), prm.l_per_split);
  const dim3 grid(static_cast<unsigned>(ceil_div(prm.I, tc::kBI)), static_cast<unsigned>(ceil_div(prm.R, bj)),
                  static_cast<unsigned>(splits));
  auto go = [&](auto kernel) {
    kernel<<<grid, tc::kThreads, 0, stream>>>(prm, p_vec, q_vec);
    return launched();
  };
  if (bj == 16) return go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 16>);
  else if (bj == 32) return go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 32>);
  else return go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 64>);
}

// The tensor-core kernel, for a product it takes (skinny_tc_applies, host_plan.h: plan.tc).
template <typename T>
LaunchStatus launch_skinny_tc(const Params& prm, bool mask, cudaStream_t stream) {
  const bool p_l = prm.psl == 1, q_l = prm.qsl == 1;
  if (p_l && q_l) {
    return LORA_BOOL_SWITCH(mask, kMask, [&] { return launch_skinny_tc_layout<T, true, true, kMask>(prm, stream); });
  } else if (p_l) {
    return launch_skinny_tc_layout<T, true, false, false>(prm, stream);
  } else {
    return LORA_BOOL_SWITCH(mask, kMask, [&] { return launch_skinny_tc_layout<T, false, false, kMask>(prm, stream); });
  }
}

template <typename T, int BJ>
LaunchStatus launch_dy_pass_kernel(const DyPassParams& prm, dim3 grid, int smem, bool dy_vec, bool b_vec,
                                   bool xa_vec, cudaStream_t stream) {
  // NOTE: the dB accumulators and the static tiles may exceed the 48 KB default: the attribute is
  // raised to the plan's budget once per device (per instantiation: the static lives in this template).
  static PerDeviceOnce once;
  const cudaError_t err = once([&] {
    return cudaFuncSetAttribute(tc::dy_pass_kernel<T, BJ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(kDyPassAccBytes));
  });
  if (err != cudaSuccess) return {err, {}};
  tc::dy_pass_kernel<T, BJ><<<grid, tc::kThreads, smem, stream>>>(prm, dy_vec, b_vec, xa_vec);
  return launched();
}

}  // namespace skinny

LaunchStatus launch_skinny(DType dtype, const SkinnyParams& prm, const SkinnyPlan& plan, bool mask,
                           cudaStream_t stream) {
  using namespace skinny;
  const dim3 grid(static_cast<unsigned>(plan.grid_i), static_cast<unsigned>(plan.grid_j),
                  static_cast<unsigned>(plan.splits));
  return LORA_DISPATCH_FLOAT_TYPES(dtype, [&] {
    LaunchStatus status;
    bool done = false;
    if constexpr (kTensorCoreType<scalar_t>) {
      if (plan.tc) {
        status = launch_skinny_tc<scalar_t>(prm, mask, stream);
        done = true;
      }
    }
    if (!done) {
      status = LORA_BOOL_SWITCH(mask, kMask, [&] {
        skinny_kernel<scalar_t, kMask><<<grid, kThreads, 0, stream>>>(prm);
        return launched();
      });
    }
    if (!status.ok()) return status;
    if (plan.splits > 1) {
      const int64_t reduce_blocks = std::min<int64_t>(ceil_div(prm.I * prm.R, 256), 65535);
      reduce_splits_kernel<scalar_t>
          <<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(prm, static_cast<int>(plan.splits));
      return launched();
    }
    return status;
  });
}

LaunchStatus launch_dy_pass(DType dtype, const DyPassParams& prm, const DyPassPlan& plan, double scaling,
                            cudaStream_t stream) {
  using namespace skinny;
  const int64_t M = prm.M, N = prm.N, R = prm.R;
  const bool dy_vec = aligned16(prm.dy) && N % 8 == 0;
  const bool b_vec = aligned16(prm.b) && R % 8 == 0;
  const bool xa_vec = aligned16(prm.xa) && R % 8 == 0;
  const dim3 grid(static_cast<unsigned>(plan.grid_n), static_cast<unsigned>(plan.grid_m),
                  static_cast<unsigned>(plan.grid_j));
  const int smem = static_cast<int>(plan.acc_smem_bytes);

  return LORA_DISPATCH_FLOAT_TYPES(dtype, [&] {
    LaunchStatus status;
    if constexpr (kTensorCoreType<scalar_t>) {
      if (plan.bj == 16) status = launch_dy_pass_kernel<scalar_t, 16>(prm, grid, smem, dy_vec, b_vec, xa_vec, stream);
      else if (plan.bj == 32) status = launch_dy_pass_kernel<scalar_t, 32>(prm, grid, smem, dy_vec, b_vec, xa_vec, stream);
      else status = launch_dy_pass_kernel<scalar_t, 64>(prm, grid, smem, dy_vec, b_vec, xa_vec, stream);
      if (!status.ok()) return status;
      // The partials, added in a fixed order (reduce_splits_kernel: out = scale · Σ_s partial[s]).
      auto reduce = [&](float* partial, void* out, int64_t I, int64_t splits, double scale) {
        Params rp{};
        rp.partial = partial;
        rp.out = out;
        rp.osi = R;
        rp.osj = 1;
        rp.I = I;
        rp.R = R;
        rp.scale = scale;
        const int64_t blocks = std::min<int64_t>(ceil_div(I * R, 256), 65535);
        reduce_splits_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(rp, static_cast<int>(splits));
        return launched();
      };
      if (prm.g_partial) status = reduce(prm.g_partial, prm.g, M, plan.grid_n, scaling);
      if (!status.ok()) return status;
      if (prm.db_partial) status = reduce(prm.db_partial, prm.db, N, plan.grid_m, 1.0);
    }
    return status;
  });
}

}  // namespace lora_kernels
