// Host-side decisions of the CUDA backend as pure functions of their inputs (no device queries,
// no CUDA calls), so that the CPU tests can check them through the test-only ops of csrc/lora.cpp
// (lora_kernels::_cuda_gemm_plan, lora_kernels::_cuda_dy_pass_plan):
//
//   choose_sm90_gemm   which GEMM kernels a fp16/bf16 call runs (sm_90a or sm_80)
//   plan_skinny        which kernel, grid and split-K a thin product runs with (skinny.cu)
//   plan_dy_pass       the grid of the backward's one pass over dy (g and dB; skinny.cu)
//
// Included by the torch side only (ops.cpp, lora.cpp); the kernels receive the plans (launch.h).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "launch.h"

namespace lora_kernels {

// Whether a fp16/bf16 GEMM runs the sm_90a kernels (csrc/cuda/sm90/) rather than the sm_80 ones
// (gemm_tc.cuh). mode: LORA_KERNELS_CUDA_GEMM (nullptr or "" = auto); cc: the device's compute
// capability; built: this build has the sm_90a kernels; eligible: the call fits them
// (sm90_gemm_eligible, and no dropout in the backward).
//   auto: sm_90a where built, eligible and cc == 9.0; sm80: never; sm90: as auto, but an error
//   when the build or the GPU has none (ineligible calls still run sm_80).
// NOTE: sm_90a code runs on compute capability 9.0 only (arch-specific, no forward compatibility).
// Every other GPU of capability 8.0+ (8.x, 10.x, 12.x, ...) runs the sm_80 kernels: from the
// sm_80 cubin on 8.x, from the sm_90a cubin on 9.0, JIT-compiled from the compute_80 PTX elsewhere.
inline bool choose_sm90_gemm(const char* op, const char* mode_env, int cc_major, int cc_minor, bool built,
                             bool eligible) {
  const std::string mode = mode_env && *mode_env ? mode_env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "sm80" || mode == "sm90", op,
              ": LORA_KERNELS_CUDA_GEMM must be auto, sm80 or sm90, got '", mode, "'");
  if (mode == "sm80") return false;
  const bool hopper = cc_major == 9 && cc_minor == 0;
  if (mode == "sm90") {
    TORCH_CHECK(built, op, ": LORA_KERNELS_CUDA_GEMM=sm90 but this build has no sm_90a kernels "
                "(LORA_KERNELS_CUDA_ARCHS without 9.0a)");
    TORCH_CHECK(hopper, op, ": LORA_KERNELS_CUDA_GEMM=sm90 needs a compute capability 9.0 GPU, got ", cc_major, ".",
                cc_minor);
  }
  return built && hopper && eligible;
}

// How a thin product out (I, R) = Σ_l P (I, L) Qᵀ is split along l (skinny.cu): with fewer than 2
// blocks per SM (grid_i · grid_j blocks of 64 × bj), the l axis is cut into `splits` slices of
// l_per_split (a multiple of the kernel's l step bl), whose fp32 partials a second kernel adds.
struct SkinnySplit {
  int64_t splits = 1;
  int64_t l_per_split = 0;
};

inline SkinnySplit plan_skinny_split(int64_t I, int64_t R, int64_t L, int64_t bj, int64_t bl, int64_t sms) {
  constexpr int64_t kBI = 64, kMaxSplits = 256;
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t l_tiles = std::max<int64_t>(cdiv(L, bl), 1);
  const int64_t blocks = cdiv(I, kBI) * cdiv(R, bj);
  SkinnySplit split;
  if (blocks < 2 * sms) split.splits = std::min<int64_t>({l_tiles, cdiv(2 * sms, blocks), kMaxSplits});
  const int64_t tiles_per_split = cdiv(l_tiles, split.splits);
  split.splits = cdiv(l_tiles, tiles_per_split);
  split.l_per_split = tiles_per_split * bl;
  return split;
}

// Whether the fp16/bf16 tensor-core kernel takes a thin product: one unit-stride axis in P and in
// Q, and with dropout the mask's columns along P's contiguous axis (true for every caller).
inline bool skinny_tc_applies(const SkinnyParams& prm, bool half_or_bf16, bool mask) {
  if (!half_or_bf16) return false;
  const bool p_l = prm.psl == 1, p_i = prm.psi == 1, q_l = prm.qsl == 1, q_j = prm.qsj == 1;
  if (!(p_l || p_i) || !(q_l || q_j)) return false;
  if (mask && prm.mask_col_is_l != p_l) return false;
  // The instantiated layouts: xa (P, Q l-contiguous, mask or not), g (P l-, Q j-contiguous),
  // dB and dAᵀ (P i-, Q j-contiguous; mask or not).
  return (p_l && q_l) || (p_l && !q_l && !mask) || (!p_l && !q_l);
}

// The launch of a thin product (prm without l_per_split, which this sets) on a GPU with `sms` SMs.
// NOTE: the fp16/bf16 tensor-core kernel tiles j by 16/32/64 (fitted to R) and steps l by 64,
// the SIMT kernel by 32 and 32: the grid and the split are planned for the kernel that runs.
inline SkinnyPlan plan_skinny(SkinnyParams& prm, bool half_or_bf16, bool mask, int64_t sms) {
  SkinnyPlan plan;
  plan.tc = skinny_tc_applies(prm, half_or_bf16, mask);
  const int64_t bj = plan.tc ? skinny_tc_block_j(prm.R) : kSkinnyBJ;
  const int64_t bl = plan.tc ? kSkinnyTcBL : kSkinnyBL;
  plan.grid_i = (prm.I + kSkinnyBI - 1) / kSkinnyBI;
  plan.grid_j = (prm.R + bj - 1) / bj;
  TORCH_CHECK(plan.grid_i <= INT32_MAX && plan.grid_j <= 65535, "lora_kernels: thin product too large for one launch");
  const SkinnySplit split = plan_skinny_split(prm.I, prm.R, prm.L, bj, bl, sms);
  plan.splits = split.splits;
  prm.l_per_split = split.l_per_split;
  return plan;
}

// The backward's one pass over dy (skinny.cu, fp16/bf16): g = s · dy B (M, r) and dB = dyᵀ xa (N, r).
// The programs tile dy (M, N) into ranges of 64-row blocks × ranges of 64-column tiles (and the
// rank into j tiles of bj). A program streams its dy tiles once, row block by row block, and
//   - keeps g of the current row block in registers over its column range: complete when the
//     program spans all of N (grid_n = 1), else a fp32 partial per column range;
//   - keeps dB of its column tiles in shared memory (fp32, cb · 64 · bj · 4 bytes) over its row
//     range: complete when grid_m = 1, else a fp32 partial per row range.
// Partials are added in a fixed order by a small second kernel (deterministic, no atomics).
// Their traffic, (grid_n·M + grid_m·N) · r · 4 bytes written and read again, is what the plan
// minimises, subject to enough programs (2 per SM and j tile, or all the tiles there are) and
// the shared-memory budget for dB (kDyPassAccBytes).
// (DyPassPlan, kDyPassTile and kDyPassAccBytes: launch.h.)
inline int64_t dy_pass_block_j(int64_t R) { return R <= 16 ? 16 : R <= 32 ? 32 : 64; }

inline DyPassPlan plan_dy_pass(int64_t M, int64_t N, int64_t R, int64_t sms) {
  TORCH_CHECK(M > 0 && N > 0 && R > 0 && sms > 0, "plan_dy_pass: M, N, r and the SM count must be positive, got ", M,
              ", ", N, ", ", R, ", ", sms);
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  DyPassPlan plan;
  plan.bj = dy_pass_block_j(R);
  plan.grid_j = cdiv(R, plan.bj);
  plan.row_blocks = cdiv(M, kDyPassTile);
  plan.col_tiles = cdiv(N, kDyPassTile);
  const int64_t cb_max = std::max<int64_t>(1, kDyPassAccBytes / (kDyPassTile * plan.bj * 4));
  const int64_t want = std::min(std::max<int64_t>(1, cdiv(2 * sms, plan.grid_j)), plan.row_blocks * plan.col_tiles);
  int64_t best_cost = -1;
  for (int64_t cb = std::min(cb_max, plan.col_tiles); cb >= 1; --cb) {
    const int64_t gn = cdiv(plan.col_tiles, cb);
    if (cb > 1 && cdiv(plan.col_tiles, cb - 1) == gn) continue;  // the smallest cb for this grid_n comes later
    // The fewest row ranges, at least t = cdiv(want, gn) of them (when there are that many row
    // blocks): the largest rb with cdiv(row_blocks, rb) >= t.
    const int64_t t = std::min(plan.row_blocks, cdiv(want, gn));
    const int64_t rb = t <= 1 ? plan.row_blocks : (plan.row_blocks - 1) / (t - 1);
    const int64_t gm = cdiv(plan.row_blocks, rb);
    if (gm * gn < want) continue;
    const int64_t cost = (gn > 1 ? gn * M : 0) + (gm > 1 ? gm * N : 0);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      plan.cb = cb;
      plan.rb = rb;
      plan.grid_n = gn;
      plan.grid_m = gm;
    }
  }
  // (cb = 1 always qualifies: gm · gn = row_blocks · col_tiles >= want.)
  plan.acc_smem_bytes = plan.cb * kDyPassTile * plan.bj * 4;
  plan.g_partial = plan.grid_n > 1 ? plan.grid_n * M * R : 0;
  plan.db_partial = plan.grid_m > 1 ? plan.grid_m * N * R : 0;
  // The two thin products of the old plan: g over the N columns, dB over the M rows (tensor-core
  // kernels: l step 64, the same bj).
  const SkinnySplit g_split = plan_skinny_split(M, R, N, plan.bj, kDyPassTile, sms);
  const SkinnySplit db_split = plan_skinny_split(N, R, M, plan.bj, kDyPassTile, sms);
  const int64_t dy_bytes = 2 * M * N * plan.grid_j;
  plan.one_pass_bytes = dy_bytes + 8 * (plan.g_partial + plan.db_partial);
  plan.two_pass_bytes = 2 * dy_bytes + 8 * ((g_split.splits > 1 ? g_split.splits * M * R : 0) +
                                            (db_split.splits > 1 ? db_split.splits * N * R : 0));
  plan.one_pass = plan.one_pass_bytes < plan.two_pass_bytes;
  return plan;
}

}  // namespace lora_kernels
