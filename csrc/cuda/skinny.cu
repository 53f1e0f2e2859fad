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
// of four neighbouring mask columns, one Philox call per group.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace lora_kernels {
namespace skinny {

constexpr int kBI = 64, kBJ = 32, kBL = 32, kThreads = 256;
constexpr int kMaxSplits = 256;

struct Params {
  const void* p;
  int64_t psi, psl;
  const void* q;
  int64_t qsj, qsl;
  void* out;
  int64_t osi, osj;
  void* partial;  // Acc [gridDim.z][I][R] when gridDim.z > 1
  int64_t I, R, L, l_per_split;
  double scale;
  const int64_t* seed;
  uint32_t threshold;
  double keep_scale;
  int64_t groups;
  bool group_along_l;  // P is loaded in groups of 4 along l (else along i); the mask's column axis
  bool mask_col_is_l;
};

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

constexpr int kBI = 64, kBL = 64, kThreads = 128, kPad = 8;

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

}  // namespace tc


// Whether the fp16/bf16 tensor-core kernel takes this product: one unit-stride axis in P and in
// Q, and with dropout the mask's columns along P's contiguous axis (true for every caller).
inline bool tc_kernel_applies(const Params& prm, at::ScalarType dtype, bool mask) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const bool p_l = prm.psl == 1, p_i = prm.psi == 1, q_l = prm.qsl == 1, q_j = prm.qsj == 1;
  if (!(p_l || p_i) || !(q_l || q_j)) return false;
  if (mask && prm.mask_col_is_l != p_l) return false;
  // The instantiated layouts: xa (P, Q l-contiguous, mask or not), g (P l-, Q j-contiguous),
  // dB and dAᵀ (P i-, Q j-contiguous; mask or not).
  return (p_l && q_l) || (p_l && !q_l && !mask) || (!p_l && !q_l);
}

inline int64_t tc_block_j(int64_t R) { return R <= 16 ? 16 : R <= 32 ? 32 : 64; }

template <typename T, bool P_LCONTIG, bool Q_LCONTIG, bool MASK>
void launch_skinny_tc_layout(const Params& prm, cudaStream_t stream) {
  const auto aligned = [](const void* ptr, int64_t ld) { return aligned16(ptr) && ld % 8 == 0; };
  const bool p_vec = aligned(prm.p, P_LCONTIG ? prm.psi : prm.psl);
  const bool q_vec = aligned(prm.q, Q_LCONTIG ? prm.qsj : prm.qsl);
  const int64_t bj = tc_block_j(prm.R);
  const int64_t splits = ceil_div(std::max<int64_t>(prm.L, 1), prm.l_per_split);
  const dim3 grid(static_cast<unsigned>(ceil_div(prm.I, tc::kBI)), static_cast<unsigned>(ceil_div(prm.R, bj)),
                  static_cast<unsigned>(splits));
  auto go = [&](auto kernel) {
    kernel<<<grid, tc::kThreads, 0, stream>>>(prm, p_vec, q_vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (bj == 16) go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 16>);
  else if (bj == 32) go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 32>);
  else go(tc::skinny_tc_kernel<T, P_LCONTIG, Q_LCONTIG, MASK, 64>);
}

// Launches the tensor-core kernel when it applies (see tc_kernel_applies); false otherwise.
template <typename T>
bool launch_skinny_tc(const Params& prm, bool mask, cudaStream_t stream) {
  if (!tc_kernel_applies(prm, std::is_same<T, __half>::value ? at::kHalf : at::kBFloat16, mask)) return false;
  const bool p_l = prm.psl == 1, q_l = prm.qsl == 1;
  if (p_l && q_l) {
    LORA_BOOL_SWITCH(mask, kMask, [&] { launch_skinny_tc_layout<T, true, true, kMask>(prm, stream); });
  } else if (p_l) {
    launch_skinny_tc_layout<T, true, false, false>(prm, stream);
  } else {
    LORA_BOOL_SWITCH(mask, kMask, [&] { launch_skinny_tc_layout<T, false, false, kMask>(prm, stream); });
  }
  return true;
}

}  // namespace skinny

void launch_skinny(const at::Tensor& p, int64_t psi, int64_t psl, const at::Tensor& q, int64_t qsj,
                   int64_t qsl, at::Tensor& out, int64_t osi, int64_t osj, int64_t I, int64_t R,
                   int64_t L, double scale, const Dropout& dropout, bool mask_col_is_l) {
  using namespace skinny;
  if (I == 0 || R == 0) return;
  TORCH_CHECK(p.scalar_type() == q.scalar_type() && p.scalar_type() == out.scalar_type(),
              "lora_kernels: skinny operands must share a dtype");

  Params prm;
  prm.p = p.data_ptr();
  prm.psi = psi;
  prm.psl = psl;
  prm.q = q.data_ptr();
  prm.qsj = qsj;
  prm.qsl = qsl;
  prm.out = out.data_ptr();
  prm.osi = osi;
  prm.osj = osj;
  prm.partial = nullptr;
  prm.I = I;
  prm.R = R;
  prm.L = L;
  prm.scale = scale;
  prm.seed = dropout.seed;
  prm.threshold = dropout.threshold;
  prm.keep_scale = dropout.keep_scale;
  prm.groups = dropout.groups;
  // With the mask on, its column axis is P's unit-stride axis (the launchers pass contiguous tensors).
  prm.group_along_l = dropout.enabled ? mask_col_is_l : psl == 1;
  prm.mask_col_is_l = mask_col_is_l;

  // NOTE: the fp16/bf16 tensor-core kernel tiles j by 16/32/64 (fitted to R) and steps l by 64,
  // the SIMT kernel by 32 and 32: the grid and the split below are planned for the kernel that runs.
  const bool tc_kernel = tc_kernel_applies(prm, p.scalar_type(), dropout.enabled);
  const int64_t bj = tc_kernel ? tc_block_j(R) : kBJ;
  const int64_t bl = tc_kernel ? tc::kBL : kBL;
  const int64_t grid_i = ceil_div(I, kBI);
  const int64_t grid_j = ceil_div(R, bj);
  TORCH_CHECK(grid_i <= INT32_MAX && grid_j <= 65535, "lora_kernels: thin product too large for one launch");
  const int64_t l_tiles = std::max<int64_t>(ceil_div(L, bl), 1);
  const int64_t sms = sm_count();
  const int64_t blocks = grid_i * grid_j;
  int64_t splits = 1;
  if (blocks < 2 * sms) splits = std::min<int64_t>({l_tiles, ceil_div(2 * sms, blocks), kMaxSplits});
  const int64_t tiles_per_split = ceil_div(l_tiles, splits);
  splits = ceil_div(l_tiles, tiles_per_split);
  prm.l_per_split = tiles_per_split * bl;

  const auto stream = current_stream();
  const auto acc_dtype = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty({splits, I, R}, p.options().dtype(acc_dtype));
    prm.partial = partial.data_ptr();
  }
  const dim3 grid(static_cast<unsigned>(grid_i), static_cast<unsigned>(grid_j), static_cast<unsigned>(splits));

  LORA_DISPATCH_FLOAT_TYPES(p.scalar_type(), "lora_kernels thin product", [&] {
    bool done = false;
    if constexpr (kTensorCoreType<scalar_t>) done = launch_skinny_tc<scalar_t>(prm, dropout.enabled, stream);
    if (!done) {
      LORA_BOOL_SWITCH(dropout.enabled, kMask, [&] {
        skinny_kernel<scalar_t, kMask><<<grid, kThreads, 0, stream>>>(prm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (splits > 1) {
      const int64_t reduce_blocks = std::min<int64_t>(ceil_div(I * R, 256), 65535);
      reduce_splits_kernel<scalar_t>
          <<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(prm, static_cast<int>(splits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace lora_kernels
