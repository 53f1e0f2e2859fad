// The CUDA ops' torch side: input checks, the device guard, allocations, the current stream, the
// choice of kernels (host_plan.h), and TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m). The kernels and
// their launchers are the .cu files beside it, reached through launch.h.
//
// NOTE: one file for the three ops: each file that includes PyTorch's headers costs 20–30 s of CPU
// to compile, and nvcc, which parsed them once per architecture, no longer sees them at all.
//
// lora_kernels::cuda_lora_forward — two launches:
//   1. xa = s · (x ⊙ D) Aᵀ           the thin product (skinny.cu), mask regenerated while x is loaded;
//                                     saved for backward already scaled (reference.lora_forward)
//   2. y  = xa Bᵀ + x W0ᵀ + b         the fused GEMM, one store of y: on sm_90 the TMA/wgmma kernel
//                                     (sm90/: base k-tiles, then the low-rank ones), else the
//                                     sm_80 kernel (forward.cu, gemm_tc.cuh: low-rank k-tiles first);
//                                     see use_sm90_gemm
//
// lora_kernels::cuda_lora_backward — one pass over dy (or two thin products), one thin product, one GEMM:
//   1. g   = s · dy B                          (M, r)  fp16/bf16: one pass over dy computes both g and
//   2. dB  = dyᵀ xa                            (N, r)  dB (skinny.cu, launch_dy_pass; + a small ordered
//                                                      reduction of partials); else two thin products
//   3. dAᵀ = (x ⊙ D)ᵀ g                        (K, r)  thin product over the M rows, mask regenerated
//                                                      while x is loaded, written straight into dA (r, K)
//   4. dx  = (g A) ⊙ D + dy W0                 (M, K)  the fused GEMM (W0 read in place as W0ᵀ), one store:
//                                                      without dropout on sm_90 the TMA/wgmma kernel (sm90/),
//                                                      else the sm_80 one (backward.cu, gemm_tc.cuh: the
//                                                      low-rank tiles first, masked and scaled by 1/(1-p)
//                                                      in the accumulator)
//
// lora_kernels::cuda_lora_merge_ — W0 += s · B A in place (unmerge: the same with -s; merge.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <utility>

#include "../lora_kernels.h"
#include "device_once.h"
#include "host_plan.h"
#include "launch.h"
#include "sm90/gemm_sm90.h"

namespace lora_kernels {
namespace {

// --------------------------------------------------------------------------- //
// Host helpers (c10 only: ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit may lack)
// --------------------------------------------------------------------------- //

// A launcher's status as an exception: its refusal, or its CUDA error (what C10_CUDA_KERNEL_LAUNCH_CHECK
// reports for the error cudaGetLastError gave right after the launch).
void check_launch(const LaunchStatus& status) {
  TORCH_CHECK(status.refused.empty(), status.refused);
  C10_CUDA_CHECK(status.error);
}

// The current PyTorch stream of the current device (what at::cuda::getCurrentCUDAStream returns).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The current device, one the per-device caches (PerDeviceOnce) have room for.
int current_device() {
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "lora_kernels: device index ", device, " out of range");
  return device;
}

// (major, minor) compute capability of the current device, queried once per device.
std::pair<int, int> device_capability() {
  static PerDeviceOnce once;
  static std::array<std::pair<int, int>, kMaxDevices> cc{};
  const int device = current_device();
  C10_CUDA_CHECK(once([&] {
    cudaError_t err = cudaDeviceGetAttribute(&cc[device].first, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cc[device].second, cudaDevAttrComputeCapabilityMinor, device);
    return err;
  }));
  return cc[device];
}

// The number of SMs of the current device, queried once per device.
int sm_count() {
  static PerDeviceOnce once;
  static std::array<int, kMaxDevices> count{};
  const int device = current_device();
  C10_CUDA_CHECK(once([&] { return cudaDeviceGetAttribute(&count[device], cudaDevAttrMultiProcessorCount, device); }));
  return count[device];
}

// Which GEMM kernels a fp16/bf16 call runs: choose_sm90_gemm (host_plan.h) for this build and
// the current device. LORA_KERNELS_CUDA_GEMM (auto | sm80 | sm90) is read on every call, so the
// tests can run each path on the same GPU.
bool use_sm90_gemm(const char* op, bool eligible) {
#ifdef LORA_KERNELS_SM90
  constexpr bool built = true;
#else
  constexpr bool built = false;
#endif
  const auto cc = device_capability();
  return choose_sm90_gemm(op, std::getenv("LORA_KERNELS_CUDA_GEMM"), cc.first, cc.second, built, eligible);
}

// The tensor-core kernels use cp.async, ldmatrix and bf16 mma.sync: compute capability 8.0+.
void require_sm80(const char* op) {
  const auto cc = device_capability();
  TORCH_CHECK(cc.first >= 8, op, ": float16/bfloat16 need a GPU of compute capability 8.0 or newer, got ", cc.first,
              ".", cc.second);
}

// The kernels' dtype of a (checked) float tensor.
DType dtype_of(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", type, " (expected float16, bfloat16, float32 or float64)");
  }
}

#ifdef LORA_KERNELS_SM90
// The sm_90a GEMM (sm90/) for a fp16/bf16 dtype.
template <bool W_KMAJOR>
void run_sm90_gemm(DType dtype, const sm90::GemmArgs& a, cudaStream_t stream) {
  check_launch(dtype == DType::kHalf ? sm90::run_gemm<__half, W_KMAJOR>(a, stream)
                                     : sm90::run_gemm<__nv_bfloat16, W_KMAJOR>(a, stream));
}
#endif

// --------------------------------------------------------------------------- //
// The thin products and the backward's pass over dy (kernels: skinny.cu)
// --------------------------------------------------------------------------- //

// out[i, j] = scale · Σ_l (P ⊙ D)[i, l] · Q[j, l]   for i < I, j < R (R small: the LoRA rank)
// P[i, l] = p[i * psi + l * psl], Q[j, l] = q[j * qsj + l * qsl], out[i, j] = out[i * osi + j * osj].
// With dropout enabled, the mask element of P[i, l] is keep(row, col) with (row, col) = (i, l)
// when mask_col_is_l, else (l, i); the masked matrix's column axis must be P's unit-stride axis.
void launch_skinny(const at::Tensor& p, int64_t psi, int64_t psl, const at::Tensor& q, int64_t qsj, int64_t qsl,
                   at::Tensor& out, int64_t osi, int64_t osj, int64_t I, int64_t R, int64_t L, double scale,
                   const Dropout& dropout, bool mask_col_is_l) {
  if (I == 0 || R == 0) return;
  TORCH_CHECK(p.scalar_type() == q.scalar_type() && p.scalar_type() == out.scalar_type(),
              "lora_kernels: skinny operands must share a dtype");

  SkinnyParams prm{};
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

  const auto type = p.scalar_type();
  const SkinnyPlan plan =
      plan_skinny(prm, type == at::kHalf || type == at::kBFloat16, dropout.enabled, sm_count());
  const auto stream = current_stream();
  const auto acc_dtype = type == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial;
  if (plan.splits > 1) {
    partial = at::empty({plan.splits, I, R}, p.options().dtype(acc_dtype));
    prm.partial = partial.data_ptr();
  }
  check_launch(launch_skinny(dtype_of(type, "lora_kernels thin product"), prm, plan, dropout.enabled, stream));
}

// The backward's g = s · dy B (M, r) and dB = dyᵀ xa (N, r) from one pass over dy (fp16/bf16, all
// contiguous; plan_dy_pass in host_plan.h). Returns false, launching nothing, where the caller
// should run the two thin products instead (other dtypes, empty sums, or where the cost model
// prefers two passes).
bool launch_dy_pass(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& xa, at::Tensor& g,
                    at::Tensor& grad_B, double scaling) {
  const auto type = dy.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return false;
  const int64_t M = dy.size(0), N = dy.size(1), R = lora_B.size(1);
  if (M == 0 || N == 0 || R == 0) return false;  // empty sums: the thin products write the zeros
  const DyPassPlan plan = plan_dy_pass(M, N, R, sm_count());
  if (!plan.one_pass) return false;
  TORCH_CHECK(plan.grid_n <= INT32_MAX && plan.grid_m <= 65535 && plan.grid_j <= 65535,
              "lora_kernels: the backward's pass over dy is too large for one launch");

  DyPassParams prm{};
  prm.dy = dy.data_ptr();
  prm.b = lora_B.data_ptr();
  prm.xa = xa.data_ptr();
  prm.g = g.data_ptr();
  prm.db = grad_B.data_ptr();
  prm.M = M;
  prm.N = N;
  prm.R = R;
  prm.rb = plan.rb;
  prm.cb = plan.cb;
  prm.row_blocks = plan.row_blocks;
  prm.col_tiles = plan.col_tiles;
  prm.scale = static_cast<float>(scaling);
  at::Tensor g_partial, db_partial;
  if (plan.g_partial > 0) {
    g_partial = at::empty({plan.grid_n, M, R}, dy.options().dtype(at::kFloat));
    prm.g_partial = g_partial.data_ptr<float>();
  }
  if (plan.db_partial > 0) {
    db_partial = at::empty({plan.grid_m, N, R}, dy.options().dtype(at::kFloat));
    prm.db_partial = db_partial.data_ptr<float>();
  }
  check_launch(launch_dy_pass(dtype_of(type, "lora_kernels pass over dy"), prm, plan, scaling, current_stream()));
  return true;
}

// --------------------------------------------------------------------------- //
// The ops
// --------------------------------------------------------------------------- //

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
  const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16;
  if (tensor_cores) {
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

  const DType kernel_dtype = dtype_of(dtype, "cuda_lora_forward");
#ifdef LORA_KERNELS_SM90
  if (tensor_cores) {
    const sm90::GemmArgs a = sm90::forward_args(p.x, p.w, p.l, p.u, p.bias, p.c, M, N, K, r);
    if (use_sm90_gemm("cuda_lora_forward", sm90::sm90_gemm_eligible(a))) {
      run_sm90_gemm</*W_KMAJOR=*/true>(kernel_dtype, a, current_stream());
      return {y, xa};
    }
  }
#endif
  check_launch(launch_forward_gemm(kernel_dtype, p, has_bias, current_stream()));
  return {y, xa};
}

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
  const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16;
  if (tensor_cores) {
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

    const DType kernel_dtype = dtype_of(dtype, "cuda_lora_backward");
#ifdef LORA_KERNELS_SM90
    // With dropout the sm_80 kernel runs (sm90_backward_eligible says why).
    if (tensor_cores) {
      const sm90::GemmArgs a = sm90::backward_args(p.x, p.w, p.l, p.u, p.c, M, N, K, r);
      if (use_sm90_gemm("cuda_lora_backward", sm90::sm90_backward_eligible(a, dropout.enabled))) {
        run_sm90_gemm</*W_KMAJOR=*/false>(kernel_dtype, a, current_stream());
        return {grad_x, grad_A, grad_B};
      }
    }
#endif
    check_launch(launch_backward_gemm(kernel_dtype, p, dropout.enabled, current_stream()));
  }
  return {grad_x, grad_A, grad_B};
}

// NOTE: A and B may come in any float dtype (fp32 masters for a bf16 weight): they are converted to
// the accumulator type here, never rounded to the weight's dtype.
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

  check_launch(launch_merge(dtype_of(W.scalar_type(), "cuda_lora_merge_"), W.data_ptr(), A.data_ptr(), B.data_ptr(),
                            N, K, r, scaling, current_stream()));
  if (!W.is_same(weight)) weight.copy_(W);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_lora_forward", &cuda_lora_forward);
  m.impl("cuda_lora_backward", &cuda_lora_backward);
  m.impl("cuda_lora_merge_", &cuda_lora_merge_);
}

}  // namespace lora_kernels
