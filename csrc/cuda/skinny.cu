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

  const int64_t grid_i = ceil_div(I, kBI);
  const int64_t grid_j = ceil_div(R, kBJ);
  TORCH_CHECK(grid_i <= INT32_MAX && grid_j <= 65535, "lora_kernels: thin product too large for one launch");
  const int64_t l_tiles = std::max<int64_t>(ceil_div(L, kBL), 1);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = grid_i * grid_j;
  int64_t splits = 1;
  if (blocks < 2 * sms) splits = std::min<int64_t>({l_tiles, ceil_div(2 * sms, blocks), kMaxSplits});
  const int64_t tiles_per_split = ceil_div(l_tiles, splits);
  splits = ceil_div(l_tiles, tiles_per_split);
  prm.l_per_split = tiles_per_split * kBL;

  const auto stream = current_stream();
  const auto acc_dtype = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty({splits, I, R}, p.options().dtype(acc_dtype));
    prm.partial = partial.data_ptr();
  }
  const dim3 grid(static_cast<unsigned>(grid_i), static_cast<unsigned>(grid_j), static_cast<unsigned>(splits));

  LORA_DISPATCH_FLOAT_TYPES(p.scalar_type(), "lora_kernels thin product", [&] {
    LORA_BOOL_SWITCH(dropout.enabled, kMask, [&] {
      skinny_kernel<scalar_t, kMask><<<grid, kThreads, 0, stream>>>(prm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (splits > 1) {
      const int64_t reduce_blocks = std::min<int64_t>(ceil_div(I * R, 256), 65535);
      reduce_splits_kernel<scalar_t>
          <<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(prm, static_cast<int>(splits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace lora_kernels
