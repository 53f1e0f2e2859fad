// Host-side declarations shared by the op schemas (lora.cpp) and the CUDA
// launchers (cuda/*.cu): input-check macros, compile-time switches, the
// parameter blocks the kernels receive, and the launchers that more than one
// translation unit calls.
//
// The math (see lora_kernels/reference.py and docs/cuda.md):
//   forward   xa = (x ⊙ D) Aᵀ                 y  = x W0ᵀ + b + s · xa Bᵀ
//   backward  g  = s · dy B     dB = s · dyᵀ xa   dA = gᵀ (x ⊙ D)   dx = dy W0 + (g A) ⊙ D
//   merge     W0 += s · B A   (unmerge: -s)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

// --------------------------------------------------------------------------- //
// Input checks
// --------------------------------------------------------------------------- //

#define LORA_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define LORA_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be ", (d), "-D, got shape ", (x).sizes())
#define LORA_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define LORA_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())
#define LORA_CHECK_SHAPE(x, ...)                                                             \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (", \
              at::IntArrayRef({__VA_ARGS__}), "), got ", (x).sizes())
#define LORA_CHECK_FLOAT(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16 ||             \
                  (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,            \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
// A CUDA tensor of the given rank, on ref's device.
#define LORA_CHECK_INPUT(x, d, ref) \
  LORA_CHECK_CUDA(x);               \
  LORA_CHECK_DIM(x, d);             \
  LORA_CHECK_SAME_DEVICE(x, ref)

// --------------------------------------------------------------------------- //
// Compile-time switches (flash-attention style)
// --------------------------------------------------------------------------- //

// BOOL_SWITCH(cond, NAME, [&] { ... NAME is a constexpr bool here ... });
#define LORA_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// The one dtype dispatch: scalar_t is the CUDA type (__half, __nv_bfloat16, float, double).
// Only .cu files use it (the CUDA types come from cuda_fp16.h / cuda_bf16.h).
#define LORA_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                          \
  [&] {                                                                                      \
    switch (DTYPE) {                                                                         \
      case at::kHalf: {                                                                      \
        using scalar_t = __half;                                                             \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kBFloat16: {                                                                  \
        using scalar_t = __nv_bfloat16;                                                      \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kFloat: {                                                                     \
        using scalar_t = float;                                                              \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kDouble: {                                                                    \
        using scalar_t = double;                                                             \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      default:                                                                               \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                              \
                    " (expected float16, bfloat16, float32 or float64)");                    \
    }                                                                                        \
  }()

namespace lora_kernels {

// --------------------------------------------------------------------------- //
// Dropout: the keep-mask of reference.dropout_keep_mask, regenerated on the fly
// --------------------------------------------------------------------------- //

// The dropout seed as kernels receive it; Philox key = (seed & 0xffffffff, seed >> 32). Either a
// pointer to it in device memory, read by the kernels (a seed drawn on the GPU: a captured CUDA
// graph uses whatever seed its replay drew), or, with ptr null, the value itself (a seed held on
// the host: no copy and no launch for it). load_seed (cuda/common.cuh) reads either.
struct Seed {
  const int64_t* ptr = nullptr;
  uint64_t value = 0;
};

struct Dropout {
  bool enabled = false;     // p > 0
  Seed seed;
  uint32_t threshold = 0;   // drop iff (word >> 8) < threshold
  double keep_scale = 1.0;  // 1 / (1 - p)
  int64_t groups = 0;       // Philox calls per row of the masked (rows, cols) matrix: ceil(cols / 4)
};

// The seed is a 0-dim int64 tensor: on x's device it is read by the kernels (nothing waits on the
// host, and a captured CUDA graph uses the seed each replay draws); on the CPU its value is read
// here and passed by value. Unused (and unchecked) at p = 0.
inline Dropout make_dropout(double p, const at::Tensor& seed, int64_t cols, const at::Tensor& x) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  Dropout d;
  d.enabled = p > 0.0;
  if (d.enabled) {
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
                "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " with ", seed.numel(),
                " elements");
    TORCH_CHECK(seed.device() == x.device() || seed.device().is_cpu(), "seed must be on x's device (",
                x.device(), ") or on the CPU, got ", seed.device());
    if (seed.device().is_cpu()) {
      d.seed.value = static_cast<uint64_t>(*seed.data_ptr<int64_t>());
    } else {
      d.seed.ptr = seed.data_ptr<int64_t>();
    }
  }
  // round(p * 2**24) with Python's round-half-to-even: nearbyint in the default rounding mode.
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  d.keep_scale = 1.0 / (1.0 - p);
  d.groups = (cols + 3) / 4;
  return d;
}

// --------------------------------------------------------------------------- //
// Parameter blocks (passed to kernels by value)
// --------------------------------------------------------------------------- //

// The fused GEMM   C[M, N] = pre(L · Uᵀ) + X · Wᵀ (+ bias[n])
//   X (M, K) and L (M, R) are addressed as X[m, k] = x[m * sxm + k * sxk];
//   W (N, K) and U (N, R) as W[n, k] = w[n * swn + k * swk]  (W0ᵀ and A are transposed views);
//   pre(v)[m, n] = pre_scale · v[m, n] · keep(m, n)  (keep only with the MASK switch).
// The low-rank product runs first, through the same tile pipeline as the base
// product, so that pre() applies to it alone while one accumulator serves both.
struct GemmParams {
  const void* x;
  int64_t sxm, sxk;
  const void* w;
  int64_t swn, swk;
  const void* l;
  int64_t slm, slk;
  const void* u;
  int64_t sun, suk;
  const void* bias;  // (N,) or nullptr
  void* c;           // (M, N), row stride ldc, unit column stride
  int64_t ldc;
  int64_t M, N, K, R;
  double pre_scale;
  Seed seed;
  uint32_t threshold;
  int64_t mask_groups;
  // Tensor-core path: 16-byte cp.async is legal for this operand (else scalar loads);
  // paired 4-byte stores are legal for C.
  bool x_vec, w_vec, l_vec, u_vec, c_vec2;
};

// Launchers defined in cuda/skinny.cu, shared by forward and backward.
//
// out[i, j] = scale · Σ_l (P ⊙ D)[i, l] · Q[j, l]   for i < I, j < R (R small: the LoRA rank)
// P[i, l] = p[i * psi + l * psl], Q[j, l] = q[j * qsj + l * qsl], out[i, j] = out[i * osi + j * osj].
// With dropout enabled, the mask element of P[i, l] is keep(row, col) with (row, col) = (i, l)
// when mask_col_is_l, else (l, i); the masked matrix's column axis must be P's unit-stride axis.
void launch_skinny(const at::Tensor& p, int64_t psi, int64_t psl, const at::Tensor& q, int64_t qsj,
                   int64_t qsl, at::Tensor& out, int64_t osi, int64_t osj, int64_t I, int64_t R,
                   int64_t L, double scale, const Dropout& dropout, bool mask_col_is_l);

// The backward's g = s · dy B (M, r) and dB = dyᵀ xa (N, r) from one pass over dy (fp16/bf16, all
// contiguous; plan_dy_pass in cuda/host_plan.h). Returns false, launching nothing, where the
// launcher should run the two thin products instead (other dtypes, empty sums, or where the cost
// model prefers two passes).
bool launch_dy_pass(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& xa, at::Tensor& g,
                    at::Tensor& grad_B, double scaling);

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace lora_kernels
