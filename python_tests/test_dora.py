"""DoRA on the fused kernels (lora_kernels.dora) against PEFT's own DoRA layer.

PEFT's layer is the specification: forward, the gradients of x, A, B and the magnitude,
dropout (the same torch generator draws the same mask), merge/unmerge, adapter files.
"""

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels as lk
from lora_kernels import peft_accel
from lora_kernels.dora import WeightSquares, dora_linear, dora_weight_norm, weight_row_squares
from lora_kernels.peft_interop import load_peft_adapter, save_peft_adapter
from conftest import ALL_BACKENDS, DEVICE, relative_error

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}
SHAPES = [(1, 7, 9, 1), (7, 65, 33, 4), (65, 40, 70, 16)]  # (tokens, in, out, r)


def peft_dora(K, N, r, dtype, bias=True, dropout=0.0, alpha=None):
    """A PEFT DoRA layer with random (non-zero) B and a magnitude moved off its initial norms."""
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(K, N, bias=bias, dtype=dtype, device=DEVICE))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, use_dora=True,
                                            target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B.default.weight.normal_()
        layer.lora_magnitude_vector.default.weight.mul_(torch.rand(N, dtype=dtype, device=DEVICE) + 0.5)
    return model, layer


def peft_params(layer):
    return (layer.lora_A.default.weight, layer.lora_B.default.weight, layer.lora_magnitude_vector.default.weight)


def run_peft(model, layer, x, dy):
    model.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_()
    y = model(xg)
    y.backward(dy)
    return [y.detach(), xg.grad] + [p.grad.clone() for p in peft_params(layer)]


def run_ours(layer, x, dy, backend, p=0.0):
    A, B, m = (t.detach().clone().requires_grad_() for t in peft_params(layer))
    xg = x.detach().clone().requires_grad_()
    base = layer.base_layer
    y = dora_linear(xg, base.weight, base.bias, A, B, layer.scaling["default"], m, dropout_p=p, backend=backend)
    y.backward(dy)
    return [y.detach(), xg.grad, A.grad, B.grad, m.grad]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_row_norms_from_the_low_rank_structure_match_the_dense_ones(shape, dtype):
    _, K, N, r = shape
    W = torch.randn(N, K, dtype=dtype, device=DEVICE)
    A, B = torch.randn(r, K, dtype=dtype, device=DEVICE), torch.randn(N, r, dtype=dtype, device=DEVICE)
    dense = torch.linalg.norm((W + 0.7 * B @ A).double(), dim=1)
    assert relative_error(dora_weight_norm(W, A, B, 0.7), dense) <= BOUND[dtype]
    assert relative_error(dora_weight_norm(W, A, B, 0.7, weight_row_squares(W)), dense) <= BOUND[dtype]


def test_row_norms_in_bf16_are_as_close_as_pefts_own():
    W = torch.randn(70, 64, device=DEVICE).bfloat16()
    A, B = torch.randn(8, 64, device=DEVICE).bfloat16() / 8, torch.randn(70, 8, device=DEVICE).bfloat16()
    dense = torch.linalg.norm(W.double() + 0.5 * B.double() @ A.double(), dim=1)
    peft_way = torch.linalg.norm(W + 0.5 * (B @ A), dim=1)  # PEFT: in the model's dtype
    ours = relative_error(dora_weight_norm(W, A, B, 0.5), dense)
    assert ours <= max(relative_error(peft_way, dense), 1e-3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_and_every_gradient_match_peft(backend, shape, dtype):
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("float64 is the reference path's")
    M, K, N, r = shape
    model, layer = peft_dora(K, N, r, dtype, bias=M % 2 == 1)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    dy = torch.randn(M, N, dtype=dtype, device=DEVICE)
    for name, got, want in zip(("y", "dx", "dA", "dB", "dm"), run_ours(layer, x, dy, backend),
                               run_peft(model, layer, x, dy)):
        assert relative_error(got, want) <= BOUND[dtype], name


def test_dropout_in_training_matches_peft_mask_for_mask():
    model, layer = peft_dora(24, 10, 4, torch.float64, dropout=0.3)
    model.train()
    x, dy = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 10, dtype=torch.float64)
    torch.manual_seed(11)
    want = run_peft(model, layer, x, dy)
    torch.manual_seed(11)  # PEFT's nn.Dropout and dora_linear draw from the same generator
    got = run_ours(layer, x, dy, "reference", p=0.3)
    for name, g, w in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        assert relative_error(g, w) <= 1e-12, name


def test_3d_and_non_contiguous_inputs():
    model, layer = peft_dora(40, 24, 4, torch.float64)
    for x in (torch.randn(2, 5, 40, dtype=torch.float64), torch.randn(3, 40, 11, dtype=torch.float64).transpose(1, 2)):
        dy = torch.randn(*x.shape[:-1], 24, dtype=torch.float64)
        for name, g, w in zip("y dx dA dB dm".split(), run_ours(layer, x, dy, "reference"),
                              run_peft(model, layer, x, dy)):
            assert relative_error(g, w) <= 1e-12, name


def test_gradcheck_float64():
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    A = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    B = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    m = torch.rand(9, dtype=torch.float64, requires_grad=True)

    # The norm is detached (as in PEFT): gradcheck the function with that constant held fixed.
    n = dora_weight_norm(W, A, B, 0.5)

    def f(x, A, B, m):
        return dora_linear(x, W, b, A, B, 0.5, m * (dora_weight_norm(W, A, B, 0.5) / n), backend="reference")

    torch.autograd.gradcheck(lambda x, m: dora_linear(x, W, b, A, B, 0.5, m, backend="reference"), (x, m))
    torch.autograd.gradcheck(f, (x, A, B, m))


def test_compiles_with_fullgraph():
    W = torch.randn(9, 12)
    A, B, m = torch.randn(3, 12), torch.randn(9, 3), torch.rand(9)
    sq = weight_row_squares(W)
    f = torch.compile(lambda x: dora_linear(x, W, None, A, B, 0.5, m, backend="reference", weight_squares=sq),
                      fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 12)
    torch.testing.assert_close(f(x), dora_linear(x, W, None, A, B, 0.5, m, backend="reference"))


class _Sizes(TorchDispatchMode):
    """The number of elements of every new storage an op allocates (views of its inputs are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_out_by_in_tensor_in_a_fused_forward(backend):
    K, N = 64, 48
    layer = lk.LoRALinear(K, N, r=4, alpha=8, use_dora=True, backend=backend, device=DEVICE)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(8, K, device=DEVICE)
    layer(x)  # the first call computes ‖W0ᵢ‖² (once per weight version)
    with _Sizes() as probe:
        layer(x)
    assert probe.sizes and max(probe.sizes) < N * K
    model, _ = peft_dora(K, N, 4, torch.float32)
    with _Sizes() as probe:  # the probe sees PEFT's dense B A: the test can fail
        model(x)
    assert max(probe.sizes) >= N * K


def test_weight_squares_follow_the_weight():
    W = torch.randn(6, 5)
    cache = WeightSquares()
    first = cache(W)
    assert cache(W) is first
    W.mul_(2)  # in place: the version counter moves
    torch.testing.assert_close(cache(W), 4 * first)


def test_lora_linear_module_matches_peft_and_round_trips_merge():
    model, layer = peft_dora(20, 12, 4, torch.float64)
    base = nn.Linear(20, 12, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(layer.base_layer.weight)
        base.bias.copy_(layer.base_layer.bias)
    ours = lk.LoRALinear.from_linear(base, r=4, alpha=8, use_dora=True)
    assert ours.lora_magnitude_vector.shape == (12,)
    torch.testing.assert_close(ours.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1))  # m starts at ‖W0‖
    with torch.no_grad():
        for mine, theirs in zip(ours._adapter_params(), peft_params(layer)):
            mine.copy_(theirs)
    x = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)
    w0 = base.weight.detach().clone()
    ours.merge()
    model.merge_adapter()
    torch.testing.assert_close(base.weight, layer.base_layer.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.eval()(x), model(x), rtol=1e-12, atol=1e-12)
    ours.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-12, atol=1e-12)
    assert sorted(lk.lora_state_dict(nn.Sequential(ours))) == ["0.lora_A.weight", "0.lora_B.weight",
                                                                "0.lora_magnitude_vector"]


def test_apply_lora_trains_the_magnitude():
    model = lk.apply_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=2, use_dora=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight", "0.lora_magnitude_vector",
                         "2.lora_A.weight", "2.lora_B.weight", "2.lora_magnitude_vector"]
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_magnitude_vector.grad is not None


def test_adapter_files_round_trip_through_peft(tmp_path):
    model, layer = peft_dora(16, 8, 2, torch.float32)
    model.save_pretrained(tmp_path / "peft")
    plain = nn.Sequential()
    plain.add_module("proj", nn.Linear(16, 8))
    with torch.no_grad():
        plain.proj.weight.copy_(layer.base_layer.weight)
        plain.proj.bias.copy_(layer.base_layer.bias)
    load_peft_adapter(plain, tmp_path / "peft")
    assert plain.proj.use_dora
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    save_peft_adapter(plain, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    again = copy.deepcopy(model)
    from peft import PeftModel

    base2 = nn.Sequential()
    base2.add_module("proj", nn.Linear(16, 8))
    base2.load_state_dict({"proj.weight": plain.proj.weight, "proj.bias": plain.proj.bias})
    reloaded = PeftModel.from_pretrained(base2, tmp_path / "ours")
    torch.testing.assert_close(reloaded(x), again(x), rtol=1e-5, atol=1e-6)


def test_accelerate_peft_runs_dora_fused_with_pefts_results(monkeypatch):
    theirs, layer = peft_dora(24, 12, 4, torch.float32)
    ours = copy.deepcopy(theirs)
    report = lk.accelerate_peft(ours)
    assert set(report.current().values()) == {"fused"}
    calls = []
    real = peft_accel.dora_linear
    monkeypatch.setattr(peft_accel, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, dy = torch.randn(2, 3, 24), torch.randn(2, 3, 12)
    got = run_peft(ours, ours.base_model.model.proj, x, dy)
    want = run_peft(theirs, layer, x, dy)
    assert calls
    for name, g, w in zip("y dx dA dB dm".split(), got, want):
        assert relative_error(g, w) <= 1e-5, name


def test_bad_input_is_refused_and_a_zero_row_behaves_as_in_peft():
    W, A, B = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        dora_linear(torch.randn(3, 4), W, None, A, B, 1.0, torch.rand(4))
    model, layer = peft_dora(6, 4, 2, torch.float64, bias=False)
    with torch.no_grad():  # row 0 of W0 + s·B A is exactly zero
        layer.base_layer.weight[0].zero_()
        layer.lora_B.default.weight[0].zero_()
    x = torch.randn(3, 6, dtype=torch.float64)
    ours = run_ours(layer, x, torch.ones(3, 4, dtype=torch.float64), "reference")[0]
    theirs = model(x).detach()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:])
