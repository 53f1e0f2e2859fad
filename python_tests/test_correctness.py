"""Every backend against the float64 reference: forward, every gradient, merge/unmerge, dropout."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, reference
from conftest import ALL_BACKENDS, DEVICE, ON_GPU, TOLERANCE, extended, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, in_features, out_features, r): awkward on purpose.
SHAPES = [(1, 7, 9, 1), (7, 65, 33, 4), (65, 40, 70, 16), (1000, 24, 17, 8), (33, 130, 65, 5)]
if ON_GPU:
    SHAPES += [(1000, 1000, 1000, 64), (4096, 1024, 4096, 16), (257, 4100, 1030, 128)]


def make_layer(M, K, N, r, dtype, bias=True, device=DEVICE):
    """Random inputs (never zeros; B is not zero, so the LoRA path really contributes)."""
    x = torch.randn(M, K, dtype=dtype, device=device)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(N, r, dtype=dtype, device=device)
    return x, weight, b, A, B


def run(x, weight, bias, A, B, scaling, p, seed, backend, grad_out):
    """Forward and backward through lora_linear; returns (y, dx, dA, dB[, db])."""
    x = x.detach().requires_grad_(True)
    A = A.detach().requires_grad_(True)
    B = B.detach().requires_grad_(True)
    y = lk.lora_linear(x, weight, bias, A, B, scaling, dropout_p=p, backend=backend, seed=seed)
    y.backward(grad_out)
    return y, x.grad, A.grad, B.grad


def reference_fp64(x, weight, bias, A, B, scaling, p, seed, grad_out):
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x64, A64, B64 = (to64(t).requires_grad_(True) for t in (x, A, B))
    y = reference.lora_linear_reference(x64, to64(weight), to64(bias), A64, B64, scaling, p, seed)
    y.backward(grad_out.double())
    return y, x64.grad, A64.grad, B64.grad


def assert_close(name, out, ref, dtype):
    assert out.dtype == dtype, f"{name} has dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_forward_and_gradients_match_fp64_reference(backend, dtype, shape, p):
    M, K, N, r = shape
    x, weight, bias, A, B = make_layer(M, K, N, r, dtype, bias=(M % 2 == 1))
    grad_out = torch.randn(M, N, dtype=dtype, device=DEVICE)
    got = run(x, weight, bias, A, B, 0.75, p, 42, backend, grad_out)
    ref = reference_fp64(x, weight, bias, A, B, 0.75, p, 42, grad_out)
    for name, out, expected in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close(name, out, expected, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_3d_and_non_contiguous_inputs(backend):
    dtype = torch.float32
    _, weight, bias, A, B = make_layer(1, 40, 24, 4, dtype)
    base = torch.randn(3, 40, 11, dtype=dtype, device=DEVICE)
    inputs = {
        "3-D": torch.randn(2, 5, 40, dtype=dtype, device=DEVICE),
        "transposed": base.transpose(1, 2),  # (3, 11, 40), last dim strided
        "sliced": torch.randn(6, 80, dtype=dtype, device=DEVICE)[::2, 20:60],
    }
    for what, x in inputs.items():
        grad_out = torch.randn(*x.shape[:-1], 24, dtype=dtype, device=DEVICE)
        got = run(x, weight, bias, A, B, 2.0, 0.1, 7, backend, grad_out)
        ref = reference_fp64(x, weight, bias, A, B, 2.0, 0.1, 7, grad_out)
        for name, out, expected in zip(("y", "dx", "dA", "dB"), got, ref):
            assert_close(f"{what} {name}", out, expected, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_frozen_weight_and_bias_gradients_when_requested(backend):
    dtype = torch.float32
    x, weight, bias, A, B = make_layer(9, 20, 12, 3, dtype)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = lk.lora_linear(x, weight, bias, A, B, 0.5, backend=backend)
    y.square().sum().backward()
    w64, b64 = weight.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
    y64 = reference.lora_linear_reference(x.double(), w64, b64, A.double(), B.double(), 0.5)
    y64.square().sum().backward()
    assert_close("dW0", weight.grad, w64.grad, dtype)
    assert_close("db", bias.grad, b64.grad, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [extended(0.0), 0.3])
def test_gradcheck_fp64(backend, p):
    if backend == "cuda":
        pytest.importorskip("lora_kernels.cuda_ops")
    x, weight, bias, A, B = make_layer(5, 9, 6, 3, torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, A, B)]
    # bias and weight too: their gradients are computed outside the kernels but must be right.
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    fn = lambda x, w, b, A, B: lk.lora_linear(x, w, b, A, B, 1.5, dropout_p=p, backend=backend, seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (inputs[0], weight, bias, inputs[1], inputs[2]))


def test_gradcheck_reference_fp64():
    x, weight, bias, A, B = make_layer(4, 6, 5, 2, torch.float64)
    args = [t.requires_grad_(True) for t in (x, weight, bias, A, B)]
    fn = lambda *a: reference.lora_linear_reference(*a, 0.5, 0.25, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


# --------------------------------------------------------------------------- #
# Merge / unmerge
# --------------------------------------------------------------------------- #


def ulp_bound(weight, merged64):
    """One unit in the last place of max(|W0|, |W0 + sBA|), element-wise, in W0's dtype."""
    big = torch.maximum(weight.double().abs(), merged64.abs()).to(weight.dtype)
    return torch.nextafter(big, torch.full_like(big, float("inf"))).double() - big.double()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_matches_reference_and_unmerge_restores(backend, dtype):
    N, K, r, s = 33, 65, 4, 0.37
    _, weight, _, A, B = make_layer(1, K, N, r, dtype, bias=False)
    original = weight.clone()
    exact = weight.double() + s * (B.double() @ A.double())
    lk.merge_lora_(weight, A, B, s, backend=backend)
    assert_close("merged W", weight, exact, dtype)
    lk.unmerge_lora_(weight, A, B, s, backend=backend)
    drift = (weight.double() - original.double()).abs()
    assert (drift <= ulp_bound(original, exact)).all(), f"unmerge is off by {drift.max().item():.3e}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge_cycles_do_not_drift(backend, dtype):
    # NOTE: the interpreter runs ~25 ms per launch, so it does 100 cycles; compiled paths do 1000.
    cycles = 100 if (backend == "triton" and not ON_GPU) else 1000
    N, K, r, s = 16, 24, 4, 1.7
    _, weight, _, A, B = make_layer(1, K, N, r, dtype, bias=False)
    original = weight.clone()
    bound = ulp_bound(original, weight.double() + s * (B.double() @ A.double()))
    for _ in range(cycles):
        lk.merge_lora_(weight, A, B, s, backend=backend)
        lk.unmerge_lora_(weight, A, B, s, backend=backend)
    drift = (weight.double() - original.double()).abs()
    assert (drift <= bound).all(), f"drift after {cycles} cycles: {(drift / bound).max().item():.1f} ulp"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_merge_with_fp32_factors_into_half_weight(backend):
    _, weight, _, A, B = make_layer(1, 40, 24, 8, torch.bfloat16, bias=False)
    A32, B32 = A.float() * 1.001, B.float()
    exact = weight.double() + 0.5 * (B32.double() @ A32.double())
    lk.merge_lora_(weight, A32, B32, 0.5, backend=backend)
    assert_close("merged W", weight, exact, torch.bfloat16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_module_forward_equals_unmerged(backend, dtype):
    layer = lk.LoRALinear(48, 20, r=8, alpha=16, backend=backend, device=DEVICE, dtype=dtype).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 48, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        exact = torch.nn.functional.linear(
            x.double(), layer.weight.double(), layer.bias.double()
        )
    assert torch.equal(merged, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert_close("merged forward", merged, exact, dtype)
    assert relative_error(merged, unmerged) <= 2 * TOLERANCE[dtype]


# --------------------------------------------------------------------------- #
# Dropout
# --------------------------------------------------------------------------- #


def kernel_keep_mask(backend, M, K, p, seed, dtype=torch.float32):
    """The mask a backend applied, read off dx: with W0 = 0, dx = (g A) ⊙ D."""
    x, _, _, A, B = make_layer(M, K, 8, 2, dtype, bias=False)
    weight = torch.zeros(8, K, dtype=dtype, device=DEVICE)
    A = A.abs() + 0.1  # g A has no zeros, so dx = 0 exactly where the mask drops
    B = B.abs() + 0.1
    x.requires_grad_(True)
    y = lk.lora_linear(x, weight, None, A, B, 1.0, dropout_p=p, backend=backend, seed=seed)
    y.backward(torch.ones_like(y))
    return x.grad != 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_mask_is_the_specified_one(backend):
    for M, K in [(7, 13), (64, 100), (3, 4)]:
        mask = kernel_keep_mask(backend, M, K, 0.3, seed=2**40 + 17)
        expected = reference.dropout_keep_mask(M, K, 0.3, 2**40 + 17, device=DEVICE)
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(backend, p):
    M, K = (64, 512)
    keep = kernel_keep_mask(backend, M, K, p, seed=5).double().mean().item()
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert abs(keep - (1 - p)) < 5 * sigma, f"keep rate {keep:.4f}, expected {1 - p}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_same_seed_same_output_and_gradients(backend):
    layer = lk.LoRALinear(32, 16, r=4, dropout=0.25, backend=backend, device=DEVICE)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)

    def step():
        for t in (x, layer.lora_A.weight, layer.lora_B.weight):
            t.grad = None
        y = layer(x)
        y.square().sum().backward()
        return [t.detach().clone() for t in (y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)]

    torch.manual_seed(10)
    first = step()
    torch.manual_seed(10)
    again = step()
    other = step()  # the generator has moved on: a new mask
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    layer.eval()  # no dropout in eval mode: deterministic without reseeding
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("plan", ["fused", "two_pass"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer-gemm", "tma-gemm"])
@pytest.mark.parametrize("dtype", [d if d == torch.bfloat16 else extended(d) for d in DTYPES], ids=str)
def test_triton_gemm_kernels_both_ways(monkeypatch, use_tma, dtype, plan):
    """Pointer loads and the Hopper TMA loads/stores, each forced, for each forward plan and the
    backward kernel, on TMA-addressable shapes."""
    if backends.unavailable_reason("triton", DEVICE):
        pytest.skip(backends.unavailable_reason("triton", DEVICE))
    from lora_kernels import triton_ops

    if use_tma and ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    monkeypatch.setattr(triton_ops, "USE_TMA", use_tma)
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    # NOTE: K and N are multiples of 16 elements: Triton 3.4's interpreter checks descriptor strides
    # in elements where the hardware (and its host-side check) asks for 16 bytes.
    for M, K, N, r, p in [(7, 64, 48, 4, 0.0), (65, 48, 80, 16, 0.25), (300, 32, 16, 3, 0.1)]:
        x, weight, bias, A, B = make_layer(M, K, N, r, dtype)
        assert (triton_ops._gemm_uses_tma(x, weight) is not None) == use_tma
        assert triton_ops._use_tma("backward", torch.empty(M, N, dtype=dtype, device=DEVICE), weight, x) == use_tma
        grad_out = torch.randn(M, N, dtype=dtype, device=DEVICE)
        got = run(x, weight, bias, A, B, 0.5, p, 9, "triton", grad_out)
        ref = reference_fp64(x, weight, bias, A, B, 0.5, p, 9, grad_out)
        for name, out, expected in zip(("y", "dx", "dA", "dB"), got, ref):
            assert_close(name, out, expected, dtype)


def test_gemm_config_pruning_fits_shared_memory(monkeypatch):
    """Autotuning never tries a config whose pipelined tiles exceed shared memory for the dtype."""
    if backends.unavailable_reason("triton", DEVICE):
        pytest.skip(backends.unavailable_reason("triton", DEVICE))
    import triton
    from lora_kernels import triton_ops

    # (8 warps: with 4, the 128x256 fp32 accumulator alone is 256 registers per thread, which the
    # register budget drops whatever the dtype)
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=3, num_warps=8),  # 144 KiB in bf16
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_stages=5)]    # 60 KiB in fp64
    monkeypatch.setattr(triton_ops, "_shared_memory_limit", lambda device: 160 * 1024)
    for dtype, expected in [(torch.bfloat16, configs), (torch.float32, configs[1:]), (torch.float64, configs[1:])]:
        c = torch.empty(1, 1, dtype=dtype)
        monkeypatch.setattr(triton_ops, "AUTOTUNE", True)
        assert triton_ops.prune_gemm_configs(configs, {"c_ptr": c}) == expected
        monkeypatch.setattr(triton_ops, "AUTOTUNE", False)
        assert triton_ops.prune_gemm_configs(configs, {"c_ptr": c}) == expected[:1]


# --------------------------------------------------------------------------- #
# The Triton plans, each forced (docs/design.md, "The kernels")
# --------------------------------------------------------------------------- #

PLANS = ["fused", "two_pass"]
BACKWARD_PLANS = ["fused", "g_pass"]
# (M, K, N, r, p): M = 1, 7, 65; K and N not multiples of 16; r = 1, 7, 16, 65.
PLAN_SHAPES = [(1, 7, 9, 1, 0.0), (7, 65, 33, 7, 0.2), (65, 40, 70, 16, 0.3), (33, 50, 18, 65, 0.1)]


@pytest.fixture
def triton_ops():
    why = backends.unavailable_reason("triton", DEVICE)
    if why:
        pytest.skip(why)
    from lora_kernels import triton_ops

    return triton_ops


def _check_against_reference(M, K, N, r, p, dtype, need_grad_x, x=None, seed=13):
    x_, weight, bias, A, B = make_layer(M, K, N, r, dtype, bias=(M % 2 == 1))
    x = x_ if x is None else x
    grad_out = torch.randn(*x.shape[:-1], N, dtype=dtype, device=DEVICE)
    A_, B_ = A.detach().requires_grad_(True), B.detach().requires_grad_(True)
    x_in = x.detach().requires_grad_(need_grad_x)
    y = lk.lora_linear(x_in, weight, bias, A_, B_, 0.75, dropout_p=p, backend="triton", seed=seed)
    y.backward(grad_out)
    ref = reference_fp64(x, weight, bias, A, B, 0.75, p, seed, grad_out)
    got = (y, x_in.grad if need_grad_x else None, A_.grad, B_.grad)
    for name, out, expected in zip(("y", "dx", "dA", "dB"), got, ref):
        if out is not None:
            assert_close(f"{(M, K, N, r, p)} {name}", out, expected, dtype)


@pytest.mark.parametrize("backward", BACKWARD_PLANS)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need_grad_x", [True, False], ids=["dx", "no-dx"])
def test_triton_plans_match_fp64_reference(triton_ops, monkeypatch, plan, backward, dtype, need_grad_x):
    """Forward by each plan; each backward plan with and without dx (first layer), with and
    without dropout, on awkward shapes."""
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    for M, K, N, r, p in PLAN_SHAPES:
        _check_against_reference(M, K, N, r, p, dtype, need_grad_x)


@pytest.mark.parametrize("plan, backward", [("fused", "fused"), ("two_pass", "g_pass")])
def test_triton_plans_3d_and_non_contiguous(triton_ops, monkeypatch, plan, backward):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    base = torch.randn(3, 40, 11, device=DEVICE)
    for x in (torch.randn(2, 5, 40, device=DEVICE), base.transpose(1, 2),
              torch.randn(6, 80, device=DEVICE)[::2, 20:60]):
        _check_against_reference(x.shape[0], 40, 24, 4, 0.1, torch.float32, True, x=x)


@pytest.mark.extended  # (the default plans' gradcheck is in the default tier: test_gradcheck_fp64)
@pytest.mark.parametrize("plan, backward", [("fused", "fused"), ("two_pass", "g_pass")])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_plans_gradcheck_fp64(triton_ops, monkeypatch, plan, backward, p):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    x, weight, bias, A, B = make_layer(5, 9, 6, 3, torch.float64)
    args = [t.requires_grad_(True) for t in (x, A, B)]
    fn = lambda x, A, B: lk.lora_linear(x, weight, bias, A, B, 1.5, dropout_p=p, backend="triton", seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("plan", PLANS)
def test_triton_forward_mask_is_the_specified_one(triton_ops, monkeypatch, plan):
    """The forward's mask (inside the GEMM for the fused plan), read off xa with A = I."""
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    M, K, p, seed = 37, 45, 0.3, 2**40 + 5
    x = torch.rand(M, K, device=DEVICE) + 0.5
    xa = triton_ops.lora_forward(x, torch.zeros(3, K, device=DEVICE), None, torch.eye(K, device=DEVICE),
                                 torch.zeros(3, K, device=DEVICE), 1.0, p, seed)[1]
    assert torch.equal(xa != 0, reference.dropout_keep_mask(M, K, p, seed, device=DEVICE))


@pytest.mark.parametrize("backward", BACKWARD_PLANS)
def test_triton_backward_is_deterministic(triton_ops, monkeypatch, backward):
    """Two backward runs are bitwise equal, partials over many runs of row blocks included."""
    monkeypatch.setattr(triton_ops, "_backward_runs", lambda *shape: 3)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    x, weight, _, A, B = make_layer(300, 40, 50, 8, torch.float32)
    dy = torch.randn(300, 50, device=DEVICE)
    _, xa = triton_ops.lora_forward(x, weight, None, A, B, 0.5, 0.2, 9)
    first = triton_ops.lora_backward(dy, x, weight, A, B, xa, 0.5, 0.2, 9, True)
    again = triton_ops.lora_backward(dy, x, weight, A, B, xa, 0.5, 0.2, 9, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backward", BACKWARD_PLANS)
@pytest.mark.parametrize("need_grad_x", [True, False], ids=["dx", "no-dx"])
def test_triton_backward_with_more_runs_than_row_blocks(triton_ops, monkeypatch, need_grad_x, backward):
    """Runs without row blocks write zero partials (the reduction sums every run)."""
    monkeypatch.setattr(triton_ops, "_backward_runs", lambda *shape: 7)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    _check_against_reference(65, 40, 70, 5, 0.2, torch.float32, need_grad_x)


class _CountingKernel:
    """Stands in for a kernel (``kernel[grid](...)``), counting launches."""

    def __init__(self, kernel, launches, fail=False):
        self.kernel, self.launches, self.fail = kernel, launches, fail

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.fail:  # a toolchain that cannot build it (any other error propagates)
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(300000, 232448, "shared memory")
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _count_launches(monkeypatch, triton_ops, fail_tma=False):
    launches = []
    autotuned = triton_ops._autotuned
    monkeypatch.setattr(triton_ops, "_autotuned",
                        lambda name, tma: _CountingKernel(autotuned(name, tma), launches, fail_tma and tma))
    for name in ("_lora_shrink_kernel", "_lora_g_kernel", "_reduce_runs_kernel"):
        monkeypatch.setattr(triton_ops, name, _CountingKernel(getattr(triton_ops, name), launches))
    return launches


@pytest.mark.parametrize("plan, forward_launches", [("fused", 1), ("two_pass", 2)])
@pytest.mark.parametrize("backward, backward_launches", [("fused", 2), ("g_pass", 3)])
def test_triton_launch_counts(triton_ops, monkeypatch, plan, forward_launches, backward, backward_launches):
    """One launch per forward (fused plan), two per backward (three for g_pass with dx), no more."""
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", backward)
    launches = _count_launches(monkeypatch, triton_ops)
    x, weight, bias, A, B = make_layer(70, 40, 50, 8, torch.float32)
    _, xa = triton_ops.lora_forward(x, weight, bias, A, B, 0.5, 0.1, 4)
    assert len(launches) == forward_launches
    for need_grad_x, expected in ((True, backward_launches), (False, 2)):  # no dx: one pass either way
        del launches[:]
        triton_ops.lora_backward(torch.randn(70, 50, device=DEVICE), x, weight, A, B, xa, 0.5, 0.1, 4, need_grad_x)
        assert len(launches) == expected


def test_triton_forward_plan_choice(triton_ops, monkeypatch):
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "fused")
    assert triton_ops.forward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, DEVICE) == "fused"
    assert triton_ops.forward_plan(64, 64, 64, triton_ops.FUSED_MAX_RANK + 1, torch.bfloat16, 0.0, DEVICE) == "two_pass"
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "one_pass")
    with pytest.raises(ValueError, match="unknown forward plan 'one_pass'"):
        triton_ops.forward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, DEVICE)
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", None)
    try:
        from lora_kernels.cost_model import choose_forward_plan
    except ImportError:  # no cost model: the two-pass plan
        assert triton_ops.forward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, DEVICE) == "two_pass"
    else:
        for p in (0.0, 0.1):
            assert triton_ops.forward_plan(4096, 4096, 4096, 16, torch.bfloat16, p, DEVICE) == \
                choose_forward_plan(4096, 4096, 4096, 16, torch.bfloat16, p, DEVICE)


def test_triton_backward_plan_choice(triton_ops, monkeypatch):
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", "g_pass")
    assert triton_ops.backward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, True, DEVICE) == "g_pass"
    assert triton_ops.backward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, False, DEVICE) == "fused"
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", "two_pass")
    with pytest.raises(ValueError, match="unknown backward plan 'two_pass'"):
        triton_ops.backward_plan(64, 64, 64, 16, torch.bfloat16, 0.0, True, DEVICE)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", None)
    from lora_kernels.cost_model import choose_backward_plan

    for M, r in ((8192, 64), (512, 16)):
        assert triton_ops.backward_plan(M, 4096, 4096, r, torch.bfloat16, 0.0, True, DEVICE) == \
            choose_backward_plan(M, 4096, 4096, r, torch.bfloat16, 0.0, True, DEVICE)


def test_triton_tma_failure_falls_back_for_that_case_only(triton_ops, monkeypatch):
    """A TMA kernel that fails to build warns once naming its case; only that case uses the pointer GEMM."""
    monkeypatch.setattr(triton_ops, "_tma_by_default", lambda x: True)
    monkeypatch.setattr(triton_ops, "_TMA_FAILED_CASES", set())
    monkeypatch.setattr(triton_ops, "_WARNED", set())
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "fused")
    launches = _count_launches(monkeypatch, triton_ops, fail_tma=True)
    x, weight, bias, A, B = make_layer(16, 32, 24, 4, torch.float32)
    with pytest.warns(UserWarning, match=r"TMA forward kernel failed to build for .*\(16, 32\)"):
        y, _ = triton_ops.lora_forward(x, weight, bias, A, B, 0.5, 0.0, 1)
    assert_close("y", y, reference.lora_forward(*(t.double() for t in (x, weight, bias, A, B)), 0.5, 0.0, 1)[0],
                 torch.float32)
    assert len(triton_ops._TMA_FAILED_CASES) == 1 and len(launches) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same case again: no second warning, straight to pointers
        triton_ops.lora_forward(x, weight, bias, A, B, 0.5, 0.0, 1)
    assert triton_ops._use_tma("forward", x, weight, y) is False
    other = torch.randn(8, 32, device=DEVICE)  # another case still tries TMA
    assert triton_ops._use_tma("forward", other, weight, torch.empty(8, 24, device=DEVICE)) is True


@pytest.mark.skipif(not backends.triton_interpreted(), reason="flips a compile-time switch: interpreter only")
@pytest.mark.extended  # (on Triton 3.4/3.5 the default tier's gradcheck takes this path itself)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp64_without_native_dot(monkeypatch, p):
    """Tritons whose tl.dot refuses fp64 (3.4, 3.5) take the emulated product: gradcheck still passes."""
    import triton.language as tl

    from lora_kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_NATIVE_FP64_DOT", tl.constexpr(False))
    x, weight, bias, A, B = make_layer(5, 9, 6, 3, torch.float64)
    fn = lambda x, A, B: lk.lora_linear(x, weight, bias, A, B, 1.5, dropout_p=p, backend="triton", seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in (x, A, B)))
    W = weight.clone()
    lk.merge_lora_(W, A.detach(), B.detach(), 0.5, backend="triton")
    assert relative_error(W, weight + 0.5 * B.detach() @ A.detach()) < 1e-12


def test_backward_when_y_gets_no_gradient():
    """Gradients are not materialised (ops.setup_context): a backward that reaches the op through
    xa alone (possible through the registered op) gets None for y's gradient and returns None."""
    from lora_kernels import ops

    x, weight, bias, A, B = make_layer(5, 12, 7, 3, torch.float32)
    A.requires_grad_(True)
    seed = torch.tensor(3, dtype=torch.int64, device=DEVICE)
    y, xa = ops.lora_forward(x, weight, bias, A, B, 0.5, 0.0, seed, "reference")
    xa.sum().backward()  # xa's gradient is ignored by design: nothing reaches A
    assert A.grad is None
    y, xa = ops.lora_forward(x, weight, bias, A, B, 0.5, 0.0, seed, "reference")
    (y.sum() + xa.sum()).backward()  # y's gradient still drives A's
    assert A.grad is not None and A.grad.abs().sum() > 0


@pytest.mark.parametrize("flatten", [False, True])
def test_triton_forward_flatten_switch(triton_ops, monkeypatch, flatten):
    """FLATTEN (the persistent TMA loop flattened, tl.range(flatten=True)) reaches the TMA forward
    only, and either loop header computes the same y and xa."""
    if flatten and not triton_ops.HAS_FLATTEN:
        pytest.skip("this Triton's tl.range has no flatten")
    seen = []
    autotuned = triton_ops._autotuned

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**kwargs):
                seen.append((kwargs["TMA"], kwargs["FLATTEN"]))
                return self.kernel[grid](**kwargs)
            return launch

    monkeypatch.setattr(triton_ops, "_autotuned", lambda name, tma: Spy(autotuned(name, tma)))
    monkeypatch.setattr(triton_ops, "FLATTEN", flatten)
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "fused")
    x, weight, bias, A, B = make_layer(40, 48, 32, 4, torch.float32)
    outs = []
    for use_tma in (True, False):
        monkeypatch.setattr(triton_ops, "USE_TMA", use_tma)
        outs.append(triton_ops.lora_forward(x, weight, bias, A, B, 0.5, 0.0, 1))
    assert seen == [(True, flatten), (False, False)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
