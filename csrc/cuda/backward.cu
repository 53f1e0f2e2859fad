// lora_kernels::cuda_lora_backward — one pass over dy (or two thin products), one thin product, one GEMM:
//   1. g   = s · dy B                          (M, r)  fp16/bf16: one pass over dy computes both g and
//   2. dB  = dyᵀ xa                            (N, r)  dB (skinny.cu, launch_dy_pass; + a small ordered
//                                                      reduction of partials); else two thin products
//   3. dAᵀ = (x ⊙ D)ᵀ g                        (K, r)  thin product over the M rows, mask regenerated
//                                                      while x is loaded, written straight into dA (r, K)
//   4. dx  = (g A) ⊙ D + dy W0                 (M, K)  the fused GEMM (W0 read in place as W0ᵀ), one store:
//                                                      without dropout on sm_90 the TMA/wgmma kernel (sm90/),
//                                                      else the sm_80 one (gemm_tc.cuh: the low-rank tiles
//                                                      first, masked and scaled by 1/(1-p) in the accumulator)
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"
#include "sm90/gemm_sm90.h"

namespace lora_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed,
    bool need_grad_x) {
  LORA_CHECK_INPUT(grad_out, 2, x);
  LORA_CHECK_INPUT(x, 2, x);
  LORA_CHECK_INPUT(weight, 2, x);
  LORA_CHECK_INPUT(lora_A, 2, x);
  LORA_CHECK_INPUT(lora_B, 2, x);
  LORA_CHECK_INPUT(xa, 2, x);
  LORA_CHECK_FLOAT(x);
  const auto dtype = x.scalar_type();
  LORA_CHECK_DTYPE(grad_out, dtype);
  LORA_CHECK_DTYPE(weight, dtype);
  LORA_CHECK_DTYPE(lora_A, dtype);
  LORA_CHECK_DTYPE(lora_B, dtype);
  LORA_CHECK_DTYPE(xa, dtype);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  LORA_CHECK_SHAPE(grad_out, M, N);
  LORA_CHECK_SHAPE(weight, N, K);
  LORA_CHECK_SHAPE(lora_A, r, K);
  LORA_CHECK_SHAPE(lora_B, N, r);
  LORA_CHECK_SHAPE(xa, M, r);
  const Dropout dropout = make_dropout(dropout_p, seed, K, x);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor dy_c = grad_out.contiguous();
  const at::Tensor x_c = x.contiguous();
  const at::Tensor w_c = weight.contiguous();
  const at::Tensor A_c = lora_A.contiguous();
  const at::Tensor B_c = lora_B.contiguous();
  const at::Tensor xa_c = xa.contiguous();

  at::Tensor grad_A = at::empty({r, K}, x_c.options());
  at::Tensor grad_B = at::empty({N, r}, x_c.options());
  at::Tensor grad_x = need_grad_x ? at::empty({M, K}, x_c.options()) : at::empty({0}, x_c.options());
  at::Tensor g = at::empty({M, r}, x_c.options());
  // NOTE: not only the dx GEMM: the fp16/bf16 thin products run mma.sync as well.
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    require_sm80("cuda_lora_backward");
  }
  const Dropout no_dropout{};

  // 1+2. g = s · dy B and dB = dyᵀ xa (xa already holds s): one pass over dy for fp16/bf16 where
  // the cost model says so (launch_dy_pass), else two thin products:
  if (!launch_dy_pass(dy_c, B_c, xa_c, g, grad_B, scaling)) {
    // g: P = dy (M, N), Q[j, l] = B[l, j].
    launch_skinny(dy_c, N, 1, B_c, 1, r, g, r, 1, M, r, N, scaling, no_dropout, true);
    // dB: P[i, l] = dy[l, i], Q[j, l] = xa[l, j].
    launch_skinny(dy_c, 1, N, xa_c, 1, r, grad_B, r, 1, N, r, M, 1.0, no_dropout, true);
  }
  // 3. dAᵀ = (x ⊙ D)ᵀ g: P[i, l] = x[l, i] (mask element (l, i)), Q[j, l] = g[l, j]; out[i, j] = dA[j, i].
  launch_skinny(x_c, 1, K, g, 1, r, grad_A, 1, K, K, r, M, 1.0, dropout, /*mask_col_is_l=*/false);

  // 4. dx = (g A) ⊙ D + dy W0: GEMM (M, K) reducing over N; W[n, k] = W0[k, n], U[n, k] = A[k, n].
  if (need_grad_x && M > 0 && K > 0) {
    GemmParams p{};
    p.x = dy_c.data_ptr();
    p.sxm = N;
    p.sxk = 1;
    p.w = w_c.data_ptr();
    p.swn = 1;
    p.swk = K;
    p.l = g.data_ptr();
    p.slm = r;
    p.slk = 1;
    p.u = A_c.data_ptr();
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
#ifdef LORA_KERNELS_SM90
      // With dropout the sm_80 kernel runs (sm90_backward_eligible says why).
      if constexpr (kTensorCoreType<scalar_t>) {
        const sm90::GemmArgs a = sm90::backward_args(p.x, p.w, p.l, p.u, p.c, M, N, K, r);
        if (use_sm90_gemm("cuda_lora_backward", sm90::sm90_backward_eligible(a, dropout.enabled))) {
          return sm90::run_gemm<scalar_t, /*W_KMAJOR=*/false>(a, current_stream());
        }
      }
#endif
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
