"""Triton kernels for the LoRA linear layer, and their launchers.

The plan (docs/design.md, "The kernels", states what each launch reads and writes):

``_lora_forward_kernel``   y = x W0ᵀ + b + xa Bᵀ and xa      one persistent GEMM. FUSED: its main loop over K
                                                            also accumulates xa = s·(x ⊙ D) Aᵀ from the x tile
                                                            it already holds (one launch). Otherwise (two_pass)
                                                            it sums the fp32 partials of xa that
``_lora_shrink_kernel``    partial[s] = (x ⊙ D) Aᵀ           wrote over split s of K (x read once).
``_lora_backward_kernel``  dx = dy W0 + (g A) ⊙ D            one persistent GEMM over runs of row blocks: its main
                                                            loop over N also accumulates g = s·dy B; it writes
                                                            the per-run fp32 partials of dAᵀ = (x ⊙ D)ᵀ g (from
                                                            the x tile of its output block) and dB = dyᵀ xa
                                                            (each dy block by one program). Without need_grad_x
                                                            the same kernel skips dx.
``_reduce_runs_kernel``    dA, dB = Σ_runs partial            the partials summed in a fixed order, rounded once.
``_merge_kernel``          W += c · U V                     in place, fp32 accumulation, one rounding

``_lora_g_kernel``         g = s·dY B                       the "g_pass" backward only: a thin pass over dY
                                                            first, so the dx GEMM does not recompute g in
                                                            every column block (cost_model.choose_backward_plan).

Forward: one launch (fused) or two; backward: two launches (three for g_pass); no torch kernels in between,
deterministic (no atomics). ``D`` is the dropout keep-mask scaled by ``1/(1-p)``,
regenerated from ``(seed, row, column)`` wherever it is needed and never stored. Every
operand is addressed through explicit strides; on Hopper the big operands and the output
tile move by TMA (tensor descriptors) where their alignment allows.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

import torch
import triton
import triton.language as tl

from ._runtime import device_seed, emulated_target, on_input_device, target, triton_interpreted
from ._triton_launch import planned_launch
from .reference import dropout_threshold

# Whether the kernels execute under Triton's CPU interpreter. NOTE: what a launch decides (configs,
# pruning, TMA, block sizes, grids) comes from _runtime.target(device), so that an emulated GPU target
# takes a GPU's decisions while the kernels still execute here.
INTERPRET = triton_interpreted()
# LORA_KERNELS_AUTOTUNE=0 runs the first fitting config of each GEMM instead of autotuning
# (the GPU test suite does: it checks results, and compiles a third as much).
AUTOTUNE = os.environ.get("LORA_KERNELS_AUTOTUNE", "1") != "0"
# LORA_KERNELS_MAX_CONFIGS=N: each autotuner benchmarks at most the first N configs that survive
# pruning (a short GPU check compiles fewer); 0 or unset: all of them.
MAX_CONFIGS = int(os.environ.get("LORA_KERNELS_MAX_CONFIGS", "0") or 0)
# NOTE: the interpreter truncates fp32 -> bf16 conversions (GPUs round to nearest even);
# _round_to emulates the rounding there so results and merge/unmerge round trips match.
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)
# Host-side tensor descriptors (TMA): feature-detected, never a version check.
HAS_TENSOR_DESCRIPTOR = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None
# tl.range(..., flatten=True) (Triton >= 3.4): feature-detected, so another Triton still runs.
HAS_FLATTEN = "flatten" in inspect.signature(tl.range.__init__).parameters
# Whether the persistent TMA forward flattens its tile loop (the next tile's loads overlap this
# tile's epilogue): on by default where the Triton supports it; the pointer GEMM never does.
FLATTEN = HAS_FLATTEN

# Which forward plan runs: None asks lora_kernels.cost_model.choose_forward_plan; "fused" or
# "two_pass" force one (the fused plan still needs r <= FUSED_MAX_RANK).
FORWARD_PLAN = None
# Which backward plan runs when dx is needed: None asks lora_kernels.cost_model.choose_backward_plan;
# "fused" (g = s·dY B accumulated in the dx GEMM's main loop, 2 launches) or "g_pass" (a thin pass
# over dY for g first, 3 launches) force one. Without dx the backward is one pass either way.
BACKWARD_PLAN = None
# The fused forward keeps xa (BLOCK_M x r, fp32) in registers beside the GEMM accumulator.
FUSED_MAX_RANK = 64
# NOTE: no kernel holds a rank block wider than this: fp32 blocks of r = 128-256 beside the GEMM
# accumulators spill every backward config on sm_90a (the compile check); wider ranks go by chunks
# (the backward then takes g from the g pass, backward_plan).
RANK_CHUNK = 64
# fp32 accumulator elements per thread that a GEMM config may hold in registers beside its addresses,
# operands and masks (of 255 registers), by (backward, num_warps): the compile check's figures
# (Triton 3.8, sm_90a, bf16: the forward spills from 192 per thread, 160 with 2 warps, the backward
# from 114 with 8 warps and 96 with 4, at every rank). See _fits.
REGISTER_BUDGET = {(False, 2): 128, (False, 4): 160, (False, 8): 160, (True, 4): 88, (True, 8): 112}


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
def _fp64_dot_probe(a_ptr, c_ptr):
    offs = tl.arange(0, 16)
    a = tl.load(a_ptr + offs[:, None] * 16 + offs[None, :])
    c = tl.dot(a, a, tl.zeros((16, 16), dtype=tl.float64), input_precision="ieee", out_dtype=tl.float64)
    tl.store(c_ptr + offs[:, None] * 16 + offs[None, :], c)


def _native_fp64_dot() -> bool:
    """Whether this Triton's ``tl.dot`` takes fp64 operands (Triton 3.4 and 3.5 refuse them).

    Feature-detected by building a 16x16 probe: run under the interpreter, compiled for sm_80
    otherwise (no GPU or driver needed; Triton caches the result on disk).
    """
    try:
        if INTERPRET:
            a = torch.zeros(16, 16, dtype=torch.float64)
            _fp64_dot_probe[(1,)](a, torch.empty_like(a))
        else:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource

            triton.compile(ASTSource(fn=_fp64_dot_probe, signature={"a_ptr": "*fp64", "c_ptr": "*fp64"}),
                           target=GPUTarget("cuda", 80, 32))
        return True
    except Exception:  # noqa: BLE001 - any refusal means: emulate
        return False


# NOTE: fp64 runs only in gradcheck-sized tests, where a broadcast product is fast enough.
_NATIVE_FP64_DOT = tl.constexpr(_native_fp64_dot())


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # NOTE: UPCAST is set under the interpreter for bf16, whose tl.dot it gets wrong.
    # out_dtype is explicit: some Triton versions default it to fp32 even for an fp64 accumulator.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # NOTE: if/elif/else, not early returns: Triton 3.4's code generator compiles the statements after a
    # compile-time `if ...: return`, i.e. an fp64 tl.dot it refuses.
    if acc.dtype == tl.float64 and not _NATIVE_FP64_DOT:
        acc = acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def _strided(ptr, i, stride):
    """``ptr + i·stride`` in int64 (``i`` a program id, a loop counter or a vector of indices)."""
    return ptr + tl.cast(i, tl.int64) * stride


@triton.jit
def _tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c):
    """Pointers of the tile ``ptr[offs_r, offs_c]``. NOTE: both index terms in int64, so a view whose
    element offsets pass 2³¹ (a 256k-vocabulary head, a transposed weight) is addressed correctly."""
    return ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c


@triton.jit
def _load_at(ptr, offs_r, offs_c, mask_r, mask_c, stride_r, stride_c):
    """The tile ``ptr[offs_r, offs_c]`` (rows may be gathered), zero where ``mask_r`` or ``mask_c`` is off."""
    return tl.load(_tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c), mask=mask_r[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def _store_at(ptr, value, offs_r, offs_c, mask_r, mask_c, stride_r, stride_c):
    """``ptr[offs_r, offs_c] = value``, rounded to the destination dtype (rows may be gathered)."""
    tl.store(_tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c), _round_to(value, ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _load_tile(ptr, desc, row0, col0, n_rows, n_cols, stride_r, stride_c,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """Tile ``[row0, row0 + BLOCK_R) x [col0, col0 + BLOCK_C)``, zero outside the matrix.

    With TMA from ``desc`` (its block shape is (BLOCK_R, BLOCK_C); the copy engine fills the
    ragged edges with zeros), else by pointer from ``ptr`` with masks."""
    if TMA:
        return desc.load([row0, col0])
    offs_r = row0 + tl.arange(0, BLOCK_R)
    offs_c = col0 + tl.arange(0, BLOCK_C)
    return _load_at(ptr, offs_r, offs_c, offs_r < n_rows, offs_c < n_cols, stride_r, stride_c)


@triton.jit
def _store_tile(ptr, desc, value, row0, col0, n_rows, n_cols, stride_r, stride_c,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """Store ``value`` (rounded to the destination dtype) as the tile at ``(row0, col0)``."""
    if TMA:
        desc.store([row0, col0], _round_to(value, desc.dtype))
    else:
        offs_r = row0 + tl.arange(0, BLOCK_R)
        offs_c = col0 + tl.arange(0, BLOCK_C)
        _store_at(ptr, value, offs_r, offs_c, offs_r < n_rows, offs_c < n_cols, stride_r, stride_c)


@triton.jit
def _lora_up(acc, l, u_ptr, n0, r0, N, R, stride_un, stride_ur, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + l U[n0 : n0 + BLOCK_N, r0 : r0 + BLOCK_R]ᵀ``: the low-rank up-projection of an output
    tile (``l``: (BLOCK_M, BLOCK_R), its rank columns ``r0 …``), straight into the accumulator."""
    u = _load_tile(u_ptr, u_ptr, n0, r0, N, R, stride_un, stride_ur, BLOCK_N, BLOCK_R, False)
    return _dot(l, u.T, acc, UPCAST, IEEE)


@triton.jit
def _add_bias(acc, bias_ptr, n0, N, stride_bias, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc + b[n0 : n0 + BLOCK_N]`` over every row (b read through its stride), or ``acc``."""
    if HAS_BIAS:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(_strided(bias_ptr, offs_n, stride_bias), mask=offs_n < N, other=0.0).to(acc.dtype)[None, :]
    return acc


@triton.jit
def _forward_epilogue(
    acc, xa_acc, pid_n, m0, n0, l_ptr, b_ptr, bias_ptr, y_ptr, y_desc, xa_ptr, M, N, R, L_SPLITS,
    stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
    stride_xam, stride_xar, xa_scale,
    FUSED: tl.constexpr, STORE_XA: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The forward GEMMs' epilogue (16-bit and 4-bit base): ``y = acc + xa Bᵀ + b``, rounded and
    stored, and xa stored by the column-block-0 programs (STORE_XA). FUSED: xa from ``xa_acc``
    (all of r in one block); else from the shrink kernel's fp32 partials, summed in split order,
    one rank chunk of BLOCK_R at a time."""
    if FUSED:
        xa = _round_to(xa_acc * xa_scale, y_ptr.dtype.element_ty)
        if STORE_XA:
            if pid_n == 0:
                _store_tile(xa_ptr, xa_ptr, xa, m0, 0, M, R, stride_xam, stride_xar, BLOCK_M, BLOCK_R, False)
        acc = _lora_up(acc, xa, b_ptr, n0, 0, N, R, stride_bn, stride_br, UPCAST, IEEE, BLOCK_N, BLOCK_R)
    else:
        for r0 in range(0, R, BLOCK_R):
            part = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
            for s in range(0, L_SPLITS):
                part += _load_tile(_strided(l_ptr, s, stride_ls), l_ptr, m0, r0, M, R, stride_lm, stride_lr,
                                   BLOCK_M, BLOCK_R, False).to(ACC_DTYPE)
            xa = _round_to(part * xa_scale, y_ptr.dtype.element_ty)
            if STORE_XA:
                if pid_n == 0:
                    _store_tile(xa_ptr, xa_ptr, xa, m0, r0, M, R, stride_xam, stride_xar, BLOCK_M, BLOCK_R, False)
            acc = _lora_up(acc, xa, b_ptr, n0, r0, N, R, stride_bn, stride_br, UPCAST, IEEE, BLOCK_N, BLOCK_R)
    acc = _add_bias(acc, bias_ptr, n0, N, stride_bias, HAS_BIAS, BLOCK_N)
    _store_tile(y_ptr, y_desc, acc, m0, n0, M, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, TMA)


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


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@triton.jit
def _lora_forward_kernel(
    x_ptr, x_desc,  # X (M, K): x; the descriptor (TMA only) has blocks (BLOCK_M, BLOCK_K)
    w_ptr, w_desc,  # W (N, K): W0; blocks (BLOCK_N, BLOCK_K)
    bias_ptr,  # b (N,), any stride (HAS_BIAS only)
    a_ptr,  # A (R, K) (FUSED only)
    l_ptr,  # two_pass: fp32 partial sums of (x ⊙ keep) Aᵀ, (L_SPLITS, M, R)
    b_ptr,  # B (N, R)
    y_ptr, y_desc,  # Y (M, N) = X Wᵀ + b + xa Bᵀ; blocks (BLOCK_M, BLOCK_N)
    xa_ptr,  # xa (M, R) = xa_scale · (x ⊙ keep) Aᵀ, written by the column-block-0 programs (STORE_XA)
    M, N, K, R, L_SPLITS,
    M_BUCKET,  # next power of two of M: the autotuning key, so a new token count does not re-tune
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_ls, stride_lm, stride_lr,
    stride_bn, stride_br, stride_bias, stride_ym, stride_yn, stride_xam, stride_xar,
    xa_scale,  # s / (1 - p)
    seed_ptr, threshold, groups_per_row,  # keep-mask over X's elements (DROPOUT only; FUSED only)
    FUSED: tl.constexpr, STORE_XA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TMA: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Persistent: program p walks tiles p, p + programs, ... in grouped order. With FLATTEN the
    tile loop and the K loop are flattened into one software pipeline (tl.range(flatten=True)),
    so the next tile's first loads are in flight while this tile's epilogue runs."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # NOTE: two loop headers around one body, chosen at compile time: a Triton whose tl.range
    # lacks `flatten` never compiles the first (HAS_FLATTEN is feature-detected).
    if FLATTEN:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _forward_tile(tile, x_ptr, x_desc, w_ptr, w_desc, bias_ptr, a_ptr, l_ptr, b_ptr, y_ptr, y_desc, xa_ptr,
                          M, N, K, R, L_SPLITS, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                          stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
                          stride_xam, stride_xar, xa_scale, seed_ptr, threshold, groups_per_row,
                          FUSED, STORE_XA, HAS_BIAS, DROPOUT, TMA, ACC_DTYPE, UPCAST, IEEE,
                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)
    else:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _forward_tile(tile, x_ptr, x_desc, w_ptr, w_desc, bias_ptr, a_ptr, l_ptr, b_ptr, y_ptr, y_desc, xa_ptr,
                          M, N, K, R, L_SPLITS, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                          stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
                          stride_xam, stride_xar, xa_scale, seed_ptr, threshold, groups_per_row,
                          FUSED, STORE_XA, HAS_BIAS, DROPOUT, TMA, ACC_DTYPE, UPCAST, IEEE,
                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)


@triton.jit
def _forward_tile(
    tile, x_ptr, x_desc, w_ptr, w_desc, bias_ptr, a_ptr, l_ptr, b_ptr, y_ptr, y_desc, xa_ptr,
    M, N, K, R, L_SPLITS, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
    stride_xam, stride_xar, xa_scale, seed_ptr, threshold, groups_per_row,
    FUSED: tl.constexpr, STORE_XA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TMA: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One output tile of _lora_forward_kernel (its arguments): main loop, then the epilogue."""
    pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    xa_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        x = _load_tile(x_ptr, x_desc, m0, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, TMA)
        w = _load_tile(w_ptr, w_desc, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, TMA)
        acc = _dot(x, w.T, acc, UPCAST, IEEE)
        if FUSED:  # xa from the x tile already loaded: r/BLOCK_N more tensor work
            a = _load_tile(a_ptr, a_ptr, k0, 0, K, R, stride_ak, stride_ar, BLOCK_K, BLOCK_R, False)
            if DROPOUT:
                x = tl.where(_keep_mask(seed_ptr, threshold, offs_m, k0, groups_per_row, BLOCK_M, BLOCK_K), x, 0.0)
            xa_acc = _dot(x, a, xa_acc, UPCAST, IEEE)
    _forward_epilogue(acc, xa_acc, pid_n, m0, n0, l_ptr, b_ptr, bias_ptr, y_ptr, y_desc, xa_ptr, M, N, R, L_SPLITS,
                      stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
                      stride_xam, stride_xar, xa_scale, FUSED, STORE_XA, HAS_BIAS, TMA, ACC_DTYPE, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # X (M, K)
    a_ptr,  # A (R, K)
    part_ptr,  # partial (splits, M, R), fp32: (X ⊙ keep) Aᵀ over one split of K
    M, K, R, span,  # span: the length of K that each split covers
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ps, stride_pm, stride_pr,
    seed_ptr, threshold, groups_per_row,  # keep-mask over X's elements (DROPOUT only)
    DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R  # this program's rank chunk
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    k_end = tl.minimum(K, pid_s * span + span)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(pid_s * span, k_end, BLOCK_K):
        x = _load_tile(x_ptr, x_ptr, m0, k0, M, k_end, stride_xm, stride_xk, BLOCK_M, BLOCK_K, False)
        if DROPOUT:
            x = tl.where(_keep_mask(seed_ptr, threshold, offs_m, k0, groups_per_row, BLOCK_M, BLOCK_K), x, 0.0)
        a = _load_tile(a_ptr, a_ptr, k0, r0, k_end, R, stride_ak, stride_ar, BLOCK_K, BLOCK_R, False)
        acc = _dot(x, a, acc, UPCAST, IEEE)
    _store_tile(_strided(part_ptr, pid_s, stride_ps), part_ptr, acc, m0, r0, M, R, stride_pm, stride_pr,
                BLOCK_M, BLOCK_R, False)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@triton.jit
def _dx_half(
    acc, g, da, m0, c0, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    inv_keep, seed_ptr, threshold, groups_per_row,
    DROPOUT: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Epilogue of one half (columns ``[c0, c0 + HALF)``) of a dx tile: add ``(g A) ⊙ D``, store
    dx, and return ``da + (x ⊙ keep)ᵀ g`` for the same columns."""
    a = _load_tile(a_ptr, a_ptr, 0, c0, R, K, stride_ar, stride_ak, BLOCK_R, HALF, False)
    x = _load_tile(x_ptr, x_ptr, m0, c0, M, K, stride_xm, stride_xk, BLOCK_M, HALF, False)
    if DROPOUT:
        # NOTE: the masked product is a half tile, so the epilogue peaks at 1.5 accumulator tiles.
        offs_m = m0 + tl.arange(0, BLOCK_M)
        keep = _keep_mask(seed_ptr, threshold, offs_m, c0, groups_per_row, BLOCK_M, HALF)
        up = _dot(g, a, tl.zeros((BLOCK_M, HALF), dtype=acc.dtype), UPCAST, IEEE)
        acc += tl.where(keep, up * inv_keep, 0.0)
        x = tl.where(keep, x, 0.0)
    else:
        acc = _dot(g, a, acc, UPCAST, IEEE)
    _store_tile(dx_ptr, dx_desc, acc, m0, c0, M, K, stride_dxm, stride_dxk, BLOCK_M, HALF, TMA)
    return _dot(tl.trans(x), g, da, UPCAST, IEEE)


@triton.jit
def _store_partial(ptr, value, row0, col0, n_rows, R, stride_pj, stride_pr, ACCUMULATE,
                   BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """``partial[row0 + j, col0 + r] (+)= value[j, r]``: only this program touches these elements."""
    offs_j = row0 + tl.arange(0, BLOCK_J)
    offs_r = col0 + tl.arange(0, BLOCK_R)
    ptrs = _tile_ptrs(ptr, offs_j, offs_r, stride_pj, stride_pr)
    mask = (offs_j[:, None] < n_rows) & (offs_r[None, :] < R)
    if ACCUMULATE:
        value += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, value, mask=mask)


@triton.jit
def _g_chunk(g_ptr, m0, r0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling, out_dtype: tl.constexpr,
             ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Columns ``[r0, r0 + BLOCK_R)`` of ``g = s·dY B`` for rows ``[m0, m0 + BLOCK_M)``: the g pass's
    partials summed in split order, scaled and rounded to ``out_dtype``."""
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for s in range(0, G_SPLITS):
        g += _load_tile(_strided(g_ptr, s, stride_gs), g_ptr, m0, r0, M, R, stride_gm, stride_gr,
                        BLOCK_M, BLOCK_R, False).to(ACC_DTYPE)
    return _round_to(g * scaling, out_dtype)


@triton.jit
def _db_share(part, dy, xa, xa_ptr, m0, n0, M, N, K, R, stride_xam, stride_xar, stride_pj, stride_pr, accumulate,
              CHUNKED: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The dB partial rows of dY's column block ``n0``: ``(+)= dyᵀ xa``. CHUNKED: xa read (and dB
    written) one rank chunk at a time; else ``xa`` is the row block's, all of r."""
    if CHUNKED:
        for r0 in range(0, R, BLOCK_R):
            xa_c = _load_tile(xa_ptr, xa_ptr, m0, r0, M, R, stride_xam, stride_xar, BLOCK_M, BLOCK_R, False)
            db = _dot(tl.trans(dy), xa_c, tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE), UPCAST, IEEE)
            _store_partial(part, db, K + n0, r0, K + N, R, stride_pj, stride_pr, accumulate, BLOCK_N, BLOCK_R)
    else:
        db = _dot(tl.trans(dy), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE), UPCAST, IEEE)
        _store_partial(part, db, K + n0, 0, K + N, R, stride_pj, stride_pr, accumulate, BLOCK_N, BLOCK_R)


@triton.jit
def _dx_half_chunks(
    acc, m0, c0, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R, G_SPLITS,
    stride_gs, stride_gm, stride_gr, stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    stride_pj, stride_pr, accumulate, scaling, inv_keep, seed_ptr, threshold, groups_per_row,
    DROPOUT: tl.constexpr, TMA: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """_dx_half by rank chunks (CHUNKED: g from the g pass): ``(g A) ⊙ D`` and the dAᵀ partial
    ``(+)= (x ⊙ keep)ᵀ g`` one chunk of g at a time (the partial is accumulated in memory, not
    held), then dx stored."""
    x = _load_tile(x_ptr, x_ptr, m0, c0, M, K, stride_xm, stride_xk, BLOCK_M, HALF, False)
    if DROPOUT:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        keep = _keep_mask(seed_ptr, threshold, offs_m, c0, groups_per_row, BLOCK_M, HALF)
        x = tl.where(keep, x, 0.0)
        up = tl.zeros((BLOCK_M, HALF), dtype=ACC_DTYPE)
    else:
        up = acc
    for r0 in range(0, R, BLOCK_R):
        g = _g_chunk(g_ptr, m0, r0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling,
                     x_ptr.dtype.element_ty, ACC_DTYPE, BLOCK_M, BLOCK_R)
        a = _load_tile(a_ptr, a_ptr, r0, c0, R, K, stride_ar, stride_ak, BLOCK_R, HALF, False)
        up = _dot(g, a, up, UPCAST, IEEE)
        da = _dot(tl.trans(x), g, tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE), UPCAST, IEEE)
        _store_partial(part, da, c0, r0, K, R, stride_pj, stride_pr, accumulate, HALF, BLOCK_R)
    if DROPOUT:
        acc += tl.where(keep, up * inv_keep, 0.0)
    else:
        acc = up
    _store_tile(dx_ptr, dx_desc, acc, m0, c0, M, K, stride_dxm, stride_dxk, BLOCK_M, HALF, TMA)


@triton.jit
def _finish_g(g, g_ptr, m0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling, G_LOADED: tl.constexpr,
              G_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The row block's ``g = s·dY B`` (all of r), rounded to ``G_DTYPE``: from the g pass's partials
    (G_LOADED), else from ``g``, the main loop's unscaled ``dY B``."""
    if G_LOADED:
        out = _g_chunk(g_ptr, m0, 0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling, G_DTYPE,
                       ACC_DTYPE, BLOCK_M, BLOCK_R)
    else:
        out = _round_to(g * scaling, G_DTYPE)
    return out


@triton.jit
def _dx_tile(
    acc0, acc1, g, da0, da1, m0, k0, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R, G_SPLITS,
    stride_gs, stride_gm, stride_gr, stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    stride_pj, stride_pr, accumulate, scaling, inv_keep, seed_ptr, threshold, groups_per_row,
    G_LOADED: tl.constexpr, CHUNKED: tl.constexpr, DROPOUT: tl.constexpr, TMA: tl.constexpr, G_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The end of a row block of the backward's dx GEMM (the 16-bit and the 4-bit kernel): the dx
    tile's halves ``acc0`` (columns ``[k0, k0 + HALF)``) and ``acc1`` (the next HALF) get
    ``(g A) ⊙ D`` and are stored; the dAᵀ partial gets ``(x ⊙ keep)ᵀ g``, returned as
    ``(da0, da1)`` or, CHUNKED, accumulated in memory by rank chunks (``da0``, ``da1`` returned
    as they came). ``g``: the main loop's unscaled ``dY B`` (unused with G_LOADED)."""
    if CHUNKED:
        _dx_half_chunks(acc0, m0, k0, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R, G_SPLITS,
                        stride_gs, stride_gm, stride_gr, stride_xm, stride_xk, stride_ar, stride_ak,
                        stride_dxm, stride_dxk, stride_pj, stride_pr, accumulate, scaling, inv_keep,
                        seed_ptr, threshold, groups_per_row, DROPOUT, TMA, ACC_DTYPE, UPCAST, IEEE,
                        BLOCK_M, HALF, BLOCK_R)
        _dx_half_chunks(acc1, m0, k0 + HALF, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R, G_SPLITS,
                        stride_gs, stride_gm, stride_gr, stride_xm, stride_xk, stride_ar, stride_ak,
                        stride_dxm, stride_dxk, stride_pj, stride_pr, accumulate, scaling, inv_keep,
                        seed_ptr, threshold, groups_per_row, DROPOUT, TMA, ACC_DTYPE, UPCAST, IEEE,
                        BLOCK_M, HALF, BLOCK_R)
    else:
        g = _finish_g(g, g_ptr, m0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling, G_LOADED, G_DTYPE,
                      ACC_DTYPE, BLOCK_M, BLOCK_R)
        da0 = _dx_half(acc0, g, da0, m0, k0, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R,
                       stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
                       inv_keep, seed_ptr, threshold, groups_per_row,
                       DROPOUT, TMA, UPCAST, IEEE, BLOCK_M, HALF, BLOCK_R)
        da1 = _dx_half(acc1, g, da1, m0, k0 + HALF, x_ptr, a_ptr, dx_ptr, dx_desc, M, K, R,
                       stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
                       inv_keep, seed_ptr, threshold, groups_per_row,
                       DROPOUT, TMA, UPCAST, IEEE, BLOCK_M, HALF, BLOCK_R)
    return da0, da1


@triton.jit
def _empty_run(part, pid_k, k0, num_kb, K, N, R, stride_pj, stride_pr, NEED_DX: tl.constexpr, CHUNKED: tl.constexpr,
               ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """Zero partial slots of a run without row blocks: its dB rows and the dAᵀ rows that the row
    blocks would have written (all of them without dx; this program's with dx, CHUNKED)."""
    for r0 in range(0, R, BLOCK_R):
        for n0 in range(pid_k * BLOCK_N, N, num_kb * BLOCK_N):
            _store_partial(part, tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE), K + n0, r0, K + N, R,
                           stride_pj, stride_pr, False, BLOCK_N, BLOCK_R)
        if not NEED_DX:
            for c0 in range(0, K, HALF):
                _store_partial(part, tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE), c0, r0, K, R, stride_pj, stride_pr,
                               False, HALF, BLOCK_R)
        elif CHUNKED:
            for c0 in range(k0, k0 + 2 * HALF, HALF):
                _store_partial(part, tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE), c0, r0, K, R, stride_pj, stride_pr,
                               False, HALF, BLOCK_R)


@triton.jit
def _lora_backward_kernel(
    dy_ptr, dy_desc,  # dY (M, N); the descriptor (TMA only) has blocks (BLOCK_M, BLOCK_N)
    w_ptr, w_desc,  # W0 (N, K); blocks (BLOCK_N, BLOCK_K // 2)  (NEED_DX only)
    x_ptr,  # X (M, K)
    a_ptr,  # A (R, K)
    b_ptr,  # B (N, R)
    xa_ptr,  # xa (M, R), saved by the forward
    g_ptr,  # fp32 partial sums of dY B over G_SPLITS splits of N, (G_SPLITS, M, R), from _lora_g_kernel (G_LOADED)
    dx_ptr, dx_desc,  # dX (M, K) = dY W0 + (g A) ⊙ D; blocks (BLOCK_M, BLOCK_K // 2)  (NEED_DX only)
    part_ptr,  # partial (runs, K + N, R), fp32: rows [0, K) Σ_run (x ⊙ keep)ᵀ g, rows [K, K + N) Σ_run dyᵀ xa
    M, N, K, R, runs, G_SPLITS,
    M_BUCKET,  # next power of two of M: the autotuning key
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_xam, stride_xar, stride_gs, stride_gm, stride_gr, stride_dxm, stride_dxk,
    stride_ps, stride_pj, stride_pr,
    scaling, inv_keep, seed_ptr, threshold, groups_per_row,  # g = s·dY B; D over dX's elements
    NEED_DX: tl.constexpr, G_LOADED: tl.constexpr, CHUNKED: tl.constexpr, DROPOUT: tl.constexpr, TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (run, column block k) walks the row blocks of its run: for each it streams the
    row block of dY once (dx GEMM, g, and dB for the dy column blocks j ≡ k mod the number of
    column blocks), then finishes the dx tile and takes dAᵀ from the x tile of that block.
    Without NEED_DX there is one column block, spanning all of K. With G_LOADED (the "g_pass"
    plan) the main loop does no rank-r MMA for g: it sums the partials of _lora_g_kernel in
    split order instead. CHUNKED (r > BLOCK_R, with G_LOADED): no block holds all of r; xa, g, A
    and the dAᵀ and dB partials go by rank chunks of BLOCK_R, and the dAᵀ partial is accumulated
    in memory row block by row block, as without dx."""
    HALF: tl.constexpr = BLOCK_K // 2
    if NEED_DX:
        num_kb = tl.cdiv(K, BLOCK_K)
    else:
        num_kb = 1
    pid_k = tl.program_id(0) % num_kb
    run = tl.program_id(0) // num_kb
    num_m = tl.cdiv(M, BLOCK_M)
    run_len = tl.cdiv(num_m, runs)
    m_first = run * run_len
    m_end = tl.minimum(num_m, m_first + run_len)
    part = _strided(part_ptr, run, stride_ps)
    k0 = pid_k * BLOCK_K
    da0 = tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE)
    da1 = tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE)
    if m_first >= m_end:  # an empty run (few row blocks): its partial slots are zero
        _empty_run(part, pid_k, k0, num_kb, K, N, R, stride_pj, stride_pr, NEED_DX, CHUNKED, ACC_DTYPE,
                   BLOCK_N, HALF, BLOCK_R)
    for pid_m in range(m_first, m_end):
        m0 = pid_m * BLOCK_M
        xa = _load_tile(xa_ptr, xa_ptr, m0, 0, M, R, stride_xam, stride_xar, BLOCK_M, BLOCK_R, False)
        acc0 = tl.zeros((BLOCK_M, HALF), dtype=ACC_DTYPE)
        acc1 = tl.zeros((BLOCK_M, HALF), dtype=ACC_DTYPE)
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            dy = _load_tile(dy_ptr, dy_desc, m0, n0, M, N, stride_dym, stride_dyn, BLOCK_M, BLOCK_N, TMA)
            if NEED_DX:
                w0 = _load_tile(w_ptr, w_desc, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, HALF, TMA)
                w1 = _load_tile(w_ptr, w_desc, n0, k0 + HALF, N, K, stride_wn, stride_wk, BLOCK_N, HALF, TMA)
                acc0 = _dot(dy, w0, acc0, UPCAST, IEEE)
                acc1 = _dot(dy, w1, acc1, UPCAST, IEEE)
            if not G_LOADED:
                b = _load_tile(b_ptr, b_ptr, n0, 0, N, R, stride_bn, stride_br, BLOCK_N, BLOCK_R, False)
                g = _dot(dy, b, g, UPCAST, IEEE)
            if (n0 // BLOCK_N) % num_kb == pid_k:  # this program's share of dB = dyᵀ xa
                _db_share(part, dy, xa, xa_ptr, m0, n0, M, N, K, R, stride_xam, stride_xar, stride_pj, stride_pr,
                          pid_m > m_first, CHUNKED, ACC_DTYPE, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)
        if NEED_DX:
            da0, da1 = _dx_tile(acc0, acc1, g, da0, da1, m0, k0, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_desc,
                                M, K, R, G_SPLITS, stride_gs, stride_gm, stride_gr, stride_xm, stride_xk,
                                stride_ar, stride_ak, stride_dxm, stride_dxk, stride_pj, stride_pr, pid_m > m_first,
                                scaling, inv_keep, seed_ptr, threshold, groups_per_row, G_LOADED, CHUNKED, DROPOUT,
                                TMA, dy_ptr.dtype.element_ty, ACC_DTYPE, UPCAST, IEEE, BLOCK_M, HALF, BLOCK_R)
        else:  # x once, after g is complete: dAᵀ partials for every column block of this run
            if not CHUNKED:
                g = _finish_g(g, g_ptr, m0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling, G_LOADED,
                              dy_ptr.dtype.element_ty, ACC_DTYPE, BLOCK_M, BLOCK_R)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            for c0 in range(0, K, HALF):
                x = _load_tile(x_ptr, x_ptr, m0, c0, M, K, stride_xm, stride_xk, BLOCK_M, HALF, False)
                if DROPOUT:
                    x = tl.where(_keep_mask(seed_ptr, threshold, offs_m, c0, groups_per_row, BLOCK_M, HALF), x, 0.0)
                if CHUNKED:
                    for r0 in range(0, R, BLOCK_R):
                        gc = _g_chunk(g_ptr, m0, r0, M, R, G_SPLITS, stride_gs, stride_gm, stride_gr, scaling,
                                      dy_ptr.dtype.element_ty, ACC_DTYPE, BLOCK_M, BLOCK_R)
                        da = _dot(tl.trans(x), gc, tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE), UPCAST, IEEE)
                        _store_partial(part, da, c0, r0, K, R, stride_pj, stride_pr, pid_m > m_first, HALF, BLOCK_R)
                else:
                    da = _dot(tl.trans(x), g, tl.zeros((HALF, BLOCK_R), dtype=ACC_DTYPE), UPCAST, IEEE)
                    _store_partial(part, da, c0, 0, K, R, stride_pj, stride_pr, pid_m > m_first, HALF, BLOCK_R)
    if NEED_DX and not CHUNKED:  # dAᵀ accumulated over the run in registers
        _store_partial(part, da0, k0, 0, K, R, stride_pj, stride_pr, False, HALF, BLOCK_R)
        _store_partial(part, da1, k0 + HALF, 0, K, R, stride_pj, stride_pr, False, HALF, BLOCK_R)


@triton.jit
def _lora_g_kernel(
    dy_ptr,  # dY (M, N)
    b_ptr,  # B (N, R)
    part_ptr,  # partial (splits, M, R), fp32: dY B over one split of N
    M, N, R, span,  # span: the length of N that each split covers
    stride_dym, stride_dyn, stride_bn, stride_br, stride_ps, stride_pm, stride_pr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The "g_pass" backward's first launch, program (row block, split, rank chunk): dY read once
    per rank chunk; the dx GEMM sums the splits' partials in split order (deterministic) and
    scales them."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R
    m0 = pid_m * BLOCK_M
    n_end = tl.minimum(N, pid_s * span + span)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for n0 in range(pid_s * span, n_end, BLOCK_N):
        dy = _load_tile(dy_ptr, dy_ptr, m0, n0, M, n_end, stride_dym, stride_dyn, BLOCK_M, BLOCK_N, False)
        b = _load_tile(b_ptr, b_ptr, n0, r0, n_end, R, stride_bn, stride_br, BLOCK_N, BLOCK_R, False)
        g = _dot(dy, b, g, UPCAST, IEEE)
    _store_tile(_strided(part_ptr, pid_s, stride_ps), part_ptr, g, m0, r0, M, R, stride_pm, stride_pr,
                BLOCK_M, BLOCK_R, False)


@triton.jit
def _reduce_runs_kernel(
    part_ptr,  # partial (runs, K + N, R) from _lora_backward_kernel
    da_ptr,  # dA (R, K) = inv_keep · Σ_runs partial[:, :K]ᵀ
    db_ptr,  # dB (N, R) = Σ_runs partial[:, K:]
    runs, K, N, R,
    stride_ps, stride_pj, stride_pr, stride_ar, stride_ak, stride_bn, stride_br,
    inv_keep,
    ACC_DTYPE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (offs_j[:, None] < K + N) & (offs_r[None, :] < R)
    ptrs = _tile_ptrs(part_ptr, offs_j, offs_r, stride_pj, stride_pr)
    acc = tl.zeros((BLOCK_J, BLOCK_R), dtype=ACC_DTYPE)
    for s in range(0, runs):  # a fixed order: deterministic
        acc += tl.load(_strided(ptrs, s, stride_ps), mask=mask, other=0.0)
    is_a = offs_j < K
    # dAᵀ rows [0, K), dB rows [K, K + N) of the partials
    _store_at(da_ptr, acc * inv_keep, offs_j, offs_r, is_a, offs_r < R, stride_ak, stride_ar)
    _store_at(db_ptr, acc, offs_j - K, offs_r, ~is_a & (offs_j < K + N), offs_r < R, stride_bn, stride_br)


# --------------------------------------------------------------------------- #
# Merge
# --------------------------------------------------------------------------- #


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
    n0 = tl.program_id(0) * BLOCK_N
    k0 = tl.program_id(1) * BLOCK_K
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        u = _load_tile(u_ptr, u_ptr, n0, r0, N, R, stride_un, stride_ur, BLOCK_N, BLOCK_R, False)
        v = _load_tile(v_ptr, v_ptr, r0, k0, R, K, stride_vr, stride_vk, BLOCK_R, BLOCK_K, False)
        delta = _dot(u, v, delta, UPCAST, IEEE)
    w = _load_tile(w_ptr, w_ptr, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, False).to(ACC_DTYPE)
    _store_tile(w_ptr, w_ptr, w + delta * scale, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, False)


# --------------------------------------------------------------------------- #
# Launch configuration
# --------------------------------------------------------------------------- #

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). The compile check
# (python_tests/triton_compile_check.py) compiles every one for sm_90a and sm_80 and fails on
# register spills: a config that spills for a kernel variant is excluded from autotuning for it
# (_EXCLUDED), not accepted. The last of each list is the fallback when none fits: it must not spill.
_GEMM_SHAPES = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
                (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 3, 8)]
_GEMM_SHAPES_POINTER = [(128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 5, 2), (64, 32, 32, 4, 4), (32, 32, 32, 3, 4)]
# Backward: BLOCK_N is the step over dY's columns, BLOCK_K the dx tile's width (two halves).
_BACKWARD_SHAPES = [(128, 64, 128, 3, 8), (128, 64, 256, 3, 8), (64, 64, 128, 4, 4), (64, 64, 128, 3, 8), (128, 32, 128, 4, 8),
                    (64, 32, 64, 4, 4), (64, 32, 64, 3, 8)]
_BACKWARD_SHAPES_POINTER = [(32, 32, 32, 3, 4), (32, 16, 32, 3, 8)]  # fp32 FMA tiles (no wgmma below 64 rows)
# NOTE: the last entries, 8 warps, are the fallbacks that no Triton of the support matrix spills:
# Triton 3.4 spills every other TMA config of the fused forward with dropout, 3.6 the 4-warp fp32
# backward tile (and 3.5 its 8-warp tile: the fallback steps over 16 columns of dY).


def gpu_configs() -> bool:
    """Whether the autotuners carry a GPU's config lists: compiled kernels, or an emulated target."""
    return not INTERPRET or emulated_target() is not None


def _gemm_configs(tma: bool = False):
    """The forward GEMM's autotuning configs (also the multi-adapter GEMM's)."""
    hook = dict(pre_hook=_set_tma_blocks) if tma else {}
    if not gpu_configs():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, **hook)]
    shapes = _GEMM_SHAPES + ([] if tma else _GEMM_SHAPES_POINTER)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w, **hook)
        for bm, bn, bk, s, w in shapes
    ]


def _backward_configs(tma: bool = False):
    hook = dict(pre_hook=_set_tma_blocks) if tma else {}
    if not gpu_configs():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, **hook)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w, **hook)
            for bm, bn, bk, s, w in _BACKWARD_SHAPES + ([] if tma else _BACKWARD_SHAPES_POINTER)]


def _set_tma_blocks(nargs):
    """Autotuning pre-hook: give the tensor descriptors the block shapes of the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if "dy_desc" in nargs:  # backward
        nargs["dy_desc"].block_shape = [bm, bn]
        if nargs["w_desc"] is not None:
            nargs["w_desc"].block_shape = [bn, bk // 2]
            nargs["dx_desc"].block_shape = [bm, bk // 2]
    else:
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]
        nargs["y_desc"].block_shape = [bm, bn]


def _shared_memory_limit(device: torch.device) -> int:
    return target(device).shared_memory_per_block


def _num_sms(device: torch.device) -> int:
    return target(device).sms


# NOTE: the budgets below count what the kernel bodies hold, rank blocks included (BLOCK_R: all of r
# in the backward and the fused forward, a chunk of <= 64 elsewhere). The compile check
# (python_tests/triton_compile_check.py, r = 8 ... 256) compares them with the compiler's figures.


def _stage_elements(cfg, backward: bool, args=None) -> int:
    """Operand elements one pipeline stage holds in shared memory: the big tiles and the rank-r tile
    loaded beside them (A in the fused forward, B where the backward accumulates g)."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    args = args or {}
    br = args.get("BLOCK_R", 0)
    if backward:  # dY, W0 (dx only), B (g in the main loop)
        return bm * bn + (bn * bk if args.get("NEED_DX", True) else 0) + (0 if args.get("G_LOADED") else bn * br)
    return bk * (bm + bn) + (bk * br if args.get("FUSED") else 0)


def _epilogue_elements(cfg, backward: bool, args) -> int:
    """Operand elements outside the pipeline: the rank-r dot operands of the epilogue and, with TMA,
    the output tile staged for its store."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args.get("BLOCK_R", 0)
    if backward:  # xa and dyᵀ (dB), g, A and x, xᵀ half tiles (dx, dAᵀ), the two dx half tiles
        half = bk // 2
        return 2 * bm * br + bm * bn + (br + 2 * bm) * half + (bm * bk if args.get("TMA") else 0)
    return bm * br + bn * br + (bm * bn if args.get("TMA") else 0)  # xa, B (U), the y tile


def _register_elements(cfg, backward: bool, args) -> int:
    """fp32 (fp64 for fp64 operands) elements the kernel keeps live in registers: the accumulator
    tiles and the rank blocks beside them."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args.get("BLOCK_R", 0)
    if backward:  # acc0 + acc1 (and the masked half tile) with dx; g; dAᵀ (a half tile's unless held); dB
        dx = args.get("NEED_DX", True)
        held = dx and not args.get("CHUNKED")  # dA0, dA1 held over the run
        acc = (bm * bk + (bm * bk // 2 if args.get("DROPOUT") else 0)) if dx else 0
        return acc + bm * br + (bk if held else bk // 2) * br + bn * br
    if "LOAD_C" in args:  # the SGMV GEMM: U's chunk by pointer into registers, the masked tile with dropout
        return bm * bn + bm * br + bn * br + (bm * bn if args.get("DROPOUT") else 0)
    keep = bm * bk if args.get("FUSED") and args.get("DROPOUT") else 0  # the x tile's Philox words and mask
    return bm * bn + bm * br + keep


def _shared_bytes(cfg, backward: bool, args, element_size: int) -> int:
    """Shared memory of a config for a kernel variant: its pipeline stages, the epilogue's operands
    and, where a rank block is summed from fp32 partials (two-pass forward, g pass), their tile."""
    partials = args.get("G_LOADED") if backward else not args.get("FUSED") and "LOAD_C" not in args
    acc_bytes = 8 if element_size == 8 else 4
    return ((cfg.num_stages * _stage_elements(cfg, backward, args) + _epilogue_elements(cfg, backward, args))
            * element_size + (cfg.kwargs["BLOCK_M"] * args.get("BLOCK_R", 0) * acc_bytes if partials else 0))


def _fits(cfg, args, backward: bool, element_size: int, shared_limit: int) -> bool:
    """Whether ``cfg`` fits the shared memory and the register file for this kernel variant."""
    per_thread = _register_elements(cfg, backward, args) * max(1, element_size // 4) / (32 * cfg.num_warps)
    budget = REGISTER_BUDGET.get((backward, cfg.num_warps), REGISTER_BUDGET[(backward, 8)])
    return _shared_bytes(cfg, backward, args, element_size) <= shared_limit and per_thread <= budget


VARIANT_FLAGS = ("FUSED", "NEED_DX", "G_LOADED", "LOAD_C", "DROPOUT", "TMA")


def config_key(kernel: str, arch: int, element_size: int, named_args: dict, cfg) -> tuple:
    """How _EXCLUDED names a config of a kernel variant for an architecture and operand size."""
    variant = tuple(int(bool(named_args[k])) if k in named_args else -1 for k in VARIANT_FLAGS)
    shape = tuple(cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (kernel, arch, element_size, variant, shape + (cfg.num_stages, cfg.num_warps))


def _target_arch(device: torch.device):
    """The architecture whose compile-check results apply: 90 (Hopper and newer), 80, or None."""
    return target(device).arch


def _prune(configs, named_args, backward, kernel=None):
    """NOTE: ``named_args`` holds every argument, positional or keyword: Triton's ``Autotuner.run``
    passes the positional ones as ``named_args`` and the keywords separately (the prune functions
    below merge them), and our launches pass keywords only."""
    out = named_args.get("c_ptr", named_args.get("y_ptr", named_args.get("dy_ptr")))
    if out is None:
        raise TypeError(f"prune of {kernel or 'a GEMM'}: no output tensor (c_ptr, y_ptr or dy_ptr) among "
                        f"its arguments {sorted(named_args)}")
    limit = _shared_memory_limit(out.device)
    arch = _target_arch(out.device) if kernel else None
    fitting = [cfg for cfg in configs
               if _fits(cfg, named_args, backward, out.element_size(), limit)
               and (arch is None or config_key(kernel, arch, out.element_size(), named_args, cfg) not in _EXCLUDED)]
    fitting = fitting or configs[-1:]
    if not AUTOTUNE:
        return fitting[:1]
    return fitting[:MAX_CONFIGS] if MAX_CONFIGS > 0 else fitting


def prune_gemm_configs(configs, named_args, kernel=None, **kwargs):
    """Autotuning pre-filter: drop configs whose pipelined tiles cannot fit in shared memory for
    the operand dtype (fp32 and fp64 tiles are 2-4x larger) and, given the ``kernel``'s name, the
    configs that the compile check found spilling for this variant (``_EXCLUDED``); keep only the
    first without AUTOTUNE (at most MAX_CONFIGS with it). Called as ``Autotuner.run`` calls it:
    positional arguments in ``named_args``, keyword arguments in ``kwargs``."""
    return _prune(configs, {**named_args, **kwargs}, False, kernel)


def prune_backward_configs(configs, named_args, **kwargs):
    """:func:`prune_gemm_configs` for the backward kernel's tiles."""
    return _prune(configs, {**named_args, **kwargs}, True, "_lora_backward_kernel")


# Configs that spill registers or overflow shared memory, per Triton version and (kernel, arch,
# operand bytes, variant, config): generated by `python python_tests/triton_compile_check.py --update`.
from ._triton_excluded import EXCLUDED_BY_TRITON  # noqa: E402


def excluded_configs(version: str) -> set:
    """The exclusion table of Triton ``version``. NOTE: register allocation changes between Triton
    releases (a config that fits on 3.8 spills on 3.6), so each version the compile check ran on
    has its own entry; a version it has not run on gets every measured version's exclusions, a
    best effort only: run the check with ``--update`` on a Triton before supporting it."""
    key = ".".join(version.split(".")[:2])
    if key in EXCLUDED_BY_TRITON:
        return EXCLUDED_BY_TRITON[key]
    return set().union(*EXCLUDED_BY_TRITON.values())


_EXCLUDED = excluded_configs(triton.__version__)

_FORWARD_KEY = ["M_BUCKET", "N", "K", "R", "FUSED", "DROPOUT", "HAS_BIAS", "TMA"]
_BACKWARD_KEY = ["M_BUCKET", "N", "K", "R", "NEED_DX", "G_LOADED", "DROPOUT", "TMA"]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, tma: bool):
    """The autotuned kernels, built on first use: some Triton versions touch the GPU driver when an
    autotuner is built, which must not happen at import on a machine without a GPU."""
    if name == "forward":
        prune = functools.partial(prune_gemm_configs, kernel="_lora_forward_kernel")
        return triton.autotune(_gemm_configs(tma), key=_FORWARD_KEY,
                               prune_configs_by={"early_config_prune": prune})(_lora_forward_kernel)
    return triton.autotune(_backward_configs(tma), key=_BACKWARD_KEY,
                           prune_configs_by={"early_config_prune": prune_backward_configs})(_lora_backward_kernel)


# --------------------------------------------------------------------------- #
# TMA: where it runs, and what happens when it cannot
# --------------------------------------------------------------------------- #

# Which GEMM kernels run: None uses TMA on Hopper (and newer) for fp16/bf16 operands that TMA
# can address; True/False force it on or off where it can run at all.
USE_TMA = None
# Cases (kernel, dtype, shapes, strides) whose TMA build failed: only these use the pointer GEMM.
_TMA_FAILED_CASES: set = set()
_WARNED: set = set()


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _tma_addressable(t: torch.Tensor) -> bool:
    """TMA reads a 2-D tensor with unit inner stride, 16-byte aligned base and row pitch."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _capability(device: torch.device):
    return target(device).capability


def _tma_case(kernel: str, *tensors) -> tuple:
    return (kernel,) + tuple((t.dtype, tuple(t.shape), tuple(t.stride())) for t in tensors)


def _use_tma(kernel: str, *tensors) -> bool:
    """Whether ``kernel`` runs with tensor descriptors for ``tensors`` (its TMA operands)."""
    if USE_TMA is None and HAS_TENSOR_DESCRIPTOR and not _tma_by_default(tensors[0]):  # cheap checks first
        return False
    if USE_TMA is False or not all(_tma_addressable(t) for t in tensors):
        return False
    if not HAS_TENSOR_DESCRIPTOR:
        if USE_TMA or target(tensors[0].device).tma:
            _warn_once("no-tma", "lora_kernels: this Triton has no triton.tools.tensor_descriptor; "
                                 "the GEMMs use pointer loads (slower on Hopper)")
        return False
    if USE_TMA:
        return True
    return _tma_by_default(tensors[0]) and not (_TMA_FAILED_CASES and _tma_case(kernel, *tensors) in _TMA_FAILED_CASES)


def _tma_by_default(x: torch.Tensor) -> bool:
    """Automatic mode: TMA for fp16/bf16 on Hopper and newer (compiled, or an emulated target)."""
    return x.dtype in (torch.float16, torch.bfloat16) and target(x.device).tma


def _gemm_uses_tma(x, w):
    """Whether the forward GEMM of ``x`` (M, K) and ``w`` (N, K) runs with TMA (the multi-adapter
    launcher asks). Returns None when it does not (kept for its callers' truth tests)."""
    return True if _use_tma("forward", x, w) else None


def _descriptor(t: torch.Tensor):
    """A host tensor descriptor (block shape set per config by _set_tma_blocks). NOTE: built per
    call (a small object, no device work, no sync); caching it would keep ``t`` alive."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [1] * t.dim())


def _tma_build_errors() -> tuple:
    """The exceptions that mean "this toolchain cannot build the TMA kernel for these operands":
    a compile error, or a config out of the chip's resources. Feature-detected per Triton."""
    errors = []
    for module, name in (("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "OutOfResources"),
                         ("triton.runtime.errors", "PTXASError"), ("triton.compiler.errors", "CompileTimeAssertionFailure")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_TMA_BUILD_ERRORS = _tma_build_errors()


def tma_fallbacks() -> list:
    """The cases ``(kernel, (dtype, shape, strides) per TMA operand...)`` whose TMA kernel failed to
    build in this process and now run the pointer kernel (a GPU check fails on any)."""
    return sorted(_TMA_FAILED_CASES, key=repr)


def _launch(kernel: str, tma_tensors, launch_tma, launch_pointer):
    """Run ``launch_tma`` where TMA applies; if it fails to *build* (a compile error, or out of the
    chip's resources), warn once for this case (shapes, strides, dtype), remember it
    (:func:`tma_fallbacks`), and run the pointer GEMM for it from now on. NOTE: any other error (a
    crash, a bad descriptor, a wrong argument) propagates: it is a bug, not a slow path to hide."""
    if _use_tma(kernel, *tma_tensors):
        try:
            return launch_tma()
        except _TMA_BUILD_ERRORS as exc:  # a toolchain without TMA support for these operands
            if USE_TMA:
                raise
            case = _tma_case(kernel, *tma_tensors)
            _TMA_FAILED_CASES.add(case)
            _warn_once(case, f"lora_kernels: the TMA {kernel} kernel failed to build for (dtype, shape, strides) = "
                             f"{case[1:]} ({exc!r}); this case uses the pointer kernel from now on")
    return launch_pointer()


# --------------------------------------------------------------------------- #
# Host helpers
# --------------------------------------------------------------------------- #


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints. NOTE: not ``triton.cdiv``: since Triton 3.5 that is a
    ``constexpr_function`` whose wrapper costs ~2 µs per host call, several per launch."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for n ≤ 1), as ``triton.next_power_of_2`` (see :func:`_cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _block_r(R: int) -> int:
    """Rank block of the kernels: tl.dot needs every dimension ≥ 16; ranks above RANK_CHUNK go
    by chunks of RANK_CHUNK (merge, multi-adapter, the two-pass forward's epilogue, the shrink and
    g passes, the CHUNKED backward)."""
    return min(RANK_CHUNK, _full_block_r(R))


def _full_block_r(R: int) -> int:
    """All of r in one block: the fused forward's xa accumulator (r ≤ FUSED_MAX_RANK)."""
    return max(16, _next_pow2(R))


def _dtype_flags(dtype: torch.dtype) -> dict:
    """Accumulator dtype and dot precision for an operand dtype (compile-time switches)."""
    upcast = INTERPRET and dtype == torch.bfloat16
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        UPCAST=upcast,
        IEEE=dtype in (torch.float32, torch.float64) or upcast,
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _unused_seed(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _dropout_args(dropout_p: float, seed, cols: int, device: torch.device) -> dict:
    """Kernel arguments of the dropout mask; ``seed`` is an int or a 0-dim int64 tensor."""
    seed = _unused_seed(device) if dropout_p == 0.0 else device_seed(seed, device)
    return dict(seed_ptr=seed, threshold=dropout_threshold(dropout_p), groups_per_row=_cdiv(cols, 4),
                DROPOUT=dropout_p > 0.0)


def _inv_keep(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def forward_plan(M, K, N, R, dtype, dropout_p, device) -> str:
    """``"fused"`` or ``"two_pass"``: FORWARD_PLAN if set, else the cost model's choice."""
    plan = FORWARD_PLAN
    if plan is None:
        try:
            from .cost_model import choose_forward_plan
        except ImportError:
            plan = "two_pass"
        else:
            plan = choose_forward_plan(M, K, N, R, dtype, dropout_p, device)
    if plan not in ("fused", "two_pass"):
        raise ValueError(f"unknown forward plan {plan!r}; expected 'fused' or 'two_pass'")
    return "fused" if plan == "fused" and R <= FUSED_MAX_RANK else "two_pass"


def backward_plan(M, K, N, R, dtype, dropout_p, need_grad_x, device) -> str:
    """``"fused"`` or ``"g_pass"``: BACKWARD_PLAN if set, else the cost model's choice; always
    ``"fused"`` without ``need_grad_x`` (no dx GEMM to relieve)."""
    plan = BACKWARD_PLAN
    if plan is None:
        try:
            from .cost_model import choose_backward_plan
        except ImportError:
            plan = "fused"
        else:
            plan = choose_backward_plan(M, K, N, R, dtype, dropout_p, need_grad_x, device)
    if plan not in ("fused", "g_pass"):
        raise ValueError(f"unknown backward plan {plan!r}; expected 'fused' or 'g_pass'")
    if R > RANK_CHUNK:  # rank chunks: g cannot be accumulated whole in the main loop
        return "g_pass"
    return plan if need_grad_x else "fused"


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #


# NOTE: what a launch's shapes fix (plans, block sizes, splits, strides, grids, every non-tensor
# argument) is computed once per plan key: every shape, stride and dtype of the call's tensors,
# its device, scalars and the module's settings. Per call only the tensors are put in. The cache is
# bounded: a token count that changes every step makes a new key each time, and past
# PLAN_CACHE_SIZE keys it starts over.
PLAN_CACHE_SIZE = 512
_PLANS: dict = {}


def _remember(cache: dict, key, value):
    if len(cache) >= PLAN_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _cached_plan(key, build):
    plan = _PLANS.get(key)
    return plan if plan is not None else _remember(_PLANS, key, build())


def clear_launch_caches() -> None:
    """Forget every launch plan, and with them the tuned configs (rebuilt on the next call)."""
    _PLANS.clear()


def _settings() -> tuple:
    """The module settings a plan depends on (they may be changed at run time)."""
    return (FORWARD_PLAN, BACKWARD_PLAN, AUTOTUNE, MAX_CONFIGS, USE_TMA, FLATTEN, FUSED_MAX_RANK, emulated_target())


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (1, 1, 1) tensor for a pointer operand a kernel variant never reads."""
    return torch.empty(1, 1, 1, device=device, dtype=dtype)


def _seed_arg(dropout_p: float, seed, device: torch.device) -> torch.Tensor:
    return _unused_seed(device) if dropout_p == 0.0 else device_seed(seed, device)


def _forward_gemm_plan(x, w, bias, y, xa, a, part, b, xa_scale, dropout_p, fused) -> dict:
    """The non-tensor arguments and grids of the forward kernel for these tensors' shapes and strides."""
    M, K = x.shape
    N, R = w.shape[0], b.shape[1]
    args = dict(
        M=M, N=N, K=K, R=R, L_SPLITS=part.shape[0], M_BUCKET=_next_pow2(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_ls=part.stride(0), stride_lm=part.stride(1), stride_lr=part.stride(2),
        stride_bn=b.stride(0), stride_br=b.stride(1), stride_bias=bias.stride(0) if bias is not None else 0,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_xam=xa.stride(0) if xa is not None else 0, stride_xar=xa.stride(1) if xa is not None else 0,
        xa_scale=xa_scale, threshold=dropout_threshold(dropout_p), groups_per_row=_cdiv(K, 4),
        DROPOUT=dropout_p > 0.0, FUSED=fused, STORE_XA=xa is not None, HAS_BIAS=bias is not None,
        BLOCK_R=_full_block_r(R) if fused else _block_r(R), **_dtype_flags(x.dtype),
    )
    tiles = lambda meta: _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])  # noqa: E731
    programs = _num_sms(x.device)
    return dict(args=args, flatten=bool(FLATTEN and HAS_FLATTEN),
                grid_tma=lambda meta: (min(programs, tiles(meta)),), grid_pointer=lambda meta: (tiles(meta),))


def _forward_gemm(x, w, bias, y, xa, *, lora_A=None, partials=None, b, xa_scale, dropout_p=0.0, seed=0, owner=None):
    """The forward kernel: ``y = x wᵀ + bias + xa bᵀ`` with xa from ``lora_A`` (fused) or from the
    fp32 ``partials`` (S, M, R) of the shrink kernel, times ``xa_scale``; xa is stored when given.
    ``owner``: the call's cached plan (see _PLANS), which keeps this kernel's plan, or None to
    build it afresh."""
    fused = partials is None
    dropout_p = dropout_p if fused else 0.0
    a = lora_A if fused else b  # an unused pointer operand still needs a tensor
    part = partials if not fused else _placeholder(y.device, _acc_dtype(y.dtype))
    plan = owner.get("gemm") if owner is not None else None
    if plan is None:
        plan = _forward_gemm_plan(x, w, bias, y, xa, a, part, b, xa_scale, dropout_p, fused)
        if owner is not None:
            owner["gemm"] = plan
    cached = plan if owner is not None else None
    args = dict(plan["args"], bias_ptr=bias if bias is not None else y, a_ptr=a, l_ptr=part, b_ptr=b, y_ptr=y,
                xa_ptr=xa if xa is not None else y, seed_ptr=_seed_arg(dropout_p, seed, x.device))

    def tma():
        planned_launch(_autotuned("forward", True), plan["grid_tma"], dict(
            args, x_ptr=x, x_desc=_descriptor(x), w_ptr=w, w_desc=_descriptor(w), y_desc=_descriptor(y),
            TMA=True, FLATTEN=plan["flatten"]), cached, "tma")

    def pointer():
        planned_launch(_autotuned("forward", False), plan["grid_pointer"], dict(
            args, x_ptr=x, x_desc=None, w_ptr=w, w_desc=None, y_desc=None, TMA=False, FLATTEN=False), cached, "pointer")

    _launch("forward", (x, w, y), tma, pointer)
    return y


def gemm_lora_up(x, w, bias, l, u):
    """``X Wᵀ + b + L Uᵀ`` for X (M, K), W (N, K), L (M, R), U (N, R); any strides (the
    multi-adapter launcher runs its base GEMM through this, with R = 0)."""
    M, N = x.shape[0], w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    return _forward_gemm(x, w, bias, y, None, partials=l.unsqueeze(0), b=u, xa_scale=1.0)


def _shrink_splits(M: int, K: int, block_m: int, block_k: int, device) -> int:
    """Splits of the reduced length K of a thin pass (the shrink kernel, the g pass): only when
    its row blocks alone leave the GPU idle."""
    row_blocks = _cdiv(M, block_m)
    return max(1, min(_cdiv(K, block_k), _num_sms(device) // row_blocks))


def _forward_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> tuple:
    """The plan key of a forward call (see _PLANS)."""
    return ("forward", x.shape, x.stride(), weight.shape, weight.stride(), lora_A.shape, lora_A.stride(),
            lora_B.stride(), None if bias is None else bias.stride(), x.dtype, x.device, scaling, dropout_p,
            _settings())


def _shrink_plan(x, lora_A, R, dropout_p) -> dict:
    """Block sizes, splits, grid and non-tensor arguments of the shrink kernel (two-pass forward)."""
    M, K = x.shape
    block_m, block_k, launch = (64, 128, dict(num_warps=4, num_stages=3)) if target(x.device).gpu else (32, 32, {})
    if x.element_size() == 8:  # fp64 tiles: half the K block, two stages, to fit shared memory
        block_k, launch["num_stages"] = block_k // 2, 2
    span, splits = _split_shape(M, K, block_m, block_k, x.device)
    return dict(grid=(_cdiv(M, block_m), splits, _cdiv(R, _block_r(R))), part_shape=(splits, M, R), args=dict(
        M=M, K=K, R=R, span=span, stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_ps=M * R, stride_pm=R, stride_pr=1,
        threshold=dropout_threshold(dropout_p), groups_per_row=_cdiv(K, 4), DROPOUT=dropout_p > 0.0,
        **_dtype_flags(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(R), **launch))


@on_input_device
def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, xa)``: one fused launch, or the shrink kernel then the GEMM (see forward_plan)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = x.new_empty(M, N)
    xa = x.new_empty(M, R)
    if M == 0 or N == 0:
        return y, xa.zero_()
    key = _forward_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    plan = _cached_plan(key, lambda: dict(
        fused=forward_plan(M, K, N, R, x.dtype, dropout_p, x.device) == "fused",
        xa_scale=scaling * _inv_keep(dropout_p)))
    if plan["fused"]:
        _forward_gemm(x, weight, bias, y, xa, lora_A=lora_A, b=lora_B, xa_scale=plan["xa_scale"],
                      dropout_p=dropout_p, seed=seed, owner=plan)
        return y, xa
    part = _shrink_partials(x, lora_A, dropout_p, seed, plan)
    _forward_gemm(x, weight, bias, y, xa, partials=part, b=lora_B, xa_scale=plan["xa_scale"], owner=plan)
    return y, xa


def _shrink_partials(x, lora_A, dropout_p, seed, plan=None):
    """The two_pass forward's first launch: fp32 partials (S, M, R) of ``(x ⊙ D) Aᵀ`` over S splits of K.

    ``plan``: the caller's cached launch plan, which keeps the shrink's own (the 4-bit forward has none)."""
    M, K = x.shape
    R = lora_A.shape[0]
    shrink = None if plan is None else plan.get("shrink")
    if shrink is None:
        shrink = _shrink_plan(x, lora_A, R, dropout_p)
        if plan is not None:
            plan["shrink"] = shrink
    part = torch.empty(shrink["part_shape"], device=x.device, dtype=_acc_dtype(x.dtype))
    planned_launch(_lora_shrink_kernel, shrink["grid"], dict(
        shrink["args"], x_ptr=x, a_ptr=lora_A, part_ptr=part, seed_ptr=_seed_arg(dropout_p, seed, x.device),
    ), shrink if plan is not None else None, "launch")
    return part


def _split_shape(M: int, L: int, block_m: int, block_l: int, device) -> tuple[int, int]:
    """``(span, splits)`` of a thin pass over an (M, L) operand: the L axis split into spans of whole
    blocks, as many as :func:`_shrink_splits` asks."""
    splits = _shrink_splits(M, L, block_m, block_l, device)
    span = _cdiv(_cdiv(L, splits), block_l) * block_l
    return span, max(1, _cdiv(L, span))


def _split_partials(M: int, L: int, R: int, block_m: int, block_l: int, t: torch.Tensor):
    """``(span, part)`` of a thin pass over ``t`` (M, L) into r columns: the L axis split into spans
    of whole blocks (as many as :func:`_shrink_splits` asks), and the (splits, M, R) fp32 partials."""
    span, splits = _split_shape(M, L, block_m, block_l, t.device)
    return span, torch.empty(splits, M, R, device=t.device, dtype=_acc_dtype(t.dtype))


def _backward_runs(M: int, K: int, R: int, element_size: int, need_grad_x: bool, device) -> int:
    """How many runs of row blocks the backward splits M into: enough programs to fill the GPU
    (one per (run, dx column block)), no more, and no more than keeps the partials (a (K + N) x r
    fp32 block per run, written once and read once) within 1/8 of the bytes of x and dy."""
    column_blocks = _cdiv(K, 128) if need_grad_x else 1
    partial_cap = M * element_size // (32 * max(R, 1))
    return max(1, min(_num_sms(device) // column_blocks, _cdiv(M, 64), partial_cap))


# Rows per program of the g pass (cost_model.G_PASS_ROWS models the same).
G_PASS_ROWS = 32


def _g_pass_plan(dy, lora_B) -> dict:
    """Block sizes, splits, grid and non-tensor arguments of the g pass."""
    M, N = dy.shape
    R = lora_B.shape[1]
    # NOTE: 32-row blocks so that this memory-bound pass has many programs (256 at 8192 tokens).
    gpu = target(dy.device).gpu
    block_m, block_n, launch = (G_PASS_ROWS, 128, dict(num_warps=4, num_stages=3)) if gpu else (G_PASS_ROWS, 32, {})
    if dy.element_size() == 8:
        block_n, launch["num_stages"] = 64, 2
    elif dy.element_size() == 4 and gpu:
        block_n = 64  # NOTE: fp32 tiles of 128 columns took a stack frame on Triton 3.5
    span, splits = _split_shape(M, N, block_m, block_n, dy.device)
    return dict(grid=(_cdiv(M, block_m), splits, _cdiv(R, _block_r(R))), part_shape=(splits, M, R), args=dict(
        M=M, N=N, R=R, span=span, stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
        stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1), stride_ps=M * R, stride_pm=R, stride_pr=1,
        **_dtype_flags(dy.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R), **launch))


def _g_pass(dy, lora_B, plan=None):
    """fp32 partials (S, M, R) of ``dy B`` over S splits of N: the first launch of the "g_pass"
    backward. S = 1 unless the row blocks alone cannot fill the GPU (as the forward's shrink)."""
    cached, plan = plan, plan or _g_pass_plan(dy, lora_B)
    part = torch.empty(plan["part_shape"], device=dy.device, dtype=_acc_dtype(dy.dtype))
    planned_launch(_lora_g_kernel, plan["grid"], dict(plan["args"], dy_ptr=dy, b_ptr=lora_B, part_ptr=part),
                   cached, "launch")
    return part


def _backward_plan(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, need_grad_x) -> dict:
    """Everything of a backward call that its shapes, strides and flags fix (see _PLANS)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    runs = _backward_runs(M, K, R, x.element_size(), need_grad_x, x.device)
    g_loaded = backward_plan(M, K, N, R, x.dtype, dropout_p, need_grad_x, x.device) == "g_pass"
    g_plan = _g_pass_plan(dy, lora_B) if g_loaded else None
    # g: the g pass's contiguous (S, M, R) partials, or xa.unsqueeze(0) as an unused pointer operand
    g_strides = (M * R, R, 1) if g_loaded else (xa.shape[0] * xa.stride(0), xa.stride(0), xa.stride(1))
    dx_strides = (K, 1) if need_grad_x else x.stride()
    part_strides = ((K + N) * R, R, 1)
    args = dict(
        M=M, N=N, K=K, R=R, runs=runs, G_SPLITS=g_plan["part_shape"][0] if g_loaded else 0, M_BUCKET=_next_pow2(M),
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1), stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        stride_gs=g_strides[0], stride_gm=g_strides[1], stride_gr=g_strides[2],
        stride_dxm=dx_strides[0], stride_dxk=dx_strides[1],
        stride_ps=part_strides[0], stride_pj=part_strides[1], stride_pr=part_strides[2],
        scaling=scaling, inv_keep=_inv_keep(dropout_p), threshold=dropout_threshold(dropout_p),
        groups_per_row=_cdiv(K, 4), DROPOUT=dropout_p > 0.0,
        NEED_DX=need_grad_x, G_LOADED=g_loaded, CHUNKED=R > _block_r(R), BLOCK_R=_block_r(R), **_dtype_flags(x.dtype),
    )
    column_blocks = lambda meta: _cdiv(K, meta["BLOCK_K"]) if need_grad_x else 1  # noqa: E731
    # grad_A / grad_B come from empty_like(lora_A / lora_B): the strides it gives them
    da_strides, db_strides = torch.empty_like(lora_A).stride(), torch.empty_like(lora_B).stride()
    return dict(
        runs=runs, g_loaded=g_loaded, g_plan=g_plan, args=args, grid=lambda meta: (runs * column_blocks(meta),),
        **_reduce_plan(runs, K, N, R, da_strides, db_strides, dropout_p, x.dtype, x.device),
    )


@on_input_device
def lora_backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x):
    """``(dx, dA, dB)`` as in reference.lora_backward: [the g pass (plan "g_pass"),] the backward
    kernel, then the reduction (see backward_plan)."""
    dy = grad_out
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    grad_A, grad_B = torch.empty_like(lora_A), torch.empty_like(lora_B)
    grad_x = x.new_empty(M, K) if need_grad_x else x.new_empty(0)
    if M == 0 or R == 0 or (K == 0 and N == 0):
        return (grad_x.zero_(), grad_A.zero_(), grad_B.zero_())
    key = ("backward", dy.shape, dy.stride(), x.shape, x.stride(), weight.shape, weight.stride(), lora_A.shape,
           lora_A.stride(), lora_B.stride(), xa.stride(), x.dtype, x.device, scaling, dropout_p, need_grad_x,
           _settings())
    plan = _cached_plan(key, lambda: _backward_plan(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, need_grad_x))
    part = torch.empty(plan["runs"], K + N, R, device=x.device, dtype=_acc_dtype(x.dtype))
    dx = grad_x if need_grad_x else x  # an unused pointer operand still needs a tensor
    g = _g_pass(dy, lora_B, plan["g_plan"]) if plan["g_loaded"] else xa.unsqueeze(0)  # (xa: an unused operand)
    args = dict(plan["args"], x_ptr=x, a_ptr=lora_A, b_ptr=lora_B, xa_ptr=xa, g_ptr=g, dx_ptr=dx, part_ptr=part,
                seed_ptr=_seed_arg(dropout_p, seed, x.device))

    def tma():
        descs = (dict(w_desc=_descriptor(weight), dx_desc=_descriptor(grad_x)) if need_grad_x
                 else dict(w_desc=None, dx_desc=None))
        planned_launch(_autotuned("backward", True), plan["grid"], dict(
            args, dy_ptr=dy, dy_desc=_descriptor(dy), w_ptr=weight, TMA=True, **descs), plan, "tma")

    def pointer():
        planned_launch(_autotuned("backward", False), plan["grid"], dict(
            args, dy_ptr=dy, dy_desc=None, w_ptr=weight, w_desc=None, dx_desc=None, TMA=False), plan, "pointer")

    _launch("backward", (dy, weight, grad_x) if need_grad_x else (dy,), tma, pointer)
    _reduce_partials(part, grad_A, grad_B, dropout_p, plan)
    return grad_x, grad_A, grad_B


def _reduce_plan(runs: int, K: int, N: int, R: int, da_strides, db_strides, dropout_p: float, dtype, device) -> dict:
    """Grid and arguments of the reduction of (runs, K + N, R) contiguous partials into dA, dB."""
    block_j, block_r = (128, 16) if target(device).gpu else (32, 16)
    return dict(
        reduce_grid=(_cdiv(K + N, block_j), _cdiv(R, block_r)),
        reduce_args=dict(runs=runs, K=K, N=N, R=R, stride_ps=(K + N) * R, stride_pj=R, stride_pr=1,
                         stride_ar=da_strides[0], stride_ak=da_strides[1], stride_bn=db_strides[0],
                         stride_br=db_strides[1], inv_keep=_inv_keep(dropout_p),
                         ACC_DTYPE=_dtype_flags(dtype)["ACC_DTYPE"], BLOCK_J=block_j, BLOCK_R=block_r),
    )


def _reduce_partials(part, grad_A, grad_B, dropout_p, plan=None):
    """The backward's last launch: ``dA``, ``dB`` from the per-run partials (runs, K + N, R), in run order.

    ``plan``: the caller's cached launch plan holding the reduction's (see :func:`_reduce_plan`)."""
    cached = plan
    if plan is None:
        runs, KN, R = part.shape
        K = grad_A.shape[1]
        plan = _reduce_plan(runs, K, KN - K, R, grad_A.stride(), grad_B.stride(), dropout_p, part.dtype, part.device)
    planned_launch(_reduce_runs_kernel, plan["reduce_grid"],
                   dict(plan["reduce_args"], part_ptr=part, da_ptr=grad_A, db_ptr=grad_B), cached, "reduce")


@on_input_device
def lora_merge_(weight, lora_A, lora_B, scaling):
    """``W0 += s·B A`` in place; the factors may be held in another float dtype than W0."""
    N, K = weight.shape
    R = lora_A.shape[0]
    if N == 0 or K == 0:
        return
    if weight.dtype == torch.float64:  # an fp64 accumulator needs fp64 operands for tl.dot
        lora_A, lora_B = lora_A.double(), lora_B.double()
    gpu = target(weight.device).gpu
    block_n, block_k = (64, 128 if weight.element_size() < 8 else 64) if gpu else (32, 32)
    _merge_kernel[(_cdiv(N, block_n), _cdiv(K, block_k))](
        weight, lora_B, lora_A, N, K, R,
        weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        scaling, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(R),
        **_dtype_flags(lora_A.dtype),
        **(dict(num_warps=4, num_stages=2) if gpu else {}),
    )
