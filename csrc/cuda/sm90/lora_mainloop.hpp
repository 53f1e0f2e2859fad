// The sm_90a GEMM mainloop of the CUDA backend: CUTLASS's TMA + GMMA warp-specialized
// mainloop (sm90_mma_tma_gmma_ss_warpspecialized.hpp), with extra k-tiles read from a
// second operand pair, so that one accumulator holds both products:
//
//   C[M, N] = X Wᵀ + L Uᵀ          X (M, K), W (N, K); L (M, R), U (N, R)   (R: the LoRA rank)
//
// The kernel sees the reduction axis as ceil(K/BK) + ceil(R/BK) k-tiles (the problem
// shape's K is that many tiles times BK). The producer loads tiles k < ceil(K/BK) from
// (X, W) and the rest from (L, U) through their own TMA descriptors, which have the SAME
// box shape and swizzle as X's and W's: TMA zero-fills the columns R..BK-1 (and K..), so the
// consumer warp groups (Base::mma, unchanged) see ordinary k-tiles, and the low-rank term
// costs ceil(R/BK)·BK/K of the tensor work.
//
// Only what differs from the Base collective is written here: the arguments and params
// (two more descriptors), load_init (two more tiled TMA tensors) and the producer's load().
// mma(), mma_tail() and load_tail() are Base's, reached through Params deriving from
// Base::Params.
#pragma once

#include "cutlass/gemm/collective/builders/sm90_gmma_builder.inl"
#include "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized.hpp"

namespace lora_kernels::sm90 {

using namespace cute;

template <class Base>
struct LoraMainloop : Base {
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  // NOTE: no cluster multicast: one CTA per cluster keeps load() to plain TMA copies, and the
  // persistent kernel then launches without the cluster launcher.
  static_assert(size(ClusterShape{}) == 1, "LoraMainloop: cluster shape must be 1x1x1");
  static_assert(cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD> && cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD>,
                "LoraMainloop: plain (non-multicast) TMA loads expected");

  static constexpr int kBlockK = size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_A;  // X
    StrideA dA;
    ElementB const* ptr_B;  // W
    StrideB dB;
    ElementA const* ptr_L;  // L: same layout kind as X
    StrideA dL;
    ElementB const* ptr_U;  // U: same layout kind as W
    StrideB dU;
    int k;  // the reduction length of X Wᵀ (the problem shape's K is the padded virtual axis)
    int r;  // the reduction length of L Uᵀ
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_l;
    typename Base::Params::TMA_B tma_load_u;
    int k_tiles_base;  // ceil(k / BK): tiles below this come from (X, W)
    int r;
  };

  // The problem shape's K for reductions of length k and r.
  static int virtual_k(int k, int r) { return (ceil_div(k, kBlockK) + ceil_div(r, kBlockK)) * kBlockK; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, Kv, L] = append<4>(problem_shape, 1);
    Params params;
    static_cast<typename Base::Params&>(params) = Base::to_underlying_arguments(
        make_shape(M, N, args.k, L), typename Base::Arguments{args.ptr_A, args.dA, args.ptr_B, args.dB}, workspace);
    auto ptr_L = reinterpret_cast<InternalElementA const*>(args.ptr_L);
    auto ptr_U = reinterpret_cast<InternalElementB const*>(args.ptr_U);
    Tensor tensor_l = make_tensor(ptr_L, make_layout(make_shape(M, args.r, L), args.dL));
    Tensor tensor_u = make_tensor(ptr_U, make_layout(make_shape(N, args.r, L), args.dU));
    params.tma_load_l = make_tma_copy_A_sm90(GmemTiledCopyA{}, tensor_l, SmemLayoutA{}(_, _, Int<0>{}), TileShape{},
                                             ClusterShape{});
    params.tma_load_u = make_tma_copy_B_sm90(GmemTiledCopyB{}, tensor_u, SmemLayoutB{}(_, _, Int<0>{}), TileShape{},
                                             ClusterShape{});
    params.k_tiles_base = ceil_div(args.k, kBlockK);
    params.r = args.r;
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, Kv, L] = append<4>(problem_shape, 1);
    constexpr int kAlignA = 128 / cutlass::sizeof_bits<ElementA>::value;
    constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
    return args.k > 0 && args.r > 0 && Kv == virtual_k(args.k, args.r) &&
           Base::can_implement(make_shape(M, N, args.k, L),
                               typename Base::Arguments{args.ptr_A, args.dA, args.ptr_B, args.dB}) &&
           cutlass::detail::check_alignment<kAlignA>(make_shape(M, args.r, L), args.dL) &&
           cutlass::detail::check_alignment<kAlignB>(make_shape(N, args.r, L), args.dU);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_l.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_u.get_tma_descriptor());
  }

  // (gA_mkl, gB_nkl, gL_mkl, gU_nkl). The kernel sizes its k-tile iterator by gA_mkl's k mode,
  // which spans the virtual axis; load() indexes it only below k_tiles_base.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = Underscore;
    auto [M, N, Kv, L] = problem_shape_MNKL;
    Tensor mA_mkl = params.tma_load_a.get_tma_tensor(make_shape(M, Kv, L));
    Tensor mB_nkl = params.tma_load_b.get_tma_tensor(make_shape(N, Kv, L));
    Tensor mL_mkl = params.tma_load_l.get_tma_tensor(make_shape(M, params.r, L));
    Tensor mU_nkl = params.tma_load_u.get_tma_tensor(make_shape(N, params.r, L));
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});  // (BM,BK,m,k,l)
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});  // (BN,BK,n,k,l)
    Tensor gL_mkl = local_tile(mL_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gU_nkl = local_tile(mU_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(gA_mkl, gB_nkl, gL_mkl, gU_nkl);
  }

  // Producer: one elected thread of the producer warp issues the TMA loads of k_tile_count
  // tiles into the stages of the pipeline; the pipeline's transaction count is the full box of
  // each operand, which TMA delivers whether or not part of it is out of bounds (zero-filled).
  template <class TensorA, class TensorB, class TensorL, class TensorU, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorL, TensorU> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t /*block_rank_in_cluster*/, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BM,BK,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BN,BK,PIPE)

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor gA = get<0>(load_inputs)(_, _, m_coord, _, l_coord);  // (BM,BK,k)
    Tensor gB = get<1>(load_inputs)(_, _, n_coord, _, l_coord);  // (BN,BK,k)
    Tensor gL = get<2>(load_inputs)(_, _, m_coord, _, l_coord);  // (BM,BK,kr)
    Tensor gU = get<3>(load_inputs)(_, _, n_coord, _, l_coord);  // (BN,BK,kr)

    auto cta_tma_a = params.tma_load_a.get_slice(0);
    auto cta_tma_b = params.tma_load_b.get_slice(0);
    auto cta_tma_l = params.tma_load_l.get_slice(0);
    auto cta_tma_u = params.tma_load_u.get_slice(0);
    Tensor tAgA = cta_tma_a.partition_S(gA);  // (TMA,TMA_M,TMA_K,k)
    Tensor tAsA = cta_tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBgB = cta_tma_b.partition_S(gB);
    Tensor tBsB = cta_tma_b.partition_D(sB);
    // L and U land in the same stages as X and W (same smem layout, same box).
    Tensor tLgL = cta_tma_l.partition_S(gL);
    Tensor tLsL = cta_tma_l.partition_D(sA);
    Tensor tUgU = cta_tma_u.partition_S(gU);
    Tensor tUsU = cta_tma_u.partition_D(sB);

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);  // waits for the stage to be free, sets the expected bytes
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k_tile = *k_tile_iter;
      if (k_tile < params.k_tiles_base) {
        copy(params.tma_load_a.with(*tma_barrier), tAgA(_, _, _, k_tile), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(*tma_barrier), tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
      } else {
        const int kr = k_tile - params.k_tiles_base;
        copy(params.tma_load_l.with(*tma_barrier), tLgL(_, _, _, kr), tLsL(_, _, _, stage));
        copy(params.tma_load_u.with(*tma_barrier), tUgU(_, _, _, kr), tUsU(_, _, _, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace lora_kernels::sm90
