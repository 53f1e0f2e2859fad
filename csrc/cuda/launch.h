// The boundary between the torch side of the CUDA backend (ops.cpp: input checks, device guard,
// allocations, the current stream, op registration) and the kernels (*.cu): plain C++ and the CUDA
// runtime's types only, no PyTorch header, so that nvcc never parses PyTorch's.
//
//   dtype      DType, the one dtype dispatch (LORA_DISPATCH_FLOAT_TYPES) and LORA_BOOL_SWITCH
//   params     the blocks the kernels receive by value (GemmParams, SkinnyParams, DyPassParams)
//   plans      what the host decided (host_plan.h) and the launchers follow (SkinnyPlan, DyPassPlan)
//   launchers  defined in forward.cu, backward.cu, merge.cu, skinny.cu; each returns a LaunchStatus
//
// The math (see lora_kernels/reference.py and docs/cuda.md):
//   forward   xa = (x ⊙ D) Aᵀ                 y  = x W0ᵀ + b + s · xa Bᵀ
//   backward  g  = s · dy B     dB = s · dyᵀ xa   dA = gᵀ (x ⊙ D)   dx = dy W0 + (g A) ⊙ D
//   merge     W0 += s · B A   (unmerge: -s)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <utility>

namespace lora_kernels {

// --------------------------------------------------------------------------- //
// Dtypes and compile-time switches (flash-attention style)
// --------------------------------------------------------------------------- //

// The floating-point dtypes of the kernels (ops.cpp maps at::ScalarType onto them).
enum class DType { kHalf, kBFloat16, kFloat, kDouble };

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

// The one dtype dispatch: scalar_t is the CUDA type (__half, __nv_bfloat16, float, double), so
// only .cu files use it; the body returns a LaunchStatus.
#define LORA_DISPATCH_FLOAT_TYPES(DTYPE, ...)                      \
  [&]() -> ::lora_kernels::LaunchStatus {                          \
    switch (DTYPE) {                                               \
      case ::lora_kernels::DType::kHalf: {                         \
        using scalar_t = __half;                                   \
        return __VA_ARGS__();                                      \
      }                                                            \
      case ::lora_kernels::DType::kBFloat16: {                     \
        using scalar_t = __nv_bfloat16;                            \
        return __VA_ARGS__();                                      \
      }                                                            \
      case ::lora_kernels::DType::kFloat: {                        \
        using scalar_t = float;                                    \
        return __VA_ARGS__();                                      \
      }                                                            \
      case ::lora_kernels::DType::kDouble: {                       \
        using scalar_t = double;                                   \
        return __VA_ARGS__();                                      \
      }                                                            \
    }                                                              \
    return {cudaErrorInvalidValue, {}};                            \
  }()

// --------------------------------------------------------------------------- //
// What a launcher returns
// --------------------------------------------------------------------------- //

// cudaSuccess, or the first CUDA error of the launcher's calls and launches (taken with
// cudaGetLastError right after each launch; nothing is launched after it); or, with nothing
// launched, `refused`: why the arguments cannot be launched (a grid beyond CUDA's limits). The
// torch side turns either into an exception (ops.cpp: check_launch).
struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  std::string refused;
  bool ok() const { return error == cudaSuccess && refused.empty(); }
};

// The status of the kernel launch just issued.
inline LaunchStatus launched() { return {cudaGetLastError(), {}}; }
inline LaunchStatus refuse(const char* why) { return {cudaSuccess, why}; }

// --------------------------------------------------------------------------- //
// Dropout: the keep-mask of reference.dropout_keep_mask, regenerated on the fly
// --------------------------------------------------------------------------- //

// The dropout seed as kernels receive it; Philox key = (seed & 0xffffffff, seed >> 32). Either a
// pointer to it in device memory, read by the kernels (a seed drawn on the GPU: a captured CUDA
// graph uses whatever seed its replay drew), or, with ptr null, the value itself (a seed held on
// the host: no copy and no launch for it). load_seed (common.cuh) reads either.
struct Seed {
  const int64_t* ptr = nullptr;
  uint64_t value = 0;
};

// Made from the op's arguments by make_dropout (lora_kernels.h).
struct Dropout {
  bool enabled = false;     // p > 0
  Seed seed;
  uint32_t threshold = 0;   // drop iff (word >> 8) < threshold
  double keep_scale = 1.0;  // 1 / (1 - p)
  int64_t groups = 0;       // Philox calls per row of the masked (rows, cols) matrix: ceil(cols / 4)
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// --------------------------------------------------------------------------- //
// The fused GEMM (gemm_tc.cuh, gemm_simt.cuh; sm90/ on Hopper)
// --------------------------------------------------------------------------- //

// C[M, N] = pre(L · Uᵀ) + X · Wᵀ (+ bias[n])
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

// forward.cu: the forward's GEMM y = xa Bᵀ + x W0ᵀ (+ b) (B_KMAJOR, no mask) on the sm_80
// kernels: tensor cores for fp16/bf16, CUDA cores for fp32/fp64.
LaunchStatus launch_forward_gemm(DType dtype, const GemmParams& p, bool has_bias, cudaStream_t stream);

// backward.cu: the backward's GEMM dx = (g A) ⊙ D + dy W0 (W0 and A read transposed, no bias) on
// the sm_80 kernels; mask: dropout on the low-rank term.
LaunchStatus launch_backward_gemm(DType dtype, const GemmParams& p, bool mask, cudaStream_t stream);

// --------------------------------------------------------------------------- //
// The thin products and the backward's pass over dy (skinny.cu)
// --------------------------------------------------------------------------- //

// out[i, j] = scale · Σ_l (P ⊙ D)[i, l] · Q[j, l]   for i < I, j < R (R small: the LoRA rank)
// P[i, l] = p[i * psi + l * psl], Q[j, l] = q[j * qsj + l * qsl], out[i, j] = out[i * osi + j * osj].
// With dropout, the mask element of P[i, l] is keep(row, col) with (row, col) = (i, l) when
// mask_col_is_l, else (l, i); the masked matrix's column axis must be P's unit-stride axis.
struct SkinnyParams {
  const void* p;
  int64_t psi, psl;
  const void* q;
  int64_t qsj, qsl;
  void* out;
  int64_t osi, osj;
  void* partial;  // Acc [gridDim.z][I][R] when gridDim.z > 1
  int64_t I, R, L, l_per_split;
  double scale;
  Seed seed;
  uint32_t threshold;
  double keep_scale;
  int64_t groups;
  bool group_along_l;  // P is loaded in groups of 4 along l (else along i); the mask's column axis
  bool mask_col_is_l;
};

// The tiles of the thin products, which the host plans with: 64 rows of out per block; the SIMT
// kernel 32 columns and l steps of 32, the tensor-core kernel (fp16/bf16) 16, 32 or 64 columns
// (skinny_tc_block_j) and l steps of 64.
constexpr int kSkinnyBI = 64, kSkinnyBJ = 32, kSkinnyBL = 32, kSkinnyTcBL = 64;
inline int64_t skinny_tc_block_j(int64_t R) { return R <= 16 ? 16 : R <= 32 ? 32 : 64; }

// A thin product's launch, from plan_skinny (host_plan.h): which kernel, its grid, and the l slices
// (splits > 1: the fp32/fp64 partials in SkinnyParams::partial, added by a second kernel).
struct SkinnyPlan {
  bool tc = false;  // the tensor-core kernel (else the SIMT one)
  int64_t grid_i = 0, grid_j = 0, splits = 1;
};

LaunchStatus launch_skinny(DType dtype, const SkinnyParams& prm, const SkinnyPlan& plan, bool mask,
                           cudaStream_t stream);

// The backward's one pass over dy (fp16/bf16): g = s · dy B (M, R) and dB = dyᵀ xa (N, R).
struct DyPassParams {
  const void* dy;  // (M, N)
  const void* b;   // lora_B (N, R)
  const void* xa;  // (M, R)
  void* g;         // (M, R); or g_partial [grid_n][M][R] fp32
  void* db;        // (N, R); or db_partial [grid_m][N][R] fp32
  float* g_partial;
  float* db_partial;
  int64_t M, N, R, rb, cb, row_blocks, col_tiles;
  float scale;  // s, applied to g
};

constexpr int64_t kDyPassTile = 64;             // rows of a row block = columns of a column tile
constexpr int64_t kDyPassAccBytes = 48 * 1024;  // shared-memory budget for the dB accumulators

// The pass's plan (plan_dy_pass, host_plan.h, which explains the grid).
struct DyPassPlan {
  int64_t bj = 0;                        // j tile: 16, 32 or 64 (fitted to r)
  int64_t row_blocks = 0, col_tiles = 0;  // ceil(M / 64), ceil(N / 64)
  int64_t grid_m = 0, grid_n = 0, grid_j = 0;  // programs: row ranges × column ranges × j tiles
  int64_t rb = 0, cb = 0;                // row blocks / column tiles per range (the last may have fewer)
  int64_t acc_smem_bytes = 0;            // dynamic shared memory of a program: dB accumulators
  int64_t g_partial = 0, db_partial = 0;  // fp32 elements of the partial buffers (0: written directly)
  // The cost model (bytes of device memory moved, the terms that scale with M·N or with the
  // partials; B, xa and the outputs are the same for both and left out):
  //   one pass:   dy once per j tile (2·M·N·grid_j) + the partials, written and read (8·(g + dB))
  //   two passes: dy twice per j tile + the split-K partials of the two thin products
  int64_t one_pass_bytes = 0, two_pass_bytes = 0;
  bool one_pass = false;  // one_pass_bytes < two_pass_bytes: launch_dy_pass runs the fused kernel
};

// The pass as planned, then the ordered reduction of its partials (g with scale s, dB with 1).
LaunchStatus launch_dy_pass(DType dtype, const DyPassParams& prm, const DyPassPlan& plan, double scaling,
                            cudaStream_t stream);

// --------------------------------------------------------------------------- //
// The merge (merge.cu)
// --------------------------------------------------------------------------- //

// W (N, K, contiguous, dtype) += scaling · B A, with A (r, K) and B (N, r) contiguous in the
// accumulator type (fp64 for an fp64 W, else fp32).
LaunchStatus launch_merge(DType dtype, void* W, const void* A, const void* B, int64_t N, int64_t K, int64_t r,
                          double scaling, cudaStream_t stream);

}  // namespace lora_kernels
