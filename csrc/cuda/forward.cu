// lora_kernels::cuda_lora_forward — two launches:
//   1. xa = (x ⊙ D) Aᵀ               the thin product (skinny.cu), mask regenerated while x is loaded
//   2. y  = s · xa Bᵀ + x W0ᵀ + b     the fused GEMM: the low-rank tiles first, scaled by s in the
//                                     accumulator, then the base tiles, bias, one store of y
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"
#include "gemm_simt.cuh"
#include "gemm_tc.cuh"

namespace lora_kernels {

std::tuple<at::Tensor, at::Tensor> cuda_lora_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                     const std::optional<at::Tensor>& bias_in,
                                                     const at::Tensor& A_in, const at::Tensor& B_in,
                                                     double scaling, double dropout_p, int64_t seed) {
  LORA_CHECK_INPUT(x_in, 2, x_in);
  LORA_CHECK_INPUT(weight_in, 2, x_in);
  LORA_CHECK_INPUT(A_in, 2, x_in);
  LORA_CHECK_INPUT(B_in, 2, x_in);
  LORA_CHECK_FLOAT(x_in);
  const auto dtype = x_in.scalar_type();
  LORA_CHECK_DTYPE(weight_in, dtype);
  LORA_CHECK_DTYPE(A_in, dtype);
  LORA_CHECK_DTYPE(B_in, dtype);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0), r = A_in.size(0);
  LORA_CHECK_SHAPE(weight_in, N, K);
  LORA_CHECK_SHAPE(A_in, r, K);
  LORA_CHECK_SHAPE(B_in, N, r);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    LORA_CHECK_INPUT(*bias_in, 1, x_in);
    LORA_CHECK_DTYPE(*bias_in, dtype);
    LORA_CHECK_SHAPE(*bias_in, N);
  }
  const Dropout dropout = make_dropout(dropout_p, seed, K);

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor A = A_in.contiguous();
  const at::Tensor B = B_in.contiguous();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();

  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, r}, x.options());
  if (M == 0) return {y, xa};
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    require_sm80("cuda_lora_forward");
  }

  // 1. xa = (x ⊙ D) Aᵀ: P = x (M, K), Q = A (r, K); mask element (i, l).
  launch_skinny(x, K, 1, A, K, 1, xa, r, 1, M, r, K, 1.0, dropout, /*mask_col_is_l=*/true);

  // 2. y = s · xa Bᵀ + x W0ᵀ + b.
  GemmParams p{};
  p.x = x.data_ptr();
  p.sxm = K;
  p.sxk = 1;
  p.w = weight.data_ptr();
  p.swn = K;
  p.swk = 1;
  p.l = xa.data_ptr();
  p.slm = r;
  p.slk = 1;
  p.u = B.data_ptr();
  p.sun = r;
  p.suk = 1;
  p.bias = has_bias ? bias.data_ptr() : nullptr;
  p.c = y.data_ptr();
  p.ldc = N;
  p.M = M;
  p.N = N;
  p.K = K;
  p.R = r;
  p.pre_scale = scaling;
  p.x_vec = aligned16(p.x) && K % 8 == 0;
  p.w_vec = aligned16(p.w) && K % 8 == 0;
  p.l_vec = aligned16(p.l) && r % 8 == 0;
  p.u_vec = aligned16(p.u) && r % 8 == 0;
  p.c_vec2 = reinterpret_cast<uintptr_t>(p.c) % 4 == 0 && N % 2 == 0;

  LORA_DISPATCH_FLOAT_TYPES(dtype, "cuda_lora_forward", [&] {
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
