"""Triton kernels for the LoRA linear layer, and their launchers.

Three kernels (and a Hopper variant of the first) cover the forward, the backward and merge (see
:mod:`lora_kernels.reference` for the math and docs/design.md for the layout):

``_gemm_lora_up_kernel``  C = X Wᵀ + b + L Uᵀ ⊙ D         the base GEMM with the low-rank term added to
                                                           each tile before its one store:  y, dx
                                                           (``_gemm_lora_up_tma_kernel``: the same on Hopper,
                                                           TMA loads and a persistent grid)
``_lora_skinny_kernel``   c · (P ⊙ D) Q  or  c · (P ⊙ D)ᵀ Q  thin products reducing over a long axis,
                                                           split in two stages:  xa, g;  dB, dAᵀ
``_merge_kernel``         W += c · U V                    in place, fp32 accumulation, one rounding

``D`` is the dropout keep-mask scaled by ``1/(1-p)``, regenerated from
``(seed, row, column)`` wherever it is needed and never stored. Every operand
is addressed through explicit strides, so transposed views (``W0ᵀ``, ``Aᵀ``,
``Bᵀ``) and non-contiguous inputs need no copies.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from .backends import device_seed, triton_interpreted
from .reference import dropout_threshold

INTERPRET = triton_interpreted()
# LORA_KERNELS_AUTOTUNE=0 runs the first fitting config of each GEMM instead of autotuning
# (the GPU test suite does: it checks results, and compiles a third as much).
AUTOTUNE = os.environ.get("LORA_KERNELS_AUTOTUNE", "1") != "0"
# NOTE: the interpreter truncates fp32 -> bf16 conversions (GPUs round to nearest even);
# _round_to emulates the rounding there so results and merge/unmerge round trips match.
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _keep_mask(seed_ptr, threshold, offs_m, col0, groups_per_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_N) for rows ``offs_m`` and columns ``col0 + [0, BLOCK_N)``.

    ``col0`` is a multiple of 4: each Philox call yields the four words of four
    neighbouring columns (reference.dropout_keep_mask). The seed is read from device
    memory, so a captured CUDA graph uses whatever seed its replay drew.
    """
    seed = tl.load(seed_ptr)
    offs_g = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    counter = offs_m.to(tl.int64)[:, None] * groups_per_row + offs_g[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return (words >> 8).to(tl.int32) >= threshold


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """``x`` rounded to nearest (even) in ``dtype``."""
    if _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # NOTE: UPCAST is set under the interpreter for bf16, whose tl.dot it gets wrong.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _low_rank_tile(
    acc, l_ptr, u_ptr, offs_m, offs_n, M, N, R,
    stride_lm, stride_lr, stride_un, stride_ur,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``acc + Σ_r L[m, r] U[n, r]`` for one tile of rows ``offs_m`` and columns ``offs_n``."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        l = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                    mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        acc = _dot(l, u, acc, UPCAST, IEEE)
    return acc


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-blocks share each column block of W while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % group_size
    pid_n = (tile % (GROUP_M * num_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _lora_epilogue(
    acc, pid_m, pid_n, bias_ptr, l_ptr, u_ptr, c_ptr, M, N, R,
    stride_lm, stride_lr, stride_un, stride_ur, stride_cm, stride_cn,
    inv_keep, seed_ptr, threshold, groups_per_row,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Add ``L Uᵀ ⊙ D`` and the bias to a finished GEMM tile, then store it once."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    if DROPOUT:
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        up = _low_rank_tile(up, l_ptr, u_ptr, rows, cols, M, N, R, stride_lm, stride_lr, stride_un, stride_ur,
                            UPCAST, IEEE, BLOCK_R)
        keep = _keep_mask(seed_ptr, threshold, offs_m, pid_n * BLOCK_N, groups_per_row, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, up * inv_keep, 0.0)
    else:
        # NOTE: straight into the accumulator: no second (BLOCK_M, BLOCK_N) tile of registers.
        acc = _low_rank_tile(acc, l_ptr, u_ptr, rows, cols, M, N, R, stride_lm, stride_lr, stride_un, stride_ur,
                             UPCAST, IEEE, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             _round_to(acc, c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemm_lora_up_kernel(
    x_ptr,  # X (M, K): x, or dy
    w_ptr,  # W (N, K): W0, or W0ᵀ as a strided view
    bias_ptr,  # b (N,) (HAS_BIAS only)
    l_ptr,  # L (M, R): xa, or g
    u_ptr,  # U (N, R): B, or Aᵀ as a strided view
    c_ptr,  # C (M, N) = X Wᵀ + b + L Uᵀ ⊙ D
    M, N, K, R,
    M_BUCKET,  # next power of two of M: the autotuning key, so a new token count does not re-tune
    stride_xm, stride_xk, stride_wn, stride_wk, stride_lm, stride_lr, stride_un, stride_ur,
    stride_cm, stride_cn,
    inv_keep, seed_ptr, threshold, groups_per_row,  # D = keep / (1 - p) over C's elements (DROPOUT only)
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        acc = _dot(x, w, acc, UPCAST, IEEE)
    _lora_epilogue(acc, pid_m, pid_n, bias_ptr, l_ptr, u_ptr, c_ptr, M, N, R,
                   stride_lm, stride_lr, stride_un, stride_ur, stride_cm, stride_cn,
                   inv_keep, seed_ptr, threshold, groups_per_row, HAS_BIAS, DROPOUT,
                   ACC_DTYPE, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _gemm_lora_up_tma_kernel(
    x_desc,  # tensor descriptor of X (M, K), blocks (BLOCK_M, BLOCK_K)
    w_desc,  # tensor descriptor of W: (N, K) blocks (BLOCK_N, BLOCK_K); with W_KN, of Wᵀ (K, N) blocks (BLOCK_K, BLOCK_N)
    bias_ptr, l_ptr, u_ptr, c_ptr,  # as in _gemm_lora_up_kernel
    M, N, K, R, M_BUCKET,
    stride_lm, stride_lr, stride_un, stride_ur, stride_cm, stride_cn,
    inv_keep, seed_ptr, threshold, groups_per_row,
    W_KN: tl.constexpr,  # W is stored as Wᵀ, row-major (the dx GEMM reads W0 this way)
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """The same GEMM on Hopper: TMA tile loads (bounds handled by the copy engine) and a
    persistent grid of NUM_PROGRAMS programs walking the tiles in grouped order."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            if W_KN:
                w = w_desc.load([k0, pid_n * BLOCK_N])
            else:
                w = w_desc.load([pid_n * BLOCK_N, k0]).T
            acc = _dot(x, w, acc, UPCAST, IEEE)
        _lora_epilogue(acc, pid_m, pid_n, bias_ptr, l_ptr, u_ptr, c_ptr, M, N, R,
                       stride_lm, stride_lr, stride_un, stride_ur, stride_cm, stride_cn,
                       inv_keep, seed_ptr, threshold, groups_per_row, HAS_BIAS, DROPOUT,
                       ACC_DTYPE, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _lora_skinny_kernel(
    p_ptr,  # P (M, N): x or dy
    q_ptr,  # Q (T, R), T the reduced axis: N (Aᵀ, B) or M (xa, g)
    out_ptr,  # out[split] (rows of the kept axis, R) = scale · Σ_{t in split} (P ⊙ keep) Q
    M, N, R, span,  # span: length of the reduced axis that each split covers
    stride_pm, stride_pn, stride_qt, stride_qr, stride_os, stride_oa, stride_or,
    scale,
    seed_ptr, threshold, groups_per_row,  # dropout mask of P (DROPOUT only)
    REDUCE_ROWS: tl.constexpr,  # False: out = (P ⊙ keep) Q, (M, R); True: out = (P ⊙ keep)ᵀ Q, (N, R)
    DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    A_LEN = N if REDUCE_ROWS else M
    T_LEN = M if REDUCE_ROWS else N
    t_start = pid_s * span
    t_end = tl.minimum(T_LEN, t_start + span)
    acc = tl.zeros((BLOCK_A, BLOCK_R), dtype=ACC_DTYPE)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        q = tl.load(q_ptr + offs_t.to(tl.int64)[:, None] * stride_qt + offs_r[None, :] * stride_qr,
                    mask=(offs_t[:, None] < t_end) & (offs_r[None, :] < R), other=0.0)
        if REDUCE_ROWS:  # P tile (BLOCK_T, BLOCK_A): rows t, columns a
            p = tl.load(p_ptr + offs_t.to(tl.int64)[:, None] * stride_pm + offs_a[None, :] * stride_pn,
                        mask=(offs_t[:, None] < t_end) & (offs_a[None, :] < A_LEN), other=0.0)
            if DROPOUT:
                keep = _keep_mask(seed_ptr, threshold, offs_t, pid_a * BLOCK_A, groups_per_row, BLOCK_T, BLOCK_A)
                p = tl.where(keep, p, 0.0)
            acc = _dot(tl.trans(p), q, acc, UPCAST, IEEE)
        else:  # P tile (BLOCK_A, BLOCK_T): rows a, columns t
            p = tl.load(p_ptr + offs_a.to(tl.int64)[:, None] * stride_pm + offs_t[None, :] * stride_pn,
                        mask=(offs_a[:, None] < A_LEN) & (offs_t[None, :] < t_end), other=0.0)
            if DROPOUT:
                keep = _keep_mask(seed_ptr, threshold, offs_a, t0, groups_per_row, BLOCK_A, BLOCK_T)
                p = tl.where(keep, p, 0.0)
            acc = _dot(p, q, acc, UPCAST, IEEE)
    acc = acc * scale
    tl.store(out_ptr + pid_s * stride_os + offs_a.to(tl.int64)[:, None] * stride_oa + offs_r[None, :] * stride_or,
             _round_to(acc, out_ptr.dtype.element_ty), mask=(offs_a[:, None] < A_LEN) & (offs_r[None, :] < R))


@triton.jit
def _merge_kernel(
    w_ptr,  # W (N, K), updated in place: W += scale · U V
    u_ptr,  # U (N, R): B
    v_ptr,  # V (R, K): A
    N, K, R,
    stride_wn, stride_wk, stride_un, stride_ur, stride_vr, stride_vk,
    scale,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    # U V = Σ_r U[n, r] (Vᵀ)[k, r]: the same low-rank tile as the GEMM epilogue.
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    delta = _low_rank_tile(delta, u_ptr, v_ptr, offs_n, offs_k, N, K, R, stride_un, stride_ur, stride_vk, stride_vr,
                           UPCAST, IEEE, BLOCK_R)
    ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(ptrs, _round_to(w + delta * scale, w_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Launch configuration
# --------------------------------------------------------------------------- #


def _gemm_configs(tma: bool = False):
    hook = dict(pre_hook=_set_tma_blocks) if tma else {}
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, **hook)]
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    if not tma:
        shapes += [(128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 5, 2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w, **hook)
        for bm, bn, bk, s, w in shapes
    ]


def _set_tma_blocks(nargs):
    """Autotuning pre-hook: give the tensor descriptors the block shape of the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def prune_gemm_configs(configs, named_args, **kwargs):
    """Autotuning pre-filter: drop configs whose pipelined tiles cannot fit in shared memory for
    the operand dtype (fp32 and fp64 tiles are 2-4x larger); keep only the first without AUTOTUNE."""
    c = named_args["c_ptr"]
    limit = _shared_memory_limit(c.device)
    fitting = [
        cfg for cfg in configs
        if cfg.num_stages * (cfg.kwargs["BLOCK_M"] + cfg.kwargs["BLOCK_N"]) * cfg.kwargs["BLOCK_K"]
        * c.element_size() <= limit
    ] or configs[-1:]
    return fitting if AUTOTUNE else fitting[:1]


_GEMM_KEY = ["M_BUCKET", "N", "K", "R", "DROPOUT", "HAS_BIAS"]
_PRUNE = dict(prune_configs_by={"early_config_prune": prune_gemm_configs})
_gemm_lora_up = triton.autotune(_gemm_configs(), key=_GEMM_KEY, **_PRUNE)(_gemm_lora_up_kernel)
_gemm_lora_up_tma = triton.autotune(_gemm_configs(tma=True), key=_GEMM_KEY + ["W_KN"], **_PRUNE)(
    _gemm_lora_up_tma_kernel
)

# Which GEMM kernel runs: None picks the TMA kernel on Hopper (and newer) for fp16/bf16
# operands that TMA can address; True/False force it on or off where it can run at all.
USE_TMA = None


def _tma_orientation(x, w):
    """``W_KN`` for the TMA kernel (is W stored as Wᵀ?), or None where TMA cannot read X and W."""
    def rows_aligned(t, unit_dim):
        other = 1 - unit_dim
        return t.stride(unit_dim) == 1 and (t.stride(other) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    if not rows_aligned(x, 1):
        return None
    if rows_aligned(w, 1):
        return False
    if rows_aligned(w, 0):
        return True
    return None


_TMA_FAILED = False  # set when the TMA kernel failed to build here; auto mode then stays off it


def _gemm_uses_tma(x, w):
    w_kn = _tma_orientation(x, w)
    if w_kn is None or USE_TMA is False or (USE_TMA is None and _TMA_FAILED):
        return None
    if USE_TMA is None and (INTERPRET or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16)
                            or torch.cuda.get_device_capability(x.device)[0] < 9):
        return None
    return w_kn


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_r(R: int) -> int:
    # tl.dot needs every dimension ≥ 16; wider ranks loop over chunks of 64.
    return min(64, max(16, triton.next_power_of_2(R)))


def _dtype_flags(dtype: torch.dtype) -> dict:
    """Accumulator dtype and dot precision for an operand dtype (compile-time switches)."""
    upcast = INTERPRET and dtype == torch.bfloat16
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        UPCAST=upcast,
        IEEE=dtype in (torch.float32, torch.float64) or upcast,
    )


@functools.lru_cache(maxsize=None)
def _unused_seed(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _dropout_args(dropout_p: float, seed, cols: int, device: torch.device) -> dict:
    """Kernel arguments of the dropout mask; ``seed`` is an int or a 0-dim int64 tensor."""
    seed = _unused_seed(device) if dropout_p == 0.0 else device_seed(seed, device)
    return dict(seed_ptr=seed, threshold=dropout_threshold(dropout_p), groups_per_row=triton.cdiv(cols, 4),
                DROPOUT=dropout_p > 0.0)


# --------------------------------------------------------------------------- #
# Launchers: the two building blocks, then the backend's entry points
# --------------------------------------------------------------------------- #


def gemm_lora_up(x, w, bias, l, u, dropout_p=0.0, seed=0):
    """``X Wᵀ + b + L Uᵀ ⊙ D`` for X (M, K), W (N, K), L (M, R), U (N, R); any strides."""
    global _TMA_FAILED
    M, K = x.shape
    N, R = w.shape[0], l.shape[1]
    c = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return c
    common = dict(
        HAS_BIAS=bias is not None, BLOCK_R=_block_r(R), inv_keep=1.0 / (1.0 - dropout_p),
        **_dropout_args(dropout_p, seed, N, x.device), **_dtype_flags(x.dtype),
    )
    operands = (bias if bias is not None else c, l, u, c, M, N, K, R, triton.next_power_of_2(M))
    epilogue_strides = (l.stride(0), l.stride(1), u.stride(0), u.stride(1), c.stride(0), c.stride(1))
    w_kn = _gemm_uses_tma(x, w)
    if w_kn is not None:
        try:
            _launch_tma_gemm(x, w, w_kn, operands, epilogue_strides, common)
            return c
        except Exception as exc:  # a toolchain without TMA support for these operands
            if USE_TMA:
                raise
            _TMA_FAILED = True
            warnings.warn(f"lora_kernels: the TMA GEMM could not run ({exc!r}); using the pointer GEMM")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_lora_up[grid](
        x, w, *operands, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *epilogue_strides, **common,
    )
    return c


def _launch_tma_gemm(x, w, w_kn, operands, epilogue_strides, common):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N = x.shape[0], w.shape[0]
    # Block shapes are set per autotuning config by _set_tma_blocks.
    x_desc = TensorDescriptor.from_tensor(x, [1, 1])
    w_desc = TensorDescriptor.from_tensor(w.t() if w_kn else w, [1, 1])
    programs = _num_sms(x.device)
    grid = lambda meta: (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    _gemm_lora_up_tma[grid](
        x_desc, w_desc, *operands, *epilogue_strides, W_KN=w_kn, NUM_PROGRAMS=programs, **common,
    )


def skinny_product(p, q, out, scale, reduce_rows=False, dropout_p=0.0, seed=0):
    """``out = scale · (P ⊙ keep) Q`` (or ``(P ⊙ keep)ᵀ Q`` with ``reduce_rows``); any strides.

    P is (M, N) and the mask is P's; Q is (N, R), or (M, R) with ``reduce_rows``;
    ``out`` is (M, R), or (N, R). These products are thin (R ≤ a few hundred) and
    reduce over a long axis: when the output tiles alone cannot fill the GPU,
    the reduction is split across programs and the fp32 partials are summed in
    a second stage.
    """
    M, N = p.shape
    R = q.shape[1]
    kept, reduced = (N, M) if reduce_rows else (M, N)
    if reduced == 0 or kept == 0:
        return out.zero_()
    if INTERPRET:
        block_a, block_t, launch = 32, 32, {}
    else:
        block_a, block_t = (128, 64) if reduce_rows else (64, 128)
        launch = dict(num_warps=4, num_stages=3)
        if p.element_size() == 8:  # fp64 tiles: half the reduced block, two stages, to fit shared memory
            block_t, launch["num_stages"] = block_t // 2, 2
    block_r = _block_r(R)
    tiles = triton.cdiv(kept, block_a) * triton.cdiv(R, block_r)
    t_blocks = triton.cdiv(reduced, block_t)
    splits = max(1, min(t_blocks, triton.cdiv(2 * _num_sms(p.device), tiles)))
    span = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(reduced, span)
    if splits == 1:
        target = out.unsqueeze(0)
    else:
        acc_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        target = torch.empty(splits, kept, R, device=p.device, dtype=acc_dtype)
    _lora_skinny_kernel[(triton.cdiv(kept, block_a), triton.cdiv(R, block_r), splits)](
        p, q, target, M, N, R, span,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        scale, REDUCE_ROWS=reduce_rows, BLOCK_A=block_a, BLOCK_T=block_t, BLOCK_R=block_r,
        **_dropout_args(dropout_p, seed, N, p.device), **_dtype_flags(p.dtype), **launch,
    )
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def _inv_keep(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, xa)``: xa = s·(x ⊙ D) Aᵀ, then the base GEMM with xa Bᵀ added in its epilogue."""
    xa = x.new_empty(x.shape[0], lora_A.shape[0])
    skinny_product(x, lora_A.t(), xa, scaling * _inv_keep(dropout_p), dropout_p=dropout_p, seed=seed)
    y = gemm_lora_up(x, weight, bias, xa, lora_B)
    return y, xa


def lora_backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x):
    """``(dx, dA, dB)`` as in reference.lora_backward; dx's GEMM carries (g A) ⊙ D in its epilogue."""
    dy = grad_out
    g = skinny_product(dy, lora_B, dy.new_empty(dy.shape[0], lora_B.shape[1]), scaling)  # s · dy B
    grad_B = skinny_product(dy, xa, torch.empty_like(lora_B), 1.0, reduce_rows=True)  # dyᵀ xa
    grad_A = torch.empty_like(lora_A)
    skinny_product(x, g, grad_A.t(), _inv_keep(dropout_p), reduce_rows=True,  # dAᵀ = (x ⊙ D)ᵀ g
                   dropout_p=dropout_p, seed=seed)
    if need_grad_x:
        grad_x = gemm_lora_up(dy, weight.t(), None, g, lora_A.t(), dropout_p, seed)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_A, grad_B


def lora_merge_(weight, lora_A, lora_B, scaling):
    """``W0 += s·B A`` in place; the factors may be held in another float dtype than W0."""
    N, K = weight.shape
    R = lora_A.shape[0]
    if N == 0 or K == 0:
        return
    if weight.dtype == torch.float64:  # an fp64 accumulator needs fp64 operands for tl.dot
        lora_A, lora_B = lora_A.double(), lora_B.double()
    block_n, block_k = (32, 32) if INTERPRET else (64, 128)
    _merge_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        weight, lora_B, lora_A, N, K, R,
        weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        scaling, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(R),
        **_dtype_flags(lora_A.dtype),
        **({} if INTERPRET else dict(num_warps=4, num_stages=2)),
    )
