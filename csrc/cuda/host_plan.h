// Host-side decisions of the CUDA backend as pure functions of their inputs (no device queries,
// no CUDA calls), so that the CPU tests can check them through the test-only ops of csrc/lora.cpp
// (lora_kernels::_cuda_gemm_plan):
//
//   choose_sm90_gemm   which GEMM kernels a fp16/bf16 call runs (sm_90a or sm_80)
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace lora_kernels {

// Whether a fp16/bf16 GEMM runs the sm_90a kernels (csrc/cuda/sm90/) rather than the sm_80 ones
// (gemm_tc.cuh). mode: LORA_KERNELS_CUDA_GEMM (nullptr or "" = auto); cc: the device's compute
// capability; built: this build has the sm_90a kernels; eligible: the call fits them
// (sm90_gemm_eligible, and no dropout in the backward).
//   auto: sm_90a where built, eligible and cc == 9.0; sm80: never; sm90: as auto, but an error
//   when the build or the GPU has none (ineligible calls still run sm_80).
// NOTE: sm_90a code runs on compute capability 9.0 only (arch-specific, no forward compatibility).
// Every other GPU of capability 8.0+ (8.x, 10.x, 12.x, ...) runs the sm_80 kernels: from the
// sm_80 cubin on 8.x, from the sm_90a cubin on 9.0, JIT-compiled from the compute_90 PTX elsewhere.
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

}  // namespace lora_kernels
