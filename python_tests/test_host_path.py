"""The lean eager path: what is cached per call signature or plan key, and what a change invalidates.

On the CPU the Triton launches run under the interpreter, so these tests check the caches by
structure (which keys exist, which calls reach the checks or the autotuner) and every result
against the reference, so a stale plan (wrong strides, wrong plan) fails them.
"""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, functional, reference
from conftest import DEVICE, TOLERANCE, relative_error

needs_triton = pytest.mark.skipif(bool(backends.unavailable_reason("triton", DEVICE)),
                                  reason=backends.unavailable_reason("triton", DEVICE) or "available")


def _inputs(M, K, N, r, dtype=torch.float32, x_stride_pad=0):
    """Inputs of one layer; ``x_stride_pad`` > 0 gives ``x`` a row pitch of K + pad (a column slice)."""
    wide = torch.randn(M, K + x_stride_pad, dtype=dtype, device=DEVICE)
    x = wide[:, :K]
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    bias = torch.randn(N, dtype=dtype, device=DEVICE)
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dtype)
    B = torch.randn(N, r, dtype=dtype, device=DEVICE)
    return x, weight, bias, A, B


def _check_against_reference(x, weight, bias, A, B, backend, p=0.0, seed=None):
    """Forward and gradients of lora_linear against the float64 reference."""
    dy = torch.randn(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, A, B))
    y = lk.lora_linear(xs, weight, bias, As, Bs, 0.5, dropout_p=p, backend=backend, seed=seed)
    y.backward(dy)
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y64 = reference.lora_linear_reference(x64, weight.double(), bias.double(), A64, B64, 0.5, p, seed or 0)
    y64.backward(dy.double())
    tol = TOLERANCE[x.dtype]
    for out, ref in ((y, y64), (xs.grad, x64.grad), (As.grad, A64.grad), (Bs.grad, B64.grad)):
        assert relative_error(out, ref) < tol


@pytest.fixture
def autotuner_calls(monkeypatch):
    """How many launches went through the autotuner's dispatch (Autotuner.run)."""
    from triton.runtime.autotuner import Autotuner

    calls = []
    original = Autotuner.run

    def run(self, *args, **kwargs):
        calls.append(self.base_fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", run)
    return calls


@needs_triton
def test_triton_plan_is_cached_and_the_autotuner_dispatches_once_per_key(autotuner_calls):
    from lora_kernels import triton_ops

    triton_ops.clear_launch_caches()
    inputs = _inputs(9, 40, 24, 4)
    _check_against_reference(*inputs, "triton")
    assert len(triton_ops._PLANS) == 2  # one forward, one backward plan
    assert sorted(autotuner_calls) == ["_lora_backward_kernel", "_lora_forward_kernel"]
    autotuner_calls.clear()
    _check_against_reference(*inputs, "triton")
    assert len(triton_ops._PLANS) == 2
    assert autotuner_calls == []  # launched with the config the autotuner chose, without its dispatch


@needs_triton
@pytest.mark.parametrize("change", ["shape", "dtype", "stride"])
def test_triton_changed_shape_dtype_or_stride_takes_a_new_plan(autotuner_calls, change):
    from lora_kernels import triton_ops

    triton_ops.clear_launch_caches()
    _check_against_reference(*_inputs(9, 40, 24, 4), "triton")
    before = set(triton_ops._PLANS)
    autotuner_calls.clear()
    changed = {"shape": dict(M=13), "dtype": dict(dtype=torch.float64), "stride": dict(x_stride_pad=8)}[change]
    args = dict(M=9, K=40, N=24, r=4)
    args.update({k: v for k, v in changed.items() if k in args})
    _check_against_reference(*_inputs(args["M"], args["K"], args["N"], args["r"],
                                      changed.get("dtype", torch.float32), changed.get("x_stride_pad", 0)), "triton")
    assert len(set(triton_ops._PLANS) - before) == 2
    assert len(autotuner_calls) == 2


@needs_triton
def test_triton_settings_change_takes_a_new_plan(monkeypatch):
    from lora_kernels import triton_ops

    triton_ops.clear_launch_caches()
    shrinks = []
    kernel = triton_ops._lora_shrink_kernel
    original = kernel.run
    # NOTE: in the instance's __dict__, so that undoing it removes it (setattr would leave the bound
    # method there, and later tests that patch the class would not see this kernel's launches)
    monkeypatch.setitem(vars(kernel), "run", lambda *a, **k: (shrinks.append(1), original(*a, **k))[1])
    inputs = _inputs(9, 40, 24, 4)
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "fused")
    _check_against_reference(*inputs, "triton", p=0.25, seed=7)
    assert shrinks == []
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", "two_pass")
    _check_against_reference(*inputs, "triton", p=0.25, seed=7)
    assert shrinks == [1]


def test_checks_run_once_per_signature_and_again_when_it_changes(monkeypatch):
    calls = []
    original = functional.check_inputs
    monkeypatch.setattr(functional, "check_inputs", lambda *a: (calls.append(1), original(*a))[1])
    functional._CHECKED.clear()
    x, weight, bias, A, B = _inputs(5, 12, 7, 2)
    lk.lora_linear(x, weight, bias, A, B, 0.5, backend="reference")
    lk.lora_linear(x, weight, bias, A, B, 0.5, backend="reference")
    assert len(calls) == 1
    lk.lora_linear(x[:3], weight, bias, A, B, 0.5, backend="reference")  # another shape
    lk.lora_linear(x.double(), weight.double(), bias.double(), A, B, 0.5, backend="reference")  # another dtype
    lk.lora_linear(x, weight, bias, A, B, 0.25, backend="reference")  # another scaling
    assert len(calls) == 4


def test_bad_input_is_refused_after_a_good_call_with_nothing_changed():
    functional._CHECKED.clear()
    x, weight, bias, A, B = _inputs(5, 12, 7, 2)
    lk.lora_linear(x, weight, bias, A, B, 0.5, backend="reference")
    saved = [t.clone() for t in (x, weight, bias, A, B)]
    with pytest.raises(ValueError, match="in_features=12"):
        lk.lora_linear(torch.randn(5, 13, device=DEVICE), weight, bias, A, B, 0.5, backend="reference")
    with pytest.raises(TypeError, match="dtype"):
        lk.lora_linear(x.double(), weight, bias, A, B, 0.5, backend="reference")
    with pytest.raises(ValueError, match="bias must have shape"):
        lk.lora_linear(x, weight, bias[:3], A, B, 0.5, backend="reference")
    with pytest.raises(ValueError, match="lora_B must have shape"):
        lk.lora_linear(x, weight, bias, A, B[:, :1], 0.5, backend="reference")
    with pytest.raises(ValueError, match="scaling must be finite"):
        lk.lora_linear(x, weight, bias, A, B, float("nan"), backend="reference")
    with pytest.raises(ValueError, match="dropout"):
        lk.lora_linear(x, weight, bias, A, B, 0.5, dropout_p=1.0, backend="reference")
    for before, t in zip(saved, (x, weight, bias, A, B)):
        assert torch.equal(before, t)


def test_layer_with_a_resized_factor_is_revalidated():
    layer = lk.LoRALinear(12, 7, r=2, backend="reference")
    x = torch.randn(3, 12)
    layer(x)
    with torch.no_grad():
        layer.lora_B.weight.data = torch.zeros(7, 3)  # no longer (out_features, r)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        layer(x)
