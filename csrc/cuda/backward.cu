// lora_kernels::cuda_lora_backward — four launches (three thin products, one GEMM):
//   1. g   = s · dy B                          (M, r)  thin product over the N columns of dy
//   2. dB  = s · dyᵀ xa                        (N, r)  thin product over the M rows
//   3. dAᵀ = (x ⊙ D)ᵀ g                        (K, r)  thin product over the M rows, mask regenerated
//                                                      while x is loaded, written straight into dA (r, K)
//   4. dx  = (g A) ⊙ D + dy W0                 (M, K)  the fused GEMM: the low-rank tiles first, masked
//                                                      and scaled by 1/(1-p) in the accumulator, then the
//                                                      base tiles (W0 read in place as W0ᵀ), one store
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"

namespace lora_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_lora_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& xa_in, double scaling, double dropout_p, int64_t seed,
    bool need_grad_x) {
  LORA_CHECK_INPUT(dy_in, 2, x_in);
  LORA_CHECK_INPUT(x_in, 2, x_in);
  LORA_CHECK_INPUT(weight_in, 2, x_in);
  LORA_CHECK_INPUT(A_in, 2, x_in);
  LORA_CHECK_INPUT(B_in, 2, x_in);
  LORA_CHECK_INPUT(xa_in, 2, x_in);
  LORA_CHECK_FLOAT(x_in);
  const auto dtype = x_in.scalar_type();
  LORA_CHECK_DTYPE(dy_in, dtype);
  LORA_CHECK_DTYPE(weight_in, dtype);
  LORA_CHECK_DTYPE(A_in, dtype);
  LORA_CHECK_DTYPE(B_in, dtype);
  LORA_CHECK_DTYPE(xa_in, dtype);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0), r = A_in.size(0);
  LORA_CHECK_SHAPE(dy_in, M, N);
  LORA_CHECK_SHAPE(weight_in, N, K);
  LORA_CHECK_SHAPE(A_in, r, K);
  LORA_CHECK_SHAPE(B_in, N, r);
  LORA_CHECK_SHAPE(xa_in, M, r);
  const Dropout dropout = make_dropout(dropout_p, seed, K);

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor A = A_in.contiguous();
  const at::Tensor B = B_in.contiguous();
  const at::Tensor xa = xa_in.contiguous();

  at::Tensor grad_A = at::empty({r, K}, x.options());
  at::Tensor grad_B = at::empty({N, r}, x.options());
  at::Tensor grad_x = need_grad_x ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor g = at::empty({M, r}, x.options());
  if ((dtype == at::kHalf || dtype == at::kBFloat16) && need_grad_x && M > 0) {
    require_sm80("cuda_lora_backward");
  }
  const Dropout no_dropout{};

  // 1. g = s · dy B: P = dy (M, N), Q[j, l] = B[l, j].
  launch_skinny(dy, N, 1, B, 1, r, g, r, 1, M, r, N, scaling, no_dropout, true);
  // 2. dB = s · dyᵀ xa: P[i, l] = dy[l, i], Q[j, l] = xa[l, j].
  launch_skinny(dy, 1, N, xa, 1, r, grad_B, r, 1, N, r, M, scaling, no_dropout, true);
  // 3. dAᵀ = (x ⊙ D)ᵀ g: P[i, l] = x[l, i] (mask element (l, i)), Q[j, l] = g[l, j]; out[i, j] = dA[j, i].
  launch_skinny(x, 1, K, g, 1, r, grad_A, 1, K, K, r, M, 1.0, dropout, /*mask_col_is_l=*/false);

  // 4. dx = (g A) ⊙ D + dy W0: GEMM (M, K) reducing over N; W[n, k] = W0[k, n], U[n, k] = A[k, n].
  if (need_grad_x && M > 0 && K > 0) {
    GemmParams p{};
    p.x = dy.data_ptr();
    p.sxm = N;
    p.sxk = 1;
    p.w = weight.data_ptr();
    p.swn = 1;
    p.swk = K;
    p.l = g.data_ptr();
    p.slm = r;
    p.slk = 1;
    p.u = A.data_ptr();
    p.sun = 1;
    p.suk = K;
    p.bias = nullptr;
    p.c = grad_x.data_ptr();
    p.ldc = K;
    p.M = M;
    p.N = K;
    p.K = N;
    p.R = r;
    p.pre_scale = dropout.enabled ? dropout.keep_scale : 1.0;
    p.seed = dropout.seed;
    p.threshold = dropout.threshold;
    p.mask_groups = dropout.groups;
    p.x_vec = aligned16(p.x) && N % 8 == 0;
    p.l_vec = aligned16(p.l) && r % 8 == 0;
    // [k][n] layout: rows of W0 and A are contiguous along the output axis (length K).
    p.w_vec = aligned16(p.w) && K % 8 == 0;
    p.u_vec = aligned16(p.u) && K % 8 == 0;
    p.c_vec2 = reinterpret_cast<uintptr_t>(p.c) % 4 == 0 && K % 2 == 0;

    LORA_DISPATCH_FLOAT_TYPES(dtype, "cuda_lora_backward", [&] {
      LORA_BOOL_SWITCH(dropout.enabled, kMask, [&] {
        if constexpr (kTensorCoreType<scalar_t>) {
          tc::launch_gemm<scalar_t, /*B_KMAJOR=*/false, /*BIAS=*/false, kMask>(p);
        } else {
          simt::launch_gemm<scalar_t, /*BIAS=*/false, kMask>(p);
        }
      });
    });
  }
  return {grad_x, grad_A, grad_B};
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_lora_backward", &cuda_lora_backward); }

}  // namespace lora_kernels
