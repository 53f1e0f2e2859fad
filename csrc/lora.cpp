// The op schemas of the CUDA backend, declared once; compiled only in the CUDA build
// (the module itself: module.cpp). The kernels register themselves beside their sources
// (cuda/forward.cu, cuda/backward.cu, cuda/merge.cu: TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m);
// autograd.cpp: the layer's Autograd and CompositeExplicitAutograd kernels).
//
// NOTE: lora_kernels/ops.py defines lora_kernels::lora_forward & co. through
// torch.library.custom_op, and cpu/dropout.cpp the CPU dropout ops, as FRAGMENTs of the
// same namespace; fragments and this one TORCH_LIBRARY block coexist in either load order.
#include <torch/library.h>

#include <vector>

#include "cuda/host_plan.h"
#include "cuda/sm90/gemm_sm90.h"

namespace {

// Test-only: the GEMM plan of a call, from the same host functions the launchers use, for a
// device of compute capability cc (CPU tests; no GPU is touched). The operands sit at 16-byte
// aligned fake addresses plus `misalign` bytes each: [x, w, l, u, c, bias], bias < 0 = none.
// Returns [sm90, eligible, gemm M, N, K, R, k-tiles of (X, W), k-tiles of (L, U)].
std::vector<int64_t> cuda_gemm_plan(bool backward, int64_t M, int64_t N, int64_t K, int64_t r,
                                    c10::ArrayRef<int64_t> misalign, bool dropout, int64_t cc_major, int64_t cc_minor,
                                    bool built, std::optional<std::string> mode) {
  TORCH_CHECK(misalign.size() == 6, "_cuda_gemm_plan: misalign is [x, w, l, u, c, bias], got ", misalign.size(),
              " values");
  auto at = [&](int i) -> void* {
    return misalign[i] < 0 ? nullptr : reinterpret_cast<void*>(uintptr_t{0x100000} * (i + 1) + misalign[i]);
  };
  using namespace lora_kernels;
  const sm90::GemmArgs a = backward ? sm90::backward_args(at(0), at(1), at(2), at(3), at(4), M, N, K, r)
                                    : sm90::forward_args(at(0), at(1), at(2), at(3), at(5), at(4), M, N, K, r);
  const bool eligible = backward ? sm90::sm90_backward_eligible(a, dropout) : sm90::sm90_gemm_eligible(a);
  const bool sm90 = choose_sm90_gemm("_cuda_gemm_plan", mode ? mode->c_str() : nullptr, static_cast<int>(cc_major),
                                     static_cast<int>(cc_minor), built, eligible);
  return {sm90, eligible, a.M, a.N, a.K, a.R, sm90::k_tiles_base(a.K), sm90::k_tiles_lora(a.R)};
}

// Test-only: plan_dy_pass (cuda/host_plan.h) for dy (M, N), rank r, on a GPU with `sms` SMs.
// Returns [bj, row_blocks, col_tiles, grid_m, grid_n, grid_j, rb, cb, acc_smem_bytes, g_partial,
// db_partial, one_pass_bytes, two_pass_bytes, one_pass].
std::vector<int64_t> cuda_dy_pass_plan(int64_t M, int64_t N, int64_t r, int64_t sms) {
  const lora_kernels::DyPassPlan p = lora_kernels::plan_dy_pass(M, N, r, sms);
  return {p.bj,     p.row_blocks, p.col_tiles,      p.grid_m,     p.grid_n,         p.grid_j,        p.rb,
          p.cb,     p.acc_smem_bytes, p.g_partial, p.db_partial, p.one_pass_bytes, p.two_pass_bytes, p.one_pass};
}

}  // namespace

TORCH_LIBRARY(lora_kernels, m) {
  // (y, xa) with xa = scaling · (x ⊙ D) Aᵀ and y = x W0ᵀ + b + xa Bᵀ; x is (M, K). seed: 0-dim int64
  // tensor on x's device, read by the kernels (only when dropout_p > 0).
  m.def(
      "cuda_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // (dx, dA, dB); dx has zero elements unless need_grad_x.
  m.def(
      "cuda_lora_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor xa, float scaling, float dropout_p, Tensor seed, bool need_grad_x) -> (Tensor, Tensor, Tensor)");
  // The layer y (..., N) for x (..., K), its autograd in C++ over the two ops above (autograd.cpp):
  // the cuda backend's eager path. seed: as above, unread at dropout_p = 0 (any device then).
  m.def(
      "cuda_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor seed) -> Tensor");
  // weight += scaling · lora_B lora_A in place (unmerge: -scaling).
  m.def("cuda_lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()");
  // Test-only, host arithmetic on the CPU (see above).
  m.def(
      "_cuda_gemm_plan(bool backward, int M, int N, int K, int r, int[] misalign, bool dropout, int cc_major, "
      "int cc_minor, bool built, str? mode) -> int[]",
      &cuda_gemm_plan);
  m.def("_cuda_dy_pass_plan(int M, int N, int r, int sms) -> int[]", &cuda_dy_pass_plan);
}
