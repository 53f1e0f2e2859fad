"""The GPU's branches, executed on the CPU: an emulated sm_90 (H100) and sm_80 (A100) target.

Under Triton's interpreter alone the launchers take the interpreter's branches (one config, no
pruning, no exclusion lookups, no TMA, no autotuner, no direct launches). Inside
``lora_kernels._emulate.emulate(target)`` they take the GPU's decisions, Triton's own launch path
runs over a stand-in driver (Autotuner.run with its prune called as on a GPU, the binder, the
compiled kernel's launcher, the package's direct launches), and each launch's kernel body runs under
the interpreter with the GPU config's block sizes. Every family is checked against float64: the
single adapter (forward fused and two-pass, backward fused, g-pass and without dx, the reduction,
merge/unmerge), the multi-adapter layer, the 4-bit base and DoRA; first call and cached-plan call.
"""

import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import _emulate, _runtime, _triton_launch, triton_ops
from lora_kernels.multi_lora import multi_lora_linear
from lora_kernels.multi_lora import triton_ops as multi_triton
from lora_kernels.nf4 import triton_ops as nf4_triton
from lora_kernels.nf4.functional import qlora_linear

from conftest import ON_GPU, TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(
    ON_GPU or not triton_ops.INTERPRET or _triton_launch._knobs is None,
    reason="the emulated target runs the kernels under Triton's CPU interpreter (TRITON_INTERPRET=1, Triton >= 3.4)")

TARGETS = ["sm90", "sm80"]


@pytest.fixture(params=TARGETS)
def emulation(request):
    with _emulate.emulate(request.param) as record:
        yield record


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (2-D) as the same values in another memory layout: ``"contig"``, ``"t"`` (a transposed
    view) or ``"wide"`` (a column slice of a wider matrix: a row pitch larger than its width)."""
    t = t.detach().clone()  # a new leaf
    if layout == "t":
        return t.t().contiguous().t()
    if layout == "wide":
        wide = torch.zeros(t.shape[0], t.shape[1] + 8, dtype=t.dtype)
        wide[:, 3:3 + t.shape[1]] = t
        return wide[:, 3:3 + t.shape[1]]
    return t


def layer_run(x, w, b, A, B, dy, dtype, scaling, p, seed, backend, layouts, need_grad_x=True):
    """Forward and backward of the single-adapter layer; tensors cast to ``dtype`` in ``layouts``."""
    lx, lw, la, lb = layouts
    xs = view(x.to(dtype), lx).requires_grad_(need_grad_x)
    As = view(A.to(dtype), la).requires_grad_()
    Bs = view(B.to(dtype), lb).requires_grad_()
    bias = b.to(dtype) if b is not None else None
    y = lk.lora_linear(xs, view(w.to(dtype), lw), bias, As, Bs, scaling, p, backend=backend, seed=seed)
    y.backward(dy.to(dtype))
    out = [y, As.grad, Bs.grad] + ([xs.grad] if need_grad_x else [])
    return [t.detach().double() for t in out]


LAYER_CASES = [  # (dtype, M, K, N, r, dropout, bias, forward plan, backward plan, layouts of x, W, A, B, dx)
    (torch.bfloat16, 130, 72, 264, 8, 0.0, True, "fused", "fused", ("contig",) * 4, True),
    (torch.bfloat16, 130, 72, 260, 64, 0.1, True, "two_pass", "g_pass", ("t", "wide", "t", "t"), True),
    (torch.float16, 65, 80, 136, 16, 0.25, False, "fused", "g_pass", ("wide", "contig", "t", "contig"), True),
    (torch.float32, 7, 72, 40, 256, 0.0, True, "two_pass", "fused", ("contig", "t", "contig", "wide"), True),
    (torch.bfloat16, 130, 64, 96, 8, 0.1, False, "fused", "fused", ("contig",) * 4, False),
    (torch.bfloat16, 65, 72, 264, 128, 0.1, True, "two_pass", "fused", ("contig",) * 4, True),  # rank chunks, TMA
]


@pytest.mark.parametrize("dtype,M,K,N,r,p,bias,fplan,bplan,layouts,need_dx", LAYER_CASES,
                         ids=[f"{str(c[0])[6:]}-M{c[1]}K{c[2]}N{c[3]}r{c[4]}-p{c[5]}-{c[7]}-{c[8]}-dx{int(c[10])}"
                              for c in LAYER_CASES])
def test_layer_against_float64(emulation, monkeypatch, dtype, M, K, N, r, p, bias, fplan, bplan, layouts, need_dx):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", fplan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", bplan)
    x, w, A, B, dy = f64(M, K), f64(N, K) / K ** 0.5, f64(r, K) / K ** 0.5, f64(N, r), f64(M, N)
    b = f64(N) if bias else None
    args = (x, w, b, A, B, dy)
    ref = layer_run(*args, torch.float64, 0.5, p, 11, "reference", ("contig",) * 4, need_dx)
    first = layer_run(*args, dtype, 0.5, p, 11, "triton", layouts, need_dx)
    mark = emulation.mark()
    second = layer_run(*args, dtype, 0.5, p, 11, "triton", layouts, need_dx)
    for name, got, want in zip(["y", "dA", "dB", "dx"], first, ref):
        assert relative_error(got, want) < TOLERANCE[dtype], name
    for got, again in zip(first, second):
        assert torch.equal(got, again)
    launches, dispatched = emulation.since(mark)
    # The cached plan's launches go straight to the compiled kernel: Triton's dispatch is not re-entered.
    assert launches and not dispatched, dispatched
    gemms = [rec for rec in emulation.launches if rec.kernel in ("_lora_forward_kernel", "_lora_backward_kernel")]
    assert {rec.kernel for rec in gemms if not rec.benchmark} == {"_lora_forward_kernel", "_lora_backward_kernel"}
    # GPU block sizes and the GPU's config lists: the autotuner benchmarked several configs.
    assert all(rec.constexprs["BLOCK_M"] >= 32 for rec in gemms)
    assert len({tuple(sorted(rec.options.items())) + (rec.constexprs["BLOCK_M"], rec.constexprs["BLOCK_N"])
                for rec in gemms if rec.benchmark}) > 1
    # Exactly the GEMMs of the plan ran, and on Hopper with TMA where the operands allow it.
    ran = {rec.kernel for rec in emulation.launches if not rec.benchmark}
    assert ("_lora_shrink_kernel" in ran) == (fplan == "two_pass" or r > triton_ops.FUSED_MAX_RANK)
    # (above RANK_CHUNK the backward works in rank chunks, with g from the g pass whatever the plan)
    assert ("_lora_g_kernel" in ran) == ((bplan == "g_pass" and need_dx) or r > triton_ops.RANK_CHUNK)
    tma_operands = layouts[0] == layouts[1] == "contig" and (N * 2) % 16 == 0 and (K * 2) % 16 == 0
    forward_tma = {rec.constexprs["TMA"] for rec in gemms if rec.kernel == "_lora_forward_kernel"}
    expect_tma = emulation.target.tma and dtype in (torch.float16, torch.bfloat16) and tma_operands
    assert forward_tma == {expect_tma}


def test_each_gpu_config_computes_the_layer(monkeypatch):
    """Every config of the sm_90 lists (TMA and pointer, forward and backward) runs the layer correctly
    at its own block sizes (the autotuner would run only the one it picks)."""
    M, K, N, r = 65, 72, 136, 16
    x, w, A, B, dy = f64(M, K), f64(N, K) / K ** 0.5, f64(r, K) / K ** 0.5, f64(N, r), f64(M, N)
    ref = layer_run(x, w, None, A, B, dy, torch.float64, 0.5, 0.1, 5, "reference", ("contig",) * 4)
    with _emulate.emulate("sm90") as emulation:
        forward, backward = triton_ops._gemm_configs(True), triton_ops._backward_configs(True)
        pointer_f, pointer_b = triton_ops._gemm_configs(False), triton_ops._backward_configs(False)
        seen = set()
        for tma in (True, False):
            fwd_list, bwd_list = (forward, backward) if tma else (pointer_f, pointer_b)
            for i in range(max(len(fwd_list), len(bwd_list))):
                f, b = fwd_list[i % len(fwd_list)], bwd_list[i % len(bwd_list)]
                monkeypatch.setattr(triton_ops, "_gemm_configs", lambda tma=False, f=f: [f])
                monkeypatch.setattr(triton_ops, "_backward_configs", lambda tma=False, b=b: [b])
                monkeypatch.setattr(triton_ops, "USE_TMA", tma)
                _emulate.clear_caches()
                got = layer_run(x, w, None, A, B, dy, torch.bfloat16, 0.5, 0.1, 5, "triton", ("contig",) * 4)
                for name, g, want in zip(["y", "dA", "dB", "dx"], got, ref):
                    assert relative_error(g, want) < TOLERANCE[torch.bfloat16], (name, str(f), str(b), tma)
                ran = [rec for rec in emulation.launches[-6:] if rec.kernel.startswith("_lora_")]
                seen |= {(rec.kernel, rec.constexprs["TMA"], rec.constexprs["BLOCK_M"], rec.constexprs["BLOCK_N"],
                          rec.constexprs["BLOCK_K"]) for rec in ran if "TMA" in rec.constexprs}
    shapes = lambda cfgs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in cfgs}  # noqa: E731
    for kernel, tma, cfgs in [("_lora_forward_kernel", True, forward), ("_lora_forward_kernel", False, pointer_f),
                              ("_lora_backward_kernel", True, backward), ("_lora_backward_kernel", False, pointer_b)]:
        assert {s[2:] for s in seen if s[:2] == (kernel, tma)} == shapes(cfgs), (kernel, tma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_merge_and_unmerge(emulation, dtype):
    N, K, r = 136, 200, 64
    w, A, B = f64(N, K), f64(r, K), f64(N, r) / r
    merged = view(w.to(dtype), "wide")
    triton_ops.lora_merge_(merged, view(A.to(dtype), "t"), B.to(dtype), 0.75)
    want = w.to(dtype).double() + 0.75 * B.to(dtype).double() @ A.to(dtype).double()
    assert relative_error(merged, want) < TOLERANCE[dtype]
    triton_ops.lora_merge_(merged, view(A.to(dtype), "t"), B.to(dtype), -0.75)  # unmerge
    assert relative_error(merged, w) < TOLERANCE[dtype]
    assert any(rec.kernel == "_merge_kernel" and rec.constexprs["BLOCK_N"] == 64 for rec in emulation.launches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_multi_adapter_against_float64(emulation, dtype):
    from test_multi_lora import check_against_reference, make_adapters, make_base, reference_fp64, run

    M, K, N, ranks = 97, 72, 264, (8, 64, 16)
    ids = torch.randint(-1, len(ranks), (M,))
    x, weight, bias = make_base(M, K, N, dtype)
    A, B, scaling = make_adapters(K, N, ranks, dtype)
    dy = torch.randn(M, N, dtype=dtype)
    ref = reference_fp64(x, weight, bias, A, B, scaling, ranks, ids, 0.1, 9, dy)
    for _ in range(2):  # first call, then the cached one
        got = run(x, weight, bias, A, B, scaling, ids, 0.1, 9, "triton", dy)
        check_against_reference(got, ref, ranks, ids, dtype)
    kernels = {rec.kernel for rec in emulation.launches if not rec.benchmark}
    assert {"_sgmv_shrink_kernel", "_sgmv_reduce_kernel", "_segment_sum_kernel"} <= kernels
    assert "_sgmv_gemm_kernel" in kernels
    if emulation.target.tma and dtype == torch.bfloat16:  # the Hopper base GEMM (TMA), then the epilogue alone
        assert any(rec.kernel == "_lora_forward_kernel" and rec.constexprs["TMA"] for rec in emulation.launches)
        # (the forward's; the dx GEMM reads W0 transposed, which TMA cannot address: fused there)
        assert any(rec.constexprs["LOAD_C"] for rec in emulation.launched("_sgmv_gemm_kernel"))


@pytest.mark.parametrize("dtype,plan,variant,dropout", [
    (torch.bfloat16, "fused", "fused", 0.25), (torch.float32, "two_pass", "fused", 0.0),
    (torch.bfloat16, "fused", "dequant", 0.0)], ids=["bf16-fused", "fp32-two_pass", "bf16-dequant"])
def test_4bit_base_against_float64(emulation, monkeypatch, dtype, plan, variant, dropout):
    from test_nf4 import quantize
    from lora_kernels.nf4 import reference as q4

    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(nf4_triton, "QLORA_VARIANT", variant)
    M, K, N, r = 70, 128, 136, 8
    q = quantize(torch.randn(N, K), nested=False)
    w = q4.dequantize(q, torch.float64)
    x, A, B, dy, b = f64(M, K), f64(r, K) / K ** 0.5, f64(N, r), f64(M, N), f64(N)
    ref = layer_run(x, w, b, A, B, dy, torch.float64, 0.5, dropout, 4, "reference", ("contig",) * 4)
    for _ in range(2):
        xs, As, Bs = x.to(dtype).requires_grad_(), A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()
        y = qlora_linear(xs, q, b.to(dtype), As, Bs, 0.5, dropout_p=dropout, seed=4, backend="triton")
        y.backward(dy.to(dtype))
        for name, got, want in zip(["y", "dA", "dB", "dx"], [y, As.grad, Bs.grad, xs.grad], ref):
            assert relative_error(got.detach(), want) < TOLERANCE[dtype], name
    kernels = {rec.kernel for rec in emulation.launches if not rec.benchmark}
    if variant == "fused":
        assert {"_qlora_forward_kernel", "_qlora_backward_kernel"} <= kernels
    else:
        assert "_dequant_kernel" in kernels and "_lora_forward_kernel" in kernels


def test_dora_against_float64(emulation):
    from lora_kernels.dora import dora_linear

    M, K, N, r = 33, 72, 136, 16
    x, w, A, B, b = f64(M, K), f64(N, K), f64(r, K) / K ** 0.5, f64(N, r), f64(N)
    m = w.norm(dim=1) * (1 + 0.1 * torch.rand(N, dtype=torch.float64))
    ref = dora_linear(x, w, b, A, B, 0.5, m, backend="reference")
    for dtype in (torch.bfloat16, torch.float32):
        got = dora_linear(x.to(dtype), w.to(dtype), b.to(dtype), A.to(dtype), B.to(dtype), 0.5, m.to(dtype),
                          backend="triton")
        assert relative_error(got, ref) < TOLERANCE[dtype]
    assert any(rec.kernel == "_lora_forward_kernel" for rec in emulation.launches)


# --------------------------------------------------------------------------- #
# The decisions themselves
# --------------------------------------------------------------------------- #


def test_max_configs_bounds_what_the_autotuner_benchmarks(monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_CONFIGS", 2)
    x, w, A, B = torch.randn(64, 64), torch.randn(96, 64), torch.randn(8, 64), torch.randn(96, 8)
    with _emulate.emulate("sm90", execute=False) as emulation:
        lk.lora_linear(x, w, None, A, B, 1.0, 0.0, backend="triton")
    bench = emulation.launched("_lora_forward_kernel", benchmark=True)
    assert 1 <= len(bench) <= 2


def test_decisions_follow_the_target():
    cpu = torch.device("cpu")
    assert _runtime.target(cpu) is _runtime.INTERPRETER and not triton_ops.gpu_configs()
    assert len(triton_ops._gemm_configs()) == 1
    with _runtime.emulated("sm90"):
        assert triton_ops._num_sms(cpu) == 132 and triton_ops._target_arch(cpu) == 90
        assert triton_ops._shared_memory_limit(cpu) == 232448 and triton_ops.gpu_configs()
        assert len(triton_ops._gemm_configs(True)) == len(triton_ops._GEMM_SHAPES)
        assert triton_ops._tma_by_default(torch.empty(1, dtype=torch.bfloat16))
        assert not triton_ops._tma_by_default(torch.empty(1, dtype=torch.float32))
        assert lk.cost_model.device_spec(cpu).name == "H100 SXM"
    with _runtime.emulated("sm80"):
        assert triton_ops._num_sms(cpu) == 108 and triton_ops._target_arch(cpu) == 80
        assert not triton_ops._tma_by_default(torch.empty(1, dtype=torch.bfloat16))
        assert lk.cost_model.device_spec(cpu).name == "A100 SXM"
    assert _runtime.target(cpu) is _runtime.INTERPRETER
    with pytest.raises(ValueError, match="unknown emulated target"):
        _runtime.set_emulated_target("sm75")


def test_a_whole_process_on_the_emulated_target():
    """``LORA_KERNELS_EMULATE=sm80`` (with the interpreter) puts a whole process on the target: its
    decisions and Triton's launch path, as inside ``emulate``."""
    import os
    import subprocess
    import sys

    code = """
import torch, lora_kernels as lk
from lora_kernels import _emulate, _runtime
x, w, A, B = (torch.randn(*s, dtype=torch.float64) for s in ((40, 64), (96, 64), (8, 64), (96, 8)))
y = lk.lora_linear(x.bfloat16(), w.bfloat16(), None, A.bfloat16(), B.bfloat16(), 1.0, 0.0, backend="triton")
ref = x @ w.t() + (x @ A.t()) @ B.t()
record = _emulate.for_this_process()
print(_runtime.target(x.device).name, float((y.double() - ref).norm() / ref.norm()),
      sum(r.benchmark for r in record.launches), any(r.constexprs.get("TMA") for r in record.launches))
"""
    env = dict(os.environ, LORA_KERNELS_EMULATE="sm80", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    name, err, benchmarked, tma = run.stdout.split()
    assert name == "sm80" and float(err) < TOLERANCE[torch.bfloat16] and int(benchmarked) > 1 and tma == "False"
