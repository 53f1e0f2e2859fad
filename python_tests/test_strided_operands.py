"""Operands of any stride, in every Triton family (single adapter, several adapters, 4-bit base):
a strided bias, non-contiguous views of every argument, ranks up to 256, and views whose element
offsets pass 2³¹. Each against float64 by relative error."""

import pytest
import torch

from lora_kernels import triton_ops
from lora_kernels.multi_lora import multi_lora_linear
from lora_kernels.nf4 import reference as q4
from lora_kernels.nf4.functional import qlora_linear
from lora_kernels.reference import lora_linear_reference
from conftest import DEVICE, TOLERANCE, backend_param, relative_error
from test_multi_lora import make_adapters
from test_multi_lora import reference_fp64 as multi_reference_fp64
from test_nf4 import quantize_torch

TRITON = backend_param("triton")


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view with inner stride 2 (every row of it non-contiguous)."""
    big = t.new_empty(*t.shape[:-1], 2 * t.shape[-1])
    view = big[..., ::2]
    view.copy_(t)
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values (2-D) in a column-major view."""
    return t.t().contiguous().t()


def single_layer_check(M, K, N, r, dtype, bias, p, layout, seed=7):
    """lora_linear's forward and gradients (x, A, B) against float64 for one case."""
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    x, w, A, B = mk(M, K), (mk(N, K) / K**0.5), (mk(r, K) / K**0.5), mk(N, r)
    b = mk(N) if bias else None
    if layout == "views":  # every argument a non-contiguous view (the bias through its stride)
        x, w, A, B = transposed(x), strided(w), transposed(A), strided(B)
        b = strided(b) if bias else None
    x, A, B = (t.detach().requires_grad_(True) for t in (x, A, B))
    y = triton_ops_linear(x, w, b, A, B, p, seed)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x64, A64, B64 = (d(t).requires_grad_(True) for t in (x, A, B))
    y64 = lora_linear_reference(x64, d(w), d(b), A64, B64, 0.75, p, seed)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), (y64, *grads64)):
        err = relative_error(got, ref)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def triton_ops_linear(x, w, b, A, B, p, seed):
    from lora_kernels.functional import lora_linear

    return lora_linear(x, w, b, A, B, 0.75, dropout_p=p, backend="triton", seed=seed)


# --------------------------------------------------------------------------- #
# The bias through its stride (issue: all three families read bias_ptr + offs_n)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("plan", ["fused", "two_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_bias_single_adapter(backend, plan, dtype, monkeypatch):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    M, K, N, r = 7, 65, 33, 8
    x, w, A, B = mk(M, K), mk(N, K), mk(r, K), mk(N, r)
    bias = mk(2 * N)[::2]
    y = triton_ops_linear(x, w, bias, A, B, 0.0, 0)
    d = lambda t: t.double()  # noqa: E731
    ref = lora_linear_reference(d(x), d(w), d(bias), d(A), d(B), 0.75, 0.0, 0)
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("fused_gemm", [True, False])  # the SGMV GEMM's epilogue, or the base GEMM's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_bias_multi_adapter(backend, fused_gemm, dtype, monkeypatch):
    from lora_kernels.multi_lora import triton_ops as multi_triton

    monkeypatch.setattr(multi_triton, "FUSED_GEMM", fused_gemm)
    M, K, N, ranks = 9, 40, 33, [4, 8]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    bias = torch.randn(2 * N, dtype=dtype, device=DEVICE)[::2]
    A, B, scaling = make_adapters(K, N, ranks, dtype)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1], device=DEVICE)
    y = multi_lora_linear(x, w, bias, A, B, scaling, ids, backend=backend)
    ref = multi_reference_fp64(x, w, bias, A, B, scaling, ranks, ids, 0.0, 0, torch.ones(M, N, device=DEVICE))[0]
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("plan", ["fused", "two_pass"])
def test_strided_bias_4bit_base(backend, plan, monkeypatch):
    from lora_kernels.nf4 import triton_ops as nf4_triton

    monkeypatch.setattr(nf4_triton, "QLORA_VARIANT", "fused")
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    M, K, N, r, dtype = 7, 128, 33, 8, torch.bfloat16
    q = quantize_torch(torch.randn(N, K, device=DEVICE))
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    A, B = torch.randn(r, K, dtype=dtype, device=DEVICE) * 0.1, torch.randn(N, r, dtype=dtype, device=DEVICE)
    bias = torch.randn(2 * N, dtype=dtype, device=DEVICE)[::2]
    y = qlora_linear(x, q, bias, A, B, 0.75, backend=backend)
    d = lambda t: t.double()  # noqa: E731
    ref = lora_linear_reference(d(x), q4.dequantize(q, dtype).double(), d(bias), d(A), d(B), 0.75, 0.0, 0)
    assert relative_error(y, ref) <= TOLERANCE[dtype]


# --------------------------------------------------------------------------- #
# Every family on awkward shapes, ranks 8-256, non-contiguous views, three dtypes, bias, dropout
# --------------------------------------------------------------------------- #

# (M, K, N, r, dtype, bias, dropout, layout): awkward sizes (no tile divides them), ranks 8, 64, 256.
SINGLE_CASES = [
    (1, 7, 65, 8, torch.float32, True, 0.0, "views"),
    (7, 65, 33, 64, torch.bfloat16, True, 0.2, "views"),
    (65, 40, 7, 256, torch.float16, False, 0.1, "views"),
    (33, 65, 17, 256, torch.float32, True, 0.0, "contiguous"),
    (9, 33, 65, 64, torch.float16, False, 0.0, "views"),
    (7, 17, 9, 256, torch.bfloat16, True, 0.25, "views"),
]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("plans", [("fused", "fused"), ("two_pass", "g_pass")])
@pytest.mark.parametrize("M,K,N,r,dtype,bias,p,layout", SINGLE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_single_adapter_any_stride_and_rank(backend, plans, M, K, N, r, dtype, bias, p, layout, monkeypatch):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plans[0])  # fused only up to FUSED_MAX_RANK
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", plans[1])
    single_layer_check(M, K, N, r, dtype, bias, p, layout)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("r,p,need_dx", [(72, 0.1, True), (256, 0.0, True), (256, 0.2, False)])
def test_rank_chunks_over_runs_with_an_empty_run(backend, r, p, need_dx, monkeypatch):
    """Ranks above RANK_CHUNK: the backward goes by rank chunks (g from the g pass, whatever the
    plan asked) and accumulates the dAᵀ partials in memory; 4 runs over 9 row blocks leave the
    last run empty, whose partial slots must be zero."""
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", "fused")
    monkeypatch.setattr(triton_ops, "_backward_runs", lambda *args: 4)
    assert triton_ops.backward_plan(257, 40, 33, r, torch.float32, p, need_dx, DEVICE) == "g_pass"
    M, K, N = 257, 40, 33  # 9 row blocks of 32 under the interpreter
    mk = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    x, w, A, B = mk(M, K), mk(N, K) / 8, mk(r, K) / 8, mk(N, r)
    xg, Ag, Bg = x.clone().requires_grad_(need_dx), A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = triton_ops_linear(xg, w, None, Ag, Bg, p, 3)
    dy = torch.randn_like(y)
    leaves = (xg, Ag, Bg) if need_dx else (Ag, Bg)
    grads = torch.autograd.grad(y, leaves, dy)
    x64, A64, B64 = x.double().requires_grad_(need_dx), A.double().requires_grad_(True), B.double().requires_grad_(True)
    y64 = lora_linear_reference(x64, w.double(), None, A64, B64, 0.75, p, 3)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64) if need_dx else (A64, B64), dy.double())
    for got, ref in zip((y, *grads), (y64, *grads64)):
        assert relative_error(got, ref) <= TOLERANCE[torch.float32]


MULTI_CASES = [
    (7, 65, 33, [8, 3], torch.float32, True, 0.0),
    (9, 33, 17, [64, 8], torch.bfloat16, True, 0.2),
    (5, 17, 65, [256, 1], torch.float16, False, 0.1),
]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("fused_gemm", [True, False])
@pytest.mark.parametrize("M,K,N,ranks,dtype,bias,p", MULTI_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_multi_adapter_any_stride_and_rank(backend, fused_gemm, M, K, N, ranks, dtype, bias, p, monkeypatch):
    from lora_kernels.multi_lora import triton_ops as multi_triton

    monkeypatch.setattr(multi_triton, "FUSED_GEMM", fused_gemm)
    x = transposed(torch.randn(M, K, dtype=dtype, device=DEVICE))
    w = strided((torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype))
    b = strided(torch.randn(N, dtype=dtype, device=DEVICE)) if bias else None
    A, B, scaling = make_adapters(K, N, ranks, dtype)
    A, B = A.transpose(1, 2).contiguous().transpose(1, 2), strided(B)  # both non-contiguous
    ids = (torch.arange(M, device=DEVICE) * 5) % (len(ranks) + 1) - 1
    dy = torch.randn(M, N, dtype=dtype, device=DEVICE)
    xg, Ag, Bg = (t.detach().requires_grad_(True) for t in (x, A, B))
    y = multi_lora_linear(xg, w, b, Ag, Bg, scaling, ids, dropout_p=p, backend=backend, seed=11)
    y.backward(dy)
    ref_y, ref_dx, ref_dA, ref_dB = multi_reference_fp64(x, w, b, A, B, scaling, ranks, ids, p, 11, dy)
    tol = TOLERANCE[dtype]
    assert relative_error(y, ref_y) <= tol
    assert relative_error(xg.grad, ref_dx) <= tol
    for i, r in enumerate(ranks):
        assert relative_error(Ag.grad[i, :r], ref_dA[i]) <= tol, f"dA[{i}]"
        assert relative_error(Bg.grad[i, :, :r], ref_dB[i]) <= tol, f"dB[{i}]"


NF4_CASES = [
    (1, 64, 65, 8, torch.float32, True, 0.0, "fused"),
    (7, 128, 33, 64, torch.bfloat16, True, 0.2, "fused"),
    (65, 64, 7, 256, torch.float16, False, 0.1, "two_pass"),
    (9, 64, 17, 256, torch.bfloat16, True, 0.0, "two_pass"),
]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("M,K,N,r,dtype,bias,p,plan", NF4_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_4bit_base_any_stride_and_rank(backend, M, K, N, r, dtype, bias, p, plan, monkeypatch):
    from lora_kernels.nf4 import triton_ops as nf4_triton

    monkeypatch.setattr(nf4_triton, "QLORA_VARIANT", "fused")
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", "fused" if plan == "fused" else "g_pass")
    q = quantize_torch(torch.randn(N, K, device=DEVICE))
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    x, A, B = transposed(mk(M, K)), transposed(mk(r, K) * 0.1), strided(mk(N, r) * 0.1)
    b = strided(mk(N)) if bias else None
    leaves = [t.detach().requires_grad_(True) for t in (x, A, B)]
    y = qlora_linear(*leaves[:1], q, b, *leaves[1:], 0.75, dropout_p=p, backend=backend, seed=3)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    w64 = q4.dequantize(q, dtype).double()
    y64 = lora_linear_reference(leaves64[0], w64, None if b is None else b.double(), *leaves64[1:], 0.75, p, 3)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), (y64, *grads64)):
        err = relative_error(got, ref)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


# --------------------------------------------------------------------------- #
# Element offsets past 2³¹
# --------------------------------------------------------------------------- #
# NOTE: how this is tested without 8 GB of memory. An offset past 2³¹ needs an element there, so
# the storage must span it: torch.empty(2**32 + small) of bf16 reserves 8 GB of *address space*,
# and only the pages of the few elements a view touches are ever written (the interpreter hands
# CPU storages to the kernel as they are, and copying a storage onto itself is a no-op). The view's
# columns lie ~2³¹/(cols - 1) elements apart, so its last column starts just past 2³¹. With the
# index × stride product in int32 (numpy under the interpreter wraps it, as the GPU does) that
# offset becomes negative; the view starts 2³¹ elements into the buffer, so the wrapped address
# still lies inside it and the old code silently read wrong elements (relative error 0.58 on x's
# columns) instead of crashing the test run. A dimension of size 1 or stride 0 would not do: its
# offsets stay 0.
START = 2**31


def far_apart(rows: int, cols: int, dtype) -> torch.Tensor:
    """A (rows, cols) view of random values whose last column starts past element 2³¹ (the column
    stride still fits int32), START elements into a buffer of ~8 GB of address space."""
    stride = 2**31 // (cols - 1) + 16
    buf = torch.empty(START + (cols - 1) * stride + rows, dtype=dtype, device=DEVICE)
    view = buf[START:].as_strided((rows, cols), (1, stride))
    view.copy_(torch.randn(rows, cols))
    return view


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the interpreter's CPU storage (8 GB of address space, untouched)")
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("plans", [("fused", "fused"), ("two_pass", "g_pass")])
def test_offsets_past_int32_single_adapter(backend, plans, monkeypatch):
    """x (5, 3) with its columns far apart: _load_tile's column term (forward, dx epilogue, dA)."""
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plans[0])
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", plans[1])
    dtype = torch.bfloat16
    x = far_apart(5, 3, dtype)
    w, A, B = torch.randn(6, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype), torch.randn(6, 4, dtype=dtype)
    xg, Ag = x.detach().requires_grad_(True), A.detach().requires_grad_(True)
    y = triton_ops_linear(xg, w, None, Ag, B, 0.0, 0)
    dy = torch.randn_like(y)
    dx, dA = torch.autograd.grad(y, (xg, Ag), dy)
    x64, A64 = x.double().requires_grad_(True), A.double().requires_grad_(True)
    y64 = lora_linear_reference(x64, w.double(), None, A64, B.double(), 0.75, 0.0, 0)
    dx64, dA64 = torch.autograd.grad(y64, (x64, A64), dy.double())
    for name, got, ref in (("y", y, y64), ("dx", dx, dx64), ("dA", dA, dA64)):
        assert relative_error(got, ref) <= TOLERANCE[dtype], name


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the interpreter's CPU storage (8 GB of address space, untouched)")
@pytest.mark.parametrize("backend", [TRITON])
def test_offsets_past_int32_multi_adapter_dx(backend, monkeypatch):
    """W0 (3, 16) with its rows far apart: the dx GEMM reads weight.t() by offs_k × stride_wk."""
    from lora_kernels.multi_lora import triton_ops as multi_triton

    monkeypatch.setattr(multi_triton, "FUSED_GEMM", True)
    dtype = torch.bfloat16
    M, K, N, ranks = 5, 16, 3, [4]
    w = far_apart(K, N, dtype).t()
    x = torch.randn(M, K, dtype=dtype)
    A, B, scaling = make_adapters(K, N, ranks, dtype)
    ids = torch.tensor([0, -1, 0, 0, -1])
    xg = x.detach().requires_grad_(True)
    y = multi_lora_linear(xg, w, None, A, B, scaling, ids, backend=backend)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (xg,), dy)
    ref_y, ref_dx, _, _ = multi_reference_fp64(x, w, None, A, B, scaling, ranks, ids, 0.0, 0, dy)
    assert relative_error(y, ref_y) <= TOLERANCE[dtype]
    assert relative_error(dx, ref_dx) <= TOLERANCE[dtype]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the interpreter's CPU storage (8 GB of address space, untouched)")
@pytest.mark.parametrize("backend", [TRITON])
def test_offsets_past_int32_4bit_base(backend, monkeypatch):
    """x (3, 64) with its columns far apart: the 4-bit forward's x tiles (the shared _load_tile)."""
    from lora_kernels.nf4 import triton_ops as nf4_triton

    monkeypatch.setattr(nf4_triton, "QLORA_VARIANT", "fused")
    dtype = torch.bfloat16
    M, K, N, r = 3, 64, 5, 4
    x = far_apart(M, K, dtype)
    q = quantize_torch(torch.randn(N, K))
    A, B = torch.randn(r, K, dtype=dtype) * 0.1, torch.randn(N, r, dtype=dtype)
    y = qlora_linear(x, q, None, A, B, 0.75, backend=backend)
    ref = lora_linear_reference(x.double(), q4.dequantize(q, dtype).double(), None, A.double(), B.double(), 0.75, 0.0, 0)
    assert relative_error(y, ref) <= TOLERANCE[dtype]
