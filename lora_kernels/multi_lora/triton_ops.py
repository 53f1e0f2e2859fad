"""Triton kernels for several adapters in one batch (SGMV style), and their launchers.

The rows of a batch are segmented by adapter on the device (``reference.segments``:
``order`` sorts the rows by adapter id, adapter ``i`` owns sorted positions
``[seg[i], seg[i+1])``). The kernels read rows of ``x``/``dy`` through ``order``
(gathered loads, no copies) and keep every intermediate in the original row order.
Grids are sized from shapes alone; programs past the real work exit early.

``_sgmv_shrink_kernel``   out[m] = c·s_i·(P[m] ⊙ D) Q_i       segment-aligned row tiles, one adapter each,
                                                            reduction split in two stages when the grid is
                                                            thin:  xa = s·(x⊙D) Aᵀ,  g = s·dy B
``_sgmv_reduce_kernel``   partial[chunk] = (P ⊙ D)ᵀ Q         over one adapter's chunk of rows; then
``_segment_sum_kernel``   out_i = c · Σ_{chunks of i} partial  dB_i = dyᵀ xa,  dA_iᵀ = (x⊙D)ᵀ g  (zero for
                                                            adapters without rows)
``_sgmv_gemm_kernel``     C = X Wᵀ + b + (L_m U_iᵀ) ⊙ D       the base GEMM over tiles of sorted rows, whose
                                                            epilogue loops over the (few, contiguous) adapters
                                                            of its tile:  y,  dx.  With LOAD_C, the epilogue
                                                            alone, added to a C that the (Hopper TMA) base GEMM
                                                            of ``lora_kernels.triton_ops`` wrote.

The helpers, dtype switches and the dropout mask are those of ``lora_kernels.triton_ops``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import triton_ops as single
from .. import _runtime
from .._runtime import on_input_device
from ..triton_ops import (
    _cdiv,
    _dot,
    _dropout_args,
    _dtype_flags,
    _gemm_configs,
    prune_gemm_configs,
    _add_bias,
    _keep_mask,
    _load_at,
    _load_tile,
    _lora_up,
    _next_pow2,
    _num_sms,
    _store_at,
    _strided,
    _tile_coords,
)

# Which forward/dx GEMM runs: True: the fused SGMV GEMM (gathered rows, low-rank epilogue);
# False: the single-adapter base GEMM (on Hopper its TMA kernel), then the epilogue kernel
# alone (LOAD_C), one more pass over C. None: fused, unless the base GEMM would use TMA.
FUSED_GEMM = None


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _segment_tile(t, seg_ptr, n, tile_rows, BLOCK_S: tl.constexpr):
    """Tile ``t`` of the segment-aligned tiling: ``(adapter, first sorted position, end position)``.

    Adapter ``i``'s run ``[seg[i], seg[i+1])`` is cut into ``ceil(len / tile_rows)`` tiles,
    numbered adapter by adapter. Past the last tile, ``adapter == n``.
    """
    adapter = 0
    before = 0  # tiles of the adapters that end at or before tile t
    carry = 0  # tiles of the chunks of adapters already scanned
    for s0 in range(0, n, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        valid = offs < n
        start = tl.load(seg_ptr + offs, mask=valid, other=0)
        end = tl.load(seg_ptr + offs + 1, mask=valid, other=0)
        tiles = tl.where(valid, (end - start + tile_rows - 1) // tile_rows, 0).to(tl.int32)
        done = valid & ((tl.cumsum(tiles, 0) + carry) <= t)
        adapter += tl.sum(done.to(tl.int32), 0)
        before += tl.sum(tl.where(done, tiles, 0), 0)
        carry += tl.sum(tiles, 0)
    live = adapter < n
    row0 = tl.load(seg_ptr + adapter) + (t - before) * tile_rows
    row_end = tl.load(seg_ptr + adapter + 1, mask=live, other=0)
    return adapter, row0, row_end


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _sgmv_shrink_kernel(
    p_ptr,  # P (M, T): x or dy; rows read through order
    q_ptr,  # Q (n, T, R): Aᵀ or B, per adapter
    scale_ptr,  # s (n,)
    order_ptr,  # (M,) rows sorted by adapter
    seg_ptr,  # (n + 1,) segment starts in sorted positions
    out_ptr,  # out[split] (M, R), original row order: coeff · s_i · Σ_{t in split} (P ⊙ D) Q_i
    M, T, R, n, span,  # span: length of the reduced axis T that each split covers
    stride_pm, stride_pt, stride_qa, stride_qt, stride_qr, stride_os, stride_om, stride_or,
    coeff,
    seed_ptr, threshold, groups_per_row,  # dropout mask of P (DROPOUT only)
    DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    adapter, row0, row_end = _segment_tile(tl.program_id(0), seg_ptr, n, BLOCK_M, BLOCK_S)
    if adapter >= n:
        return
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    pos = row0 + tl.arange(0, BLOCK_M)
    in_seg = pos < row_end
    rows = tl.load(order_ptr + pos, mask=in_seg, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    q_base = _strided(q_ptr, adapter, stride_qa)
    t_start = pid_s * span
    t_end = tl.minimum(T, t_start + span)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        p = _load_at(p_ptr, rows, offs_t, in_seg, offs_t < t_end, stride_pm, stride_pt)
        if DROPOUT:
            keep = _keep_mask(seed_ptr, threshold, rows, t0, groups_per_row, BLOCK_M, BLOCK_T)
            p = tl.where(keep, p, 0.0)
        q = _load_at(q_base, offs_t, offs_r, offs_t < t_end, offs_r < R, stride_qt, stride_qr)
        acc = _dot(p, q, acc, UPCAST, IEEE)
    acc = acc * (tl.load(scale_ptr + adapter).to(ACC_DTYPE) * coeff)
    _store_at(_strided(out_ptr, pid_s, stride_os), acc, rows, offs_r, in_seg, offs_r < R, stride_om, stride_or)


@triton.jit
def _sgmv_reduce_kernel(
    p_ptr,  # P (M, J): dy or x; rows through order
    q_ptr,  # Q (M, R): xa or g, original row order; rows through order
    order_ptr, seg_ptr,  # as in _sgmv_shrink_kernel
    part_ptr,  # partial (chunks, J, R), fp32: (P ⊙ keep)ᵀ Q over one chunk of one adapter's rows
    J, R, n, span,  # span: rows per chunk (the tile size of the segment-aligned chunking)
    stride_pm, stride_pj, stride_qm, stride_qr, stride_wc, stride_wj, stride_wr,
    seed_ptr, threshold, groups_per_row,  # dropout mask of P (DROPOUT only)
    DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk = tl.program_id(2)
    adapter, row0, row_end = _segment_tile(chunk, seg_ptr, n, span, BLOCK_S)
    if adapter >= n:
        return
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_end = tl.minimum(row_end, row0 + span)
    acc = tl.zeros((BLOCK_J, BLOCK_R), dtype=ACC_DTYPE)
    for t0 in range(row0, row_end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        in_seg = pos < row_end
        rows = tl.load(order_ptr + pos, mask=in_seg, other=0).to(tl.int64)
        p = _load_at(p_ptr, rows, offs_j, in_seg, offs_j < J, stride_pm, stride_pj)
        if DROPOUT:
            keep = _keep_mask(seed_ptr, threshold, rows, tl.program_id(0) * BLOCK_J, groups_per_row, BLOCK_T, BLOCK_J)
            p = tl.where(keep, p, 0.0)
        q = _load_at(q_ptr, rows, offs_r, in_seg, offs_r < R, stride_qm, stride_qr)
        acc = _dot(tl.trans(p), q, acc, UPCAST, IEEE)
    _store_at(_strided(part_ptr, chunk, stride_wc), acc, offs_j, offs_r, offs_j < J, offs_r < R,
              stride_wj, stride_wr)


@triton.jit
def _segment_sum_kernel(
    part_ptr,  # partial (chunks, J, R) from _sgmv_reduce_kernel
    seg_ptr,  # (n + 1,) segment starts
    out_ptr,  # out (n, J, R) = coeff · Σ over adapter i's chunks; zero for adapters without rows
    J, R, n, span,
    stride_wc, stride_wj, stride_wr, stride_oa, stride_oj, stride_or,
    coeff,
    ACC_DTYPE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    adapter = tl.program_id(0)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunks_before = tl.zeros((BLOCK_S,), dtype=tl.int64)  # chunks of the adapters before this one
    for s0 in range(0, n, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        before = offs < adapter
        start = tl.load(seg_ptr + offs, mask=before, other=0)
        end = tl.load(seg_ptr + offs + 1, mask=before, other=0)
        chunks_before += tl.where(before, (end - start + span - 1) // span, 0)
    first = tl.sum(chunks_before, 0)
    count = (tl.load(seg_ptr + adapter + 1) - tl.load(seg_ptr + adapter) + span - 1) // span
    acc = tl.zeros((BLOCK_J, BLOCK_R), dtype=ACC_DTYPE)
    for c in range(first, first + count):
        acc += _load_at(_strided(part_ptr, c, stride_wc), offs_j, offs_r, offs_j < J, offs_r < R,
                        stride_wj, stride_wr)
    _store_at(_strided(out_ptr, adapter, stride_oa), acc * coeff, offs_j, offs_r, offs_j < J, offs_r < R,
              stride_oj, stride_or)


@triton.jit
def _sgmv_gemm_kernel(
    x_ptr,  # X (M, K): x or dy; rows through order
    w_ptr,  # W (N, K): W0, or W0ᵀ as a strided view
    bias_ptr,  # b (N,), any stride (HAS_BIAS only)
    l_ptr,  # L (M, R), original row order: xa or g
    u_ptr,  # U (n, N, R): B, or Aᵀ as a strided view
    c_ptr,  # C (M, N), original row order: X Wᵀ + b + (L U_iᵀ) ⊙ D; with LOAD_C, C += (L U_iᵀ) ⊙ D
    ids_ptr,  # (M,) adapter of each row, -1 for none
    order_ptr,  # (M,) rows sorted by adapter
    M, N, K, R, n,
    M_BUCKET,  # next power of two of M: the autotuning key
    stride_xm, stride_xk, stride_wn, stride_wk, stride_lm, stride_lr, stride_ua, stride_un, stride_ur,
    stride_cm, stride_cn, stride_bias,
    inv_keep, seed_ptr, threshold, groups_per_row,  # D over C's elements (DROPOUT only)
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, LOAD_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = pos < M
    rows = tl.load(order_ptr + pos, mask=in_m, other=0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if LOAD_C:
        acc = _load_at(c_ptr, rows, offs_n, in_m, offs_n < N, stride_cm, stride_cn).to(ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _load_at(x_ptr, rows, offs_k, in_m, offs_k < K, stride_xm, stride_xk)
            w = _load_tile(w_ptr, w_ptr, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, False)
            acc = _dot(x, w.T, acc, UPCAST, IEEE)
    # The tile's rows are sorted by adapter: its adapters are the contiguous range [lo, hi].
    ids = tl.load(ids_ptr + rows, mask=in_m, other=-1)
    lo = tl.maximum(tl.min(tl.where(in_m, ids, n), 0), 0)  # int64, like the ids
    hi = tl.minimum(tl.max(ids, 0), n - 1)
    if DROPOUT:
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    else:
        up = acc  # NOTE: straight into the accumulator, as in the single-adapter epilogue
    for adapter in range(lo, hi + 1):
        mine = in_m & (ids == adapter)
        u_base = _strided(u_ptr, adapter, stride_ua)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            l = _load_at(l_ptr, rows, offs_r, mine, offs_r < R, stride_lm, stride_lr)
            up = _lora_up(up, l, u_base, n0, r0, N, R, stride_un, stride_ur, UPCAST, IEEE, BLOCK_N, BLOCK_R)
    if DROPOUT:
        keep = _keep_mask(seed_ptr, threshold, rows, n0, groups_per_row, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, up * inv_keep, 0.0)
    else:
        acc = up
    acc = _add_bias(acc, bias_ptr, n0, N, stride_bias, HAS_BIAS, BLOCK_N)
    _store_at(c_ptr, acc, rows, offs_n, in_m, offs_n < N, stride_cm, stride_cn)


_GEMM_KEY = ["M_BUCKET", "N", "K", "R", "DROPOUT", "HAS_BIAS", "LOAD_C"]


@functools.lru_cache(maxsize=None)
def _sgmv_gemm():
    """The autotuned GEMM, built on first use (some Triton versions touch the GPU driver when an
    autotuner is built). restore_value: with LOAD_C the kernel adds into C, which autotuning must
    not do twice."""
    prune = functools.partial(prune_gemm_configs, kernel="_sgmv_gemm_kernel")
    configs = _gemm_configs()
    if single.gpu_configs():
        # NOTE: its own 8-warp fallback (the last config is what pruning keeps when every other is
        # excluded): the shared list's 4-warp 32x32x32 spills in the fp32 gathered GEMM with dropout.
        configs.append(triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
                                     num_stages=3, num_warps=8))
    return triton.autotune(configs, key=_GEMM_KEY, restore_value=["c_ptr"],
                           prune_configs_by={"early_config_prune": prune})(_sgmv_gemm_kernel)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #


def _block_s(n: int) -> int:
    """Adapters scanned per step when a program locates its tile."""
    return min(128, max(16, _next_pow2(n)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sgmv_shrink(p, q, scaling, coeff, order, seg, dropout_p=0.0, seed=0):
    """``out[m] = coeff · s_i · (P[m] ⊙ D) Q_i`` with ``i = ids[m]``; zero rows where ``i = -1``.

    P (M, T), Q (n, T, R), any strides; returns out (M, R) in P's dtype. Row tiles
    are aligned to the adapter segments (one adapter per program); when they are
    too few to fill the GPU, the reduction over T is split and the fp32 partials
    summed in a second stage.
    """
    M, T = p.shape
    n, _, R = q.shape
    out = p.new_zeros(M, R)
    if M == 0 or T == 0 or n == 0 or R == 0:
        return out
    if not _runtime.target(p.device).gpu:
        block_m, block_t, launch = 32, 32, {}
    else:
        # Rows per tile from the mean segment length: serving batches have short segments.
        block_m = min(64, max(16, _next_pow2(_cdiv(M, n))))
        # NOTE: 4-byte operands take half the reduced block: 128 spills registers with dropout.
        block_t, launch = (128 if p.element_size() <= 2 else 64), dict(num_warps=4, num_stages=3)
    block_r = single._block_r(R)
    row_tiles = _cdiv(M, block_m) + min(n, M)  # at most one partial tile per adapter
    live_tiles = _cdiv(M, block_m) * _cdiv(R, block_r)
    t_blocks = _cdiv(T, block_t)
    splits = max(1, min(t_blocks, _cdiv(2 * _num_sms(p.device), live_tiles)))
    span = _cdiv(t_blocks, splits) * block_t
    splits = _cdiv(T, span)
    target = out.unsqueeze(0) if splits == 1 else p.new_zeros(splits, M, R, dtype=_acc_dtype(p.dtype))
    _sgmv_shrink_kernel[(row_tiles, _cdiv(R, block_r), splits)](
        p, q, scaling, order, seg, target, M, T, R, n, span,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), q.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        coeff, BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_S=_block_s(n),
        **_dropout_args(dropout_p, seed, T, p.device), **_dtype_flags(p.dtype), **launch,
    )
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def sgmv_reduce(p, q, order, seg, out, coeff, dropout_p=0.0, seed=0):
    """``out[i] = coeff · (P ⊙ D)[rows(i)]ᵀ Q[rows(i)]`` for every adapter ``i`` (zero without rows).

    P (M, J), Q (M, R), out (n, J, R), any strides. Two stages: fp32 partial sums
    over segment-aligned chunks of rows (sized so the grid fills the GPU), then a
    per-adapter sum of its chunks, in a fixed order (deterministic).
    """
    M, J = p.shape
    R = q.shape[1]
    n = out.shape[0]
    if n == 0 or J == 0 or R == 0:
        return out
    if M == 0:
        return out.zero_()
    gpu = _runtime.target(p.device).gpu
    if not gpu:
        block_j, block_t, launch = 32, 32, {}
    else:
        # NOTE: 8 warps with dropout: the Philox state made the 4-warp tile spill on Triton 3.4.
        block_j, block_t, launch = 128, 64, dict(num_warps=8 if dropout_p else 4, num_stages=3)
    block_r = single._block_r(R)
    tiles = _cdiv(J, block_j) * _cdiv(R, block_r)
    chunks_wanted = max(1, _cdiv(2 * _num_sms(p.device), tiles))
    span = max(1, _cdiv(_cdiv(M, chunks_wanted), block_t)) * block_t
    chunks = _cdiv(M, span) + min(n, M)  # at most one partial chunk per adapter
    part = torch.empty(chunks, J, R, device=p.device, dtype=_acc_dtype(p.dtype))
    block_s = _block_s(n)
    _sgmv_reduce_kernel[(_cdiv(J, block_j), _cdiv(R, block_r), chunks)](
        p, q, order, seg, part, J, R, n, span,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), part.stride(0), part.stride(1), part.stride(2),
        BLOCK_J=block_j, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_S=block_s,
        **_dropout_args(dropout_p, seed, J, p.device), **_dtype_flags(p.dtype), **launch,
    )
    sum_j, sum_r = (64, 64) if gpu else (32, 16)
    _segment_sum_kernel[(n, _cdiv(J, sum_j), _cdiv(R, sum_r))](
        part, seg, out, J, R, n, span,
        part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1), out.stride(2),
        coeff, ACC_DTYPE=_dtype_flags(p.dtype)["ACC_DTYPE"], BLOCK_J=sum_j, BLOCK_R=sum_r, BLOCK_S=block_s,
    )
    return out


def _use_fused_gemm(x, w) -> bool:
    if FUSED_GEMM is not None:
        return FUSED_GEMM
    return single._gemm_uses_tma(x, w) is None


def sgmv_gemm(x, w, bias, l, u, adapter_ids, order, dropout_p=0.0, seed=0):
    """``C[m] = X[m] Wᵀ + b + (L[m] U_iᵀ) ⊙ D[m]``, ``i = ids[m]`` (no low-rank term where ``i = -1``).

    X (M, K), W (N, K), L (M, R), U (n, N, R); any strides. See FUSED_GEMM for the two ways.
    """
    M, K = x.shape
    N = w.shape[0]
    n, _, R = u.shape
    if M == 0 or N == 0:
        return x.new_empty(M, N)
    fused = _use_fused_gemm(x, w)
    if fused:
        c = x.new_empty(M, N)
    else:  # the base GEMM alone (TMA where it applies), then the low-rank epilogue over C
        c = single.gemm_lora_up(x, w, bias, x[:, :0], w[:, :0])  # rank 0 (views: valid pointers)
    if n == 0 and not fused:
        return c
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _sgmv_gemm()[grid](
        x, w, bias if bias is not None else c, l, u, c, adapter_ids, order,
        M, N, K, R, n, _next_pow2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), l.stride(0), l.stride(1),
        u.stride(0), u.stride(1), u.stride(2), c.stride(0), c.stride(1), bias.stride(0) if bias is not None else 0,
        1.0 / (1.0 - dropout_p), HAS_BIAS=bias is not None and fused, LOAD_C=not fused,
        BLOCK_R=single._block_r(R), **_dropout_args(dropout_p, seed, N, x.device), **_dtype_flags(x.dtype),
    )
    return c


# --------------------------------------------------------------------------- #
# The backend's entry points (signatures of multi_lora.reference)
# --------------------------------------------------------------------------- #


@on_input_device
def multi_lora_forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed):
    """``(y, xa)``: the segmented shrink ``xa = s_i·(x ⊙ D) A_iᵀ``, then the GEMM with ``xa B_iᵀ`` fused."""
    inv_keep = 1.0 / (1.0 - dropout_p)
    xa = sgmv_shrink(x, lora_A.transpose(1, 2), scaling, inv_keep, order, seg, dropout_p, seed)
    y = sgmv_gemm(x, weight, bias, xa, lora_B, adapter_ids, order)
    return y, xa


@on_input_device
def multi_lora_backward(
    grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p, seed, need_grad_x
):
    """``(dx, dA, dB)``: g = s_i·dy B_i, dB_i = dyᵀ xa and dA_iᵀ = (x⊙D)ᵀ g per segment, and the dx GEMM
    ``dy W0`` with ``(g A_i) ⊙ D`` in its epilogue."""
    dy = grad_out
    inv_keep = 1.0 / (1.0 - dropout_p)
    g = sgmv_shrink(dy, lora_B, scaling, 1.0, order, seg)
    grad_B = sgmv_reduce(dy, xa, order, seg, torch.empty_like(lora_B), 1.0)
    grad_A = torch.empty_like(lora_A)
    sgmv_reduce(x, g, order, seg, grad_A.transpose(1, 2), inv_keep, dropout_p, seed)
    if need_grad_x:
        grad_x = sgmv_gemm(dy, weight.t(), None, g, lora_A.transpose(1, 2), adapter_ids, order, dropout_p, seed)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_A, grad_B
