"""Triton kernels for the LoRA layer on a bitsandbytes 4-bit base, and their launchers.

The plan of :mod:`lora_kernels.triton_ops`, with ``W0`` read as bitsandbytes stores it (packed
4-bit codes, per-block absmax, optionally double-quantised: :mod:`lora_kernels.nf4.reference`)
and dequantised tile by tile inside the GEMM main loops: it never exists in memory at full size.

``_qlora_forward_kernel``   y = x deq(W0)ᵀ + b + xa Bᵀ and xa    the fused plan (xa from the x tile in the
                                                               main loop) or the two-pass plan (the partials
                                                               of triton_ops' ``_lora_shrink_kernel``)
``_dequant_kernel``         W0 = deq(W0₄)                       the "dequant" variant (large token counts, by the
                                                               cost model): W0 once into a 16-bit copy for one
                                                               call, then triton_ops' kernels
``_qlora_backward_kernel``  dx = dy deq(W0) + (g A) ⊙ D          runs of row blocks as the bf16 backward: g =
                                                               s·dy B in the main loop (or triton_ops' g pass),
                                                               per-run fp32 partials of dAᵀ and dB, reduced by
                                                               triton_ops' ``_reduce_runs_kernel``

Without ``need_grad_x`` the backward does not read ``W0`` at all, so the bf16 launcher runs it.
The dequantised tile is ``round(round_W(code[q] · absmax), x.dtype)``, bit for bit bitsandbytes'
``dequantize_4bit(...).to(x.dtype)`` (the kernels are compiled without FMA contraction, so the
nested ``absmax = code2[q]·absmax2 + offset`` rounds as bitsandbytes rounds it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import triton_ops as t
from .._runtime import on_input_device
from ..triton_ops import (_db_share, _dot, _dx_tile, _empty_run, _forward_epilogue, _keep_mask, _load_tile,
                          _round_to, _store_partial, _store_tile, _strided, _tile_coords)
from .reference import QuantWeight

# Which variant runs: None asks lora_kernels.cost_model.choose_qlora_variant (per forward and per backward);
# "fused" (W0 dequantised tile by tile in the GEMM main loop, re-done for every row block) or "dequant"
# (W0 dequantised once into a 16-bit copy that lives for one call, then triton_ops' kernels) force one.
QLORA_VARIANT = None

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}
# NOTE: FMA contraction would fuse the nested absmax's multiply-add (one rounding, not bitsandbytes' two).
_LAUNCH = {} if t.INTERPRET else dict(enable_fp_fusion=False)


@triton.jit
def _dequant_tile(
    q_ptr,  # packed codes, uint8 (N·K/2,): element i in the high nibble of byte i//2 when i is even
    absmax_ptr,  # fp32 (N·K/BLOCKSIZE,), or uint8 codes into code2 (NESTED)
    code_ptr,  # fp32 (16,): the value of each 4-bit code
    absmax2_ptr, code2_ptr, offset_ptr,  # NESTED: fp32 (blocks/BLOCKSIZE2,), fp32 (256,), fp32 (1,)
    n0, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr, W_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """deq(W0)[n0 : n0 + BLOCK_N, k0 : k0 + BLOCK_K] in OUT_DTYPE, zero outside the matrix (k0 even)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_byte = k0 // 2 + tl.arange(0, HALF)
    rows = offs_n.to(tl.int64)[:, None]
    in_rows = offs_n[:, None] < N
    packed = tl.load(q_ptr + rows * (K // 2) + offs_byte[None, :],
                     mask=in_rows & (offs_byte[None, :] < K // 2), other=0).to(tl.int32)
    # Columns 2j and 2j + 1 are the high and low nibbles of byte j.
    codes = tl.interleave(packed >> 4, packed & 0xF)
    values = tl.load(code_ptr + codes)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = in_rows & (offs_k[None, :] < K)
    block = rows * (K // BLOCKSIZE) + offs_k[None, :] // BLOCKSIZE
    if NESTED:
        absmax_q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + absmax_q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    w = _round_to(values * scale, W_DTYPE)
    return _round_to(tl.where(inside, w.to(tl.float32), 0.0), OUT_DTYPE)


@triton.jit
def _dequant_kernel(
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # W0 (N, K), 4-bit (_dequant_tile)
    w_ptr,  # out: W0 (N, K) in its dtype
    N, K, stride_wn, stride_wk,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequant_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, n0, k0, N, K,
                      BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, w_ptr.dtype.element_ty)
    _store_tile(w_ptr, w_ptr, w, n0, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, False)


@triton.jit
def _qlora_forward_kernel(
    x_ptr,  # X (M, K)
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # W0 (N, K), 4-bit (_dequant_tile)
    bias_ptr,  # b (N,), any stride (HAS_BIAS only)
    a_ptr,  # A (R, K) (FUSED only)
    l_ptr,  # two_pass: fp32 partial sums of (x ⊙ keep) Aᵀ, (L_SPLITS, M, R)
    b_ptr,  # B (N, R)
    y_ptr,  # Y (M, N) = X deq(W0)ᵀ + b + xa Bᵀ
    xa_ptr,  # xa (M, R) = xa_scale · (x ⊙ keep) Aᵀ, written by the column-block-0 programs
    M, N, K, R, L_SPLITS,
    M_BUCKET,  # next power of two of M: the autotuning key
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ls, stride_lm, stride_lr,
    stride_bn, stride_br, stride_bias, stride_ym, stride_yn, stride_xam, stride_xar,
    xa_scale,  # s / (1 - p)
    seed_ptr, threshold, groups_per_row,  # keep-mask over X's elements (DROPOUT only; FUSED only)
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One output tile per program, in grouped order; the epilogue is triton_ops' _forward_epilogue."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    xa_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        x = _load_tile(x_ptr, x_ptr, m0, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, False)
        w = _dequant_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, n0, k0, N, K,
                          BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, x_ptr.dtype.element_ty)
        acc = _dot(x, w.T, acc, UPCAST, IEEE)
        if FUSED:
            a = _load_tile(a_ptr, a_ptr, k0, 0, K, R, stride_ak, stride_ar, BLOCK_K, BLOCK_R, False)
            if DROPOUT:
                x = tl.where(_keep_mask(seed_ptr, threshold, offs_m, k0, groups_per_row, BLOCK_M, BLOCK_K), x, 0.0)
            xa_acc = _dot(x, a, xa_acc, UPCAST, IEEE)
    _forward_epilogue(acc, xa_acc, pid_n, m0, n0, l_ptr, b_ptr, bias_ptr, y_ptr, y_ptr, xa_ptr, M, N, R, L_SPLITS,
                      stride_ls, stride_lm, stride_lr, stride_bn, stride_br, stride_bias, stride_ym, stride_yn,
                      stride_xam, stride_xar, xa_scale, FUSED, True, HAS_BIAS, False, ACC_DTYPE, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _qlora_backward_kernel(
    dy_ptr,  # dY (M, N)
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # W0 (N, K), 4-bit (_dequant_tile)
    x_ptr,  # X (M, K)
    a_ptr,  # A (R, K)
    b_ptr,  # B (N, R)
    xa_ptr,  # xa (M, R), saved by the forward
    g_ptr,  # fp32 partial sums of dY B, (G_SPLITS, M, R), from triton_ops' g pass (G_LOADED)
    dx_ptr,  # dX (M, K) = dY deq(W0) + (g A) ⊙ D
    part_ptr,  # partial (runs, K + N, R), fp32: rows [0, K) Σ_run (x ⊙ keep)ᵀ g, rows [K, K + N) Σ_run dyᵀ xa
    M, N, K, R, runs, G_SPLITS,
    M_BUCKET,  # next power of two of M: the autotuning key
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_xam, stride_xar, stride_gs, stride_gm, stride_gr, stride_dxm, stride_dxk,
    stride_ps, stride_pj, stride_pr,
    scaling, inv_keep, seed_ptr, threshold, groups_per_row,  # g = s·dY B; D over dX's elements
    G_LOADED: tl.constexpr, CHUNKED: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """triton_ops' _lora_backward_kernel with NEED_DX (see there): program (run, column block k)
    walks the row blocks of its run, streaming dY once per row block; W0's tiles are dequantised
    in the main loop."""
    HALF: tl.constexpr = BLOCK_K // 2
    num_kb = tl.cdiv(K, BLOCK_K)
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
    if m_first >= m_end:  # an empty run: its partial slots are zero
        _empty_run(part, pid_k, k0, num_kb, K, N, R, stride_pj, stride_pr, True, CHUNKED, ACC_DTYPE,
                   BLOCK_N, HALF, BLOCK_R)
    for pid_m in range(m_first, m_end):
        m0 = pid_m * BLOCK_M
        xa = _load_tile(xa_ptr, xa_ptr, m0, 0, M, R, stride_xam, stride_xar, BLOCK_M, BLOCK_R, False)
        acc0 = tl.zeros((BLOCK_M, HALF), dtype=ACC_DTYPE)
        acc1 = tl.zeros((BLOCK_M, HALF), dtype=ACC_DTYPE)
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            dy = _load_tile(dy_ptr, dy_ptr, m0, n0, M, N, stride_dym, stride_dyn, BLOCK_M, BLOCK_N, False)
            w0 = _dequant_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, n0, k0, N, K,
                               BLOCK_N, HALF, BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, dy_ptr.dtype.element_ty)
            w1 = _dequant_tile(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, n0, k0 + HALF, N, K,
                               BLOCK_N, HALF, BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, dy_ptr.dtype.element_ty)
            acc0 = _dot(dy, w0, acc0, UPCAST, IEEE)
            acc1 = _dot(dy, w1, acc1, UPCAST, IEEE)
            if not G_LOADED:
                b = _load_tile(b_ptr, b_ptr, n0, 0, N, R, stride_bn, stride_br, BLOCK_N, BLOCK_R, False)
                g = _dot(dy, b, g, UPCAST, IEEE)
            if (n0 // BLOCK_N) % num_kb == pid_k:  # this program's share of dB = dyᵀ xa
                _db_share(part, dy, xa, xa_ptr, m0, n0, M, N, K, R, stride_xam, stride_xar, stride_pj, stride_pr,
                          pid_m > m_first, CHUNKED, ACC_DTYPE, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)
        # (the same end of a row block as the 16-bit kernel's, TMA aside: one helper, triton_ops._dx_tile)
        da0, da1 = _dx_tile(acc0, acc1, g, da0, da1, m0, k0, part, g_ptr, x_ptr, a_ptr, dx_ptr, dx_ptr,
                            M, K, R, G_SPLITS, stride_gs, stride_gm, stride_gr, stride_xm, stride_xk,
                            stride_ar, stride_ak, stride_dxm, stride_dxk, stride_pj, stride_pr, pid_m > m_first,
                            scaling, inv_keep, seed_ptr, threshold, groups_per_row, G_LOADED, CHUNKED, DROPOUT,
                            False, dy_ptr.dtype.element_ty, ACC_DTYPE, UPCAST, IEEE, BLOCK_M, HALF, BLOCK_R)
    if not CHUNKED:  # dAᵀ accumulated over the run in registers
        _store_partial(part, da0, k0, 0, K, R, stride_pj, stride_pr, False, HALF, BLOCK_R)
        _store_partial(part, da1, k0 + HALF, 0, K, R, stride_pj, stride_pr, False, HALF, BLOCK_R)


_FORWARD_KEY = ["M_BUCKET", "N", "K", "R", "FUSED", "DROPOUT", "HAS_BIAS", "NESTED"]
_BACKWARD_KEY = ["M_BUCKET", "N", "K", "R", "G_LOADED", "DROPOUT", "NESTED"]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the 16-bit kernels' configs that compile for
# sm_90a without spills and within an H100's shared memory with the dequantised tile (Triton 3.8,
# bf16, double quantisation, r = 16; compiled without a GPU as python_tests/triton_compile_check.py
# compiles). NOTE: the others spill (up to 2.4 KB) or, at 128x256, need 300 KB of shared memory:
# the dequantisation's layout conversions take registers and shared memory the 16-bit tiles do not.
# The last of each list is what fp32 and fp64 operands run (FMA tiles: the others spill up to 14 KB
# there; with 4 warps the 32x32 forward tile spills 8 bytes in fp32, with 8 none). On sm_80 (bf16) the
# backward's 64-row tiles spill 64-152 bytes. fp64 is not checked (gradcheck only), nor other Tritons.
_FORWARD_SHAPES = [(128, 128, 64, 4, 8), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 4, 4),
                   (32, 32, 32, 3, 8)]
_BACKWARD_SHAPES = [(64, 64, 128, 3, 8), (64, 32, 64, 3, 8), (64, 32, 64, 4, 4), (32, 16, 32, 3, 8)]


def _configs(backward: bool):
    if not t.gpu_configs():
        return t._backward_configs() if backward else t._gemm_configs()
    group = {} if backward else {"GROUP_M": 8}
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **group}, num_stages=st, num_warps=w)
            for bm, bn, bk, st, w in (_BACKWARD_SHAPES if backward else _FORWARD_SHAPES)]


def _prune(configs, named_args, backward, **kwargs):
    """Called as ``Autotuner.run`` calls it: positional arguments in ``named_args``, keywords in ``kwargs``."""
    named_args = {**named_args, **kwargs}
    if named_args["dy_ptr" if backward else "y_ptr"].element_size() >= 4:
        configs = configs[-1:]
    return t._prune(configs, named_args, backward, None)


@functools.lru_cache(maxsize=None)
def _autotuned(name: str):
    """The autotuned kernels (pointer loads), built on first use; pruned by shared memory (for wider
    operands than bf16) as the 16-bit kernels are."""
    backward = name == "backward"
    prune = functools.partial(_prune, backward=backward)
    return triton.autotune(_configs(backward), key=_BACKWARD_KEY if backward else _FORWARD_KEY,
                           prune_configs_by={"early_config_prune": prune})(
        _qlora_backward_kernel if backward else _qlora_forward_kernel)


def _quant_args(q: QuantWeight) -> dict:
    return dict(q_ptr=q.packed, absmax_ptr=q.absmax, code_ptr=q.code,
                absmax2_ptr=q.absmax2 if q.nested else q.code, code2_ptr=q.code2 if q.nested else q.code,
                offset_ptr=q.offset if q.nested else q.code,  # (unused pointer operands still need a tensor)
                BLOCKSIZE=q.blocksize, BLOCKSIZE2=max(q.blocksize2, 1), NESTED=q.nested, W_DTYPE=_TL_DTYPES[q.dtype])


def dequantize(q: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W0`` (N, K) in ``dtype``, dequantised by one launch (bit for bit reference.dequantize)."""
    N, K = q.shape
    w = torch.empty(N, K, device=q.device, dtype=dtype)
    block_n, block_k = (32, 256) if t.target(q.device).gpu else (32, 32)
    _dequant_kernel[(t._cdiv(N, block_n), t._cdiv(K, block_k))](
        **_quant_args(q), w_ptr=w, N=N, K=K, stride_wn=w.stride(0), stride_wk=w.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, **_LAUNCH)
    return w


def variant(M, K, N, R, dtype, dropout_p, backward: bool, device) -> str:
    """``"fused"`` or ``"dequant"``: QLORA_VARIANT if set, else the cost model's choice."""
    v = QLORA_VARIANT
    if v is None:
        from ..cost_model import choose_qlora_variant

        v = choose_qlora_variant(M, K, N, R, dtype, dropout_p, backward, True, device)
    if v not in ("fused", "dequant"):
        raise ValueError(f"unknown 4-bit variant {v!r}; expected 'fused' or 'dequant'")
    return v


@on_input_device
def qlora_forward(x, q: QuantWeight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, xa)``: W0 dequantised in the main loop of one fused launch (or after triton_ops' shrink
    kernel, triton_ops.forward_plan), or dequantised once and triton_ops' forward (:func:`variant`)."""
    M, K = x.shape
    N, R = q.shape[0], lora_A.shape[0]
    if variant(M, K, N, R, x.dtype, dropout_p, False, x.device) == "dequant":
        return t.lora_forward(x, dequantize(q, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
    y = x.new_empty(M, N)
    xa = x.new_empty(M, R)
    if M == 0 or N == 0:
        return y, xa.zero_()
    fused = t.forward_plan(M, K, N, R, x.dtype, dropout_p, x.device) == "fused"
    part = (t._shrink_partials(x, lora_A, dropout_p, seed) if not fused
            else y.new_empty(1, 1, 1, dtype=t._acc_dtype(y.dtype)))  # (an unused pointer operand)
    tiles = lambda meta: (t._cdiv(M, meta["BLOCK_M"]) * t._cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _autotuned("forward")[tiles](
        x_ptr=x, **_quant_args(q), bias_ptr=bias if bias is not None else y, a_ptr=lora_A, l_ptr=part,
        b_ptr=lora_B, y_ptr=y, xa_ptr=xa,
        M=M, N=N, K=K, R=R, L_SPLITS=part.shape[0], M_BUCKET=t._next_pow2(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
        stride_ls=part.stride(0), stride_lm=part.stride(1), stride_lr=part.stride(2),
        stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1), stride_bias=bias.stride(0) if bias is not None else 0,
        stride_ym=y.stride(0), stride_yn=y.stride(1), stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        xa_scale=scaling * t._inv_keep(dropout_p), **t._dropout_args(dropout_p if fused else 0.0, seed, K, x.device),
        FUSED=fused, HAS_BIAS=bias is not None, BLOCK_R=t._full_block_r(R) if fused else t._block_r(R),
        **t._dtype_flags(x.dtype), **_LAUNCH,
    )
    return y, xa


@on_input_device
def qlora_backward(grad_out, x, q: QuantWeight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x):
    """``(dx, dA, dB)`` as in reference.qlora_backward: [the g pass,] the backward kernel, the reduction."""
    dy = grad_out
    M, K = x.shape
    N, R = q.shape[0], lora_A.shape[0]
    if not need_grad_x or M == 0 or N == 0:
        # NOTE: without dx the bf16 backward never reads W0: it takes any (N, ·) tensor for its shape.
        return t.lora_backward(dy, x, lora_B, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x)
    if variant(M, K, N, R, x.dtype, dropout_p, True, x.device) == "dequant":
        # NOTE: dequantised again, not saved by the forward: a 16-bit W0 per layer is what 4 bits save.
        return t.lora_backward(dy, x, dequantize(q, x.dtype), lora_A, lora_B, xa, scaling, dropout_p, seed, True)
    grad_A, grad_B = torch.empty_like(lora_A), torch.empty_like(lora_B)
    grad_x = x.new_empty(M, K)
    runs = t._backward_runs(M, K, R, x.element_size(), True, x.device)
    part = torch.empty(runs, K + N, R, device=x.device, dtype=t._acc_dtype(x.dtype))
    g_loaded = t.backward_plan(M, K, N, R, x.dtype, dropout_p, True, x.device) == "g_pass"
    g = t._g_pass(dy, lora_B) if g_loaded else xa.unsqueeze(0)  # (xa: an unused pointer operand)
    grid = lambda meta: (runs * t._cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _autotuned("backward")[grid](
        dy_ptr=dy, **_quant_args(q), x_ptr=x, a_ptr=lora_A, b_ptr=lora_B, xa_ptr=xa, g_ptr=g, dx_ptr=grad_x,
        part_ptr=part, M=M, N=N, K=K, R=R, runs=runs, G_SPLITS=g.shape[0] if g_loaded else 0,
        M_BUCKET=t._next_pow2(M),
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1), stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
        stride_xam=xa.stride(0), stride_xar=xa.stride(1),
        stride_gs=g.stride(0), stride_gm=g.stride(1), stride_gr=g.stride(2),
        stride_dxm=grad_x.stride(0), stride_dxk=grad_x.stride(1),
        stride_ps=part.stride(0), stride_pj=part.stride(1), stride_pr=part.stride(2),
        scaling=scaling, inv_keep=t._inv_keep(dropout_p), **t._dropout_args(dropout_p, seed, K, x.device),
        G_LOADED=g_loaded, CHUNKED=R > t._block_r(R), BLOCK_R=t._block_r(R), **t._dtype_flags(x.dtype), **_LAUNCH,
    )
    t._reduce_partials(part, grad_A, grad_B, dropout_p)
    return grad_x, grad_A, grad_B
