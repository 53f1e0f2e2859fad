// The sm_90a GEMM, composed from CUTLASS 3.x/4.x building blocks (see gemm_sm90.h for the math):
//
// - kernel: cutlass::gemm::kernel::GemmUniversal with KernelTmaWarpSpecializedCooperative: a
//   persistent tile scheduler, one producer warp issuing TMA loads into a PipelineTmaAsync
//   multi-stage shared-memory pipeline (mbarriers), two consumer warp groups sharing each
//   128x256 output tile, wgmma from shared memory (GMMA atoms chosen by the collective builder);
// - mainloop: LoraMainloop (lora_mainloop.hpp), CUTLASS's TMA/GMMA mainloop plus the k-tiles of
//   the low-rank pair (L, U) from their own TMA descriptors;
// - epilogue: the TMA warp-specialized epilogue with the LinCombPerColBias fusion,
//   D = acc + bias[n] in fp32, one rounding, stored by TMA (a null bias reads as zeros).
//
// Included only by gemm_sm90.cu, which instantiates it once per variant.
#pragma once

#include <array>
#include <string>

// NOTE: the sm_90 pieces of CUTLASS only, not cutlass/gemm/collective/collective_builder.hpp and
// cutlass/gemm/kernel/gemm_universal.hpp, which include the builders, mainloops and kernels of
// every architecture (sm70 to sm120). A piece missing here is a compile error, not another
// kernel: the builders' primary templates static_assert. The epilogue's builder has no such split
// (its primary template lives in collective_builder.hpp).
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/builders/sm90_gmma_builder.inl"
#include "cutlass/gemm/collective/collective_builder_decl.hpp"
#include "cutlass/gemm/collective/collective_mma_decl.hpp"
#include "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal_decl.h"
#include "cutlass/gemm/kernel/sm90_gemm_tma_warpspecialized_cooperative.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/kernel_hardware_info.h"

#include "../device_once.h"
#include "gemm_sm90.h"
#include "lora_mainloop.hpp"

namespace lora_kernels::sm90 {

template <typename T>
struct CutlassType;
template <>
struct CutlassType<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

template <typename T, bool W_KMAJOR>
struct GemmConfig {
  using Element = typename CutlassType<T>::type;
  using LayoutX = cutlass::layout::RowMajor;
  // CUTLASS's B operand is (N, K): "ColumnMajor" = K contiguous (W (N, K) row-major),
  // "RowMajor" = N contiguous (W stored (K, N)).
  using LayoutW = cute::conditional_t<W_KMAJOR, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // elements per 16 bytes

  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutC, kAlign,      // no source C
      Element, LayoutC, kAlign,   // D
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, Element, float>>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutX, kAlign, Element, LayoutW, kAlign, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = LoraMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
};

// Set up once per device (the current one, `device`): the kernel's shared-memory attribute and the
// SM count, which *sm_count receives.
template <class Kernel>
cudaError_t prepare_device(int device, int* sm_count) {
  static PerDeviceOnce once;
  static std::array<int, kMaxDevices> counts{};
  const cudaError_t err = once([&] {
    const cudaError_t set = cudaFuncSetAttribute(
        cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(Kernel::SharedStorageSize));
    if (set == cudaSuccess) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    return set;
  });
  if (err == cudaSuccess) *sm_count = counts[device];
  return err;
}

template <typename T, bool W_KMAJOR>
LaunchStatus run_gemm(const GemmArgs& a, cudaStream_t stream) {
  using Config = GemmConfig<T, W_KMAJOR>;
  using Kernel = typename Config::Kernel;
  using Mainloop = typename Config::Mainloop;
  using Element = typename Config::Element;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;

  const int M = static_cast<int>(a.M), N = static_cast<int>(a.N), K = static_cast<int>(a.K), R = static_cast<int>(a.R);
  int device = 0, sm_count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = prepare_device<Kernel>(device, &sm_count);
  if (err != cudaSuccess) return {err, {}};

  static_assert(Mainloop::kBlockK == kBlockK, "gemm_sm90.h's kBlockK must be the TileShape's K");

  // Packed strides, batch mode included (L = 1), as CUTLASS's make_cute_packed_stride gives them.
  // NOTE: the batch stride is not left at 0: CuTe passes it to cuTensorMapEncodeTiled as the stride
  // of the batch dimension, and this keeps it the 16-byte multiple CUTLASS's own examples and tests
  // pass (each product below has a factor that is a multiple of 8 elements: sm90_gemm_eligible).
  const int64_t M64 = a.M, N64 = a.N, K64 = a.K, R64 = a.R;
  StrideA dX{}, dL{};
  StrideB dW{}, dU{};
  StrideD dC{};
  get<0>(dX) = K64;  // X (M, K): (m, k) -> m*K + k
  get<2>(dX) = M64 * K64;
  get<0>(dL) = R64;  // L (M, R)
  get<2>(dL) = M64 * R64;
  if constexpr (W_KMAJOR) {
    get<0>(dW) = K64;  // W (N, K): (n, k) -> n*K + k
    get<0>(dU) = R64;  // U (N, R)
  } else {
    get<1>(dW) = N64;  // W (K, N): (n, k) -> k*N + n
    get<1>(dU) = N64;  // U (R, N)
  }
  get<2>(dW) = N64 * K64;
  get<2>(dU) = N64 * R64;
  get<0>(dC) = N64;  // C (M, N)
  get<2>(dC) = M64 * N64;

  typename Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = make_shape(M, N, Mainloop::virtual_k(K, R), 1);
  args.mainloop = {static_cast<Element const*>(a.x), dX, static_cast<Element const*>(a.w), dW,
                   static_cast<Element const*>(a.l), dL, static_cast<Element const*>(a.u), dU, K, R};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = static_cast<Element const*>(a.bias);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = dC;
  args.epilogue.ptr_D = static_cast<Element*>(a.c);
  args.epilogue.dD = dC;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;

  if (!Kernel::can_implement(args)) {
    return {cudaSuccess, "lora_kernels: the sm_90a GEMM cannot run M=" + std::to_string(M) + " N=" + std::to_string(N) +
                             " K=" + std::to_string(K) + " R=" + std::to_string(R) +
                             " (alignment); the launcher should have chosen the sm_80 kernels"};
  }
  // NOTE: the persistent scheduler and the TMA epilogue need no workspace; refuse rather than
  // launch without one if a CUTLASS update changes that.
  if (Kernel::get_workspace_size(args) != 0) return refuse("lora_kernels: the sm_90a GEMM unexpectedly needs a workspace");
  const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  const dim3 grid = Kernel::get_grid_shape(params);
  const dim3 block = Kernel::get_block_shape();
  cutlass::device_kernel<Kernel><<<grid, block, Kernel::SharedStorageSize, stream>>>(params);
  return launched();
}

}  // namespace lora_kernels::sm90

// An explicit instantiation (gemm_sm90.cu): LORA_SM90_INSTANTIATE(__nv_bfloat16, true) etc.
#define LORA_SM90_INSTANTIATE(T, W_KMAJOR) \
  template lora_kernels::LaunchStatus lora_kernels::sm90::run_gemm<T, W_KMAJOR>(const lora_kernels::sm90::GemmArgs&, \
                                                                               cudaStream_t)
