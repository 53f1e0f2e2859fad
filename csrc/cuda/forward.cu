// lora_kernels::cuda_lora_forward — two launches:
//   1. xa = s · (x ⊙ D) Aᵀ           the thin product (skinny.cu), mask regenerated while x is loaded;
//                                     saved for backward already scaled (reference.lora_forward)
//   2. y  = xa Bᵀ + x W0ᵀ + b         the fused GEMM, one store of y: on sm_90 the TMA/wgmma kernel
//                                     (sm90/: base k-tiles, then the low-rank ones), else the
//                                     sm_80 kernel (gemm_tc.cuh: low-rank k-tiles first); see
//                                     use_sm90_gemm
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"
#include "sm90/gemm_sm90.h"

namespace lora_kernels {

std::tuple<at::Tensor, at::Tensor> cuda_lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                     double scaling, double dropout_p, const at::Tensor& seed) {
  LORA_CHECK_INPUT(x, 2, x);
  LORA_CHECK_INPUT(weight, 2, x);
  LORA_CHECK_INPUT(lora_A, 2, x);
  LORA_CHECK_INPUT(lora_B, 2, x);
  LORA_CHECK_FLOAT(x);
  const auto dtype = x.scalar_type();
  LORA_CHECK_DTYPE(weight, dtype);
  LORA_CHECK_DTYPE(lora_A, dtype);
  LORA_CHECK_DTYPE(lora_B, dtype);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  LORA_CHECK_SHAPE(weight, N, K);
  LORA_CHECK_SHAPE(lora_A, r, K);
  LORA_CHECK_SHAPE(lora_B, N, r);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    LORA_CHECK_INPUT(*bias, 1, x);
    LORA_CHECK_DTYPE(*bias, dtype);
    LORA_CHECK_SHAPE(*bias, N);
  }
  const Dropout dropout = make_dropout(dropout_p, seed, K, x);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor w_c = weight.contiguous();
  const at::Tensor A_c = lora_A.contiguous();
  const at::Tensor B_c = lora_B.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();

  at::Tensor y = at::empty({M, N}, x_c.options());
  at::Tensor xa = at::empty({M, r}, x_c.options());
  if (M == 0) return {y, xa};
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    require_sm80("cuda_lora_forward");
  }

  // 1. xa = s · (x ⊙ D) Aᵀ: P = x (M, K), Q = A (r, K); mask element (i, l).
  launch_skinny(x_c, K, 1, A_c, K, 1, xa, r, 1, M, r, K, scaling, dropout, /*mask_col_is_l=*/true);

  // 2. y = xa Bᵀ + x W0ᵀ + b.
  GemmParams p{};
  p.x = x_c.data_ptr();
  p.sxm = K;
  p.sxk = 1;
  p.w = w_c.data_ptr();
  p.swn = K;
  p.swk = 1;
  p.l = xa.data_ptr();
  p.slm = r;
  p.slk = 1;
  p.u = B_c.data_ptr();
  p.sun = r;
  p.suk = 1;
  p.bias = has_bias ? bias_c.data_ptr() : nullptr;
  p.c = y.data_ptr();
  p.ldc = N;
  p.M = M;
  p.N = N;
  p.K = K;
  p.R = r;
  p.pre_scale = 1.0;
  p.x_vec = aligned16(p.x) && K % 8 == 0;
  p.w_vec = aligned16(p.w) && K % 8 == 0;
  p.l_vec = aligned16(p.l) && r % 8 == 0;
  p.u_vec = aligned16(p.u) && r % 8 == 0;
  p.c_vec2 = reinterpret_cast<uintptr_t>(p.c) % 4 == 0 && N % 2 == 0;

  LORA_DISPATCH_FLOAT_TYPES(dtype, "cuda_lora_forward", [&] {
#ifdef LORA_KERNELS_SM90
    if constexpr (kTensorCoreType<scalar_t>) {
      const sm90::GemmArgs a = sm90::forward_args(p.x, p.w, p.l, p.u, p.bias, p.c, M, N, K, r);
      if (use_sm90_gemm("cuda_lora_forward", sm90::sm90_gemm_eligible(a))) {
        return sm90::run_gemm<scalar_t, /*W_KMAJOR=*/true>(a, current_stream());
      }
    }
#endif
    LORA_BOOL_SWITCH(has_bias, kBias, [&] {
      if constexpr (kTensorCoreType<scalar_t>) {
        tc::launch_gemm<scalar_t, /*B_KMAJOR=*/true, kBias, /*MASK=*/false>(p);
      } else {
        simt::launch_gemm<scalar_t, kBias, /*MASK=*/false>(p);
      }
    });
  });
  return {y, xa};
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_lora_forward", &cuda_lora_forward); }

}  // namespace lora_kernels
