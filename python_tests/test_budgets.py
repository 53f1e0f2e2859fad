"""The autotuners' shared-memory and register budgets count the rank: what the kernel bodies hold
(A, B, xa, g tiles and the fp32 rank blocks), checked against the compiler's own figures (Triton
3.8, sm_90a, bf16, python_tests/triton_compile_check.py) and at the ranks 8-256."""

import pytest
import torch
import triton

from lora_kernels import triton_ops as T

H100_SHARED = 232448  # shared_memory_per_block_optin of an H100 (what the compile check prunes by)


def configs(shapes, backward):
    group = {} if backward else {"GROUP_M": 8}
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **group}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


def shapes_of(cfgs):
    return [tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (c.num_stages, c.num_warps) for c in cfgs]


def forward_args(R, fused, tma, dtype=torch.bfloat16, dropout=False):
    return dict(y_ptr=torch.empty(1, 1, dtype=dtype), R=R, FUSED=fused, TMA=tma, DROPOUT=dropout,
                BLOCK_R=T._full_block_r(R) if fused else T._block_r(R))


def backward_args(R, need_dx, g_loaded, tma, dtype=torch.bfloat16, dropout=False):
    return dict(dy_ptr=torch.empty(1, 1, dtype=dtype), R=R, NEED_DX=need_dx, G_LOADED=g_loaded, TMA=tma,
                DROPOUT=dropout, BLOCK_R=T._block_r(R))


@pytest.fixture
def h100(monkeypatch):
    """The pruning of an H100 on this machine: its shared memory, sm_90's exclusion table."""
    monkeypatch.setattr(T, "_shared_memory_limit", lambda device: H100_SHARED)
    monkeypatch.setattr(T, "_target_arch", lambda device: 90)
    monkeypatch.setattr(T, "AUTOTUNE", True)


def test_r64_drops_the_persistent_tma_forward_128x256x64_three_stages(h100):
    """At r = 64 the fused TMA forward's 128x256x64 three-stage config needs ~280 KB (x, W0 and A
    tiles per stage, then B, xa and the y tile), over the H100's 227 KB; at r = 16 it fits (the
    compiler gives it 227,352 bytes)."""
    big = (128, 256, 64, 3, 8)
    cfgs = configs(T._GEMM_SHAPES, backward=False)
    kept16 = shapes_of(T._prune(cfgs, forward_args(16, True, True), False, "_lora_forward_kernel"))
    kept64 = shapes_of(T._prune(cfgs, forward_args(64, True, True), False, "_lora_forward_kernel"))
    assert big in kept16
    assert big not in kept64
    assert kept64, "some config must remain at r = 64"


# (direction, kernel flags, R, config, compiled shared memory in bytes, spilled): Triton 3.8, sm_90a,
# bf16, TMA, as triton_compile_check.py --all printed them (the backward at r = 256 in rank chunks).
MEASURED = [
    ("forward", dict(FUSED=True), 16, (128, 256, 64, 3, 8), 227352, False),
    ("forward", dict(FUSED=True, DROPOUT=True), 64, (128, 64, 64, 4, 4), 155736, True),
    ("forward", dict(FUSED=True, DROPOUT=True), 64, (128, 128, 64, 4, 8), 213080, False),
    ("forward", dict(FUSED=False), 256, (128, 256, 64, 3, 8), 262144, False),
    ("forward", dict(FUSED=False), 256, (256, 128, 64, 3, 8), 294912, True),
    ("forward", dict(FUSED=False), 256, (128, 128, 64, 3, 4), 172032, True),
    ("forward", dict(FUSED=False), 256, (128, 64, 64, 4, 4), 172032, False),
    ("forward", dict(FUSED=False), 256, (64, 128, 64, 4, 4), 147456, False),
    ("forward", dict(FUSED=False), 256, (128, 128, 64, 4, 8), 229376, False),
    ("backward", dict(NEED_DX=True), 16, (128, 64, 128, 3, 8), 129048, False),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (128, 64, 128, 3, 8), 180248, True),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (128, 64, 256, 3, 8), 245784, True),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (64, 64, 128, 4, 4), 155680, True),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (64, 64, 128, 3, 8), 122904, False),
    ("backward", dict(NEED_DX=True, CHUNKED=True, DROPOUT=True), 256, (64, 64, 128, 3, 8), 122904, False),
    ("backward", dict(NEED_DX=True, CHUNKED=True, DROPOUT=True), 256, (128, 32, 128, 4, 8), 196608, True),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (64, 32, 64, 4, 4), 90112, True),
    ("backward", dict(NEED_DX=True, CHUNKED=True), 256, (64, 32, 64, 3, 8), 69632, False),
    ("backward", dict(NEED_DX=False, CHUNKED=True), 256, (128, 64, 256, 3, 8), 131072, False),
]


@pytest.mark.parametrize("direction,flags,R,shape,shared,spilled", MEASURED, ids=str)
def test_the_estimate_bounds_what_the_compiler_measured(direction, flags, R, shape, shared, spilled):
    """The shared-memory estimate is never below the compiler's figure, and the register rule
    never keeps a config whose compiled kernel spilled (it may drop one that did not: it is an
    estimate, and dropping costs only a candidate)."""
    backward = direction == "backward"
    (cfg,) = configs([shape], backward)
    if backward:
        args = dict(G_LOADED=R > T.RANK_CHUNK, TMA=True, BLOCK_R=T._block_r(R), **flags)
    else:
        args = dict(TMA=True, BLOCK_R=T._full_block_r(R) if flags["FUSED"] else T._block_r(R), **flags)
    assert T._shared_bytes(cfg, backward, args, 2) >= shared
    if spilled:
        assert not T._fits(cfg, args, backward, 2, 1 << 30)


CASES = [("forward", f, t) for f in (True, False) for t in (True, False)] + \
        [("backward", dx, gl, t) for dx in (True, False) for gl in (True, False) for t in (True, False)]


@pytest.mark.parametrize("R", [8, 16, 64, 128, 256])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kept_configs_fit_the_estimate_at_every_rank(h100, R, case):
    """Every config the pruning keeps fits the rank-aware budgets (the fallback included)."""
    if case[0] == "forward":
        _, fused, tma = case
        if fused and R > T.FUSED_MAX_RANK:
            pytest.skip("the fused forward runs up to FUSED_MAX_RANK")
        shapes = T._GEMM_SHAPES + ([] if tma else T._GEMM_SHAPES_POINTER)
        args, backward, kernel = forward_args(R, fused, tma), False, "_lora_forward_kernel"
    else:
        _, need_dx, g_loaded, tma = case
        shapes = T._BACKWARD_SHAPES + ([] if tma else T._BACKWARD_SHAPES_POINTER)
        args, backward, kernel = backward_args(R, need_dx, g_loaded, tma), True, "_lora_backward_kernel"
    kept = T._prune(configs(shapes, backward), args, backward, kernel)
    assert kept
    for cfg in kept:
        assert T._fits(cfg, args, backward, 2, H100_SHARED), shapes_of([cfg])
