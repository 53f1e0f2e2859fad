"""LoRALinear, apply_lora and the refusals: bad input gets a clear error and changes nothing."""

import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import ALL_BACKENDS, DEVICE


def test_new_layer_equals_its_base_exactly():
    base = nn.Linear(20, 12, device=DEVICE)
    layer = lk.LoRALinear.from_linear(base, r=4, alpha=8)
    x = torch.randn(3, 20, device=DEVICE)
    assert torch.equal(layer(x), base(x))


def test_from_linear_shares_and_freezes_the_base_weight():
    base = nn.Linear(20, 12)
    layer = lk.LoRALinear.from_linear(base, r=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_parameter_names_and_shapes_follow_peft():
    layer = lk.LoRALinear(20, 12, r=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (12, 20), "bias": (12,), "lora_A.weight": (4, 20), "lora_B.weight": (12, 4),
                      "_extra_state": ()}
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0


@pytest.mark.parametrize("use_rslora, expected", [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scaling(use_rslora, expected):
    assert lk.LoRALinear(8, 8, r=16, alpha=32, use_rslora=use_rslora).scaling == pytest.approx(expected)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_schemes(init):
    layer = lk.LoRALinear(64, 32, r=8, init=init)
    assert layer.lora_A.weight.std() > 0 and torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_training_step_moves_only_the_adapter(backend):
    layer = lk.LoRALinear(16, 8, r=4, dropout=0.1, backend=backend, device=DEVICE)
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(32, 16, device=DEVICE), torch.randn(32, 8, device=DEVICE)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight, w0)


def test_merge_state_and_refusals():
    layer = lk.LoRALinear(16, 8, r=4)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    merged_w = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, merged_w), "a refused merge changed the weight"
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before training"):
        layer(x)  # training mode, grads enabled: the adapter cannot learn while merged
    with torch.no_grad():
        layer(x)
    layer.eval()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight, w0, rtol=0, atol=1e-6)


def test_apply_lora_swaps_targets_and_freezes_the_rest():
    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8),
                                            "o_proj": nn.Linear(8, 8)}))
    model.add_module("norm", nn.LayerNorm(8))
    q_weight = model.attn["q_proj"].weight
    lk.apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    assert isinstance(model.attn["q_proj"], lk.LoRALinear) and isinstance(model.attn["v_proj"], lk.LoRALinear)
    assert type(model.attn["o_proj"]) is nn.Linear
    assert model.attn["q_proj"].weight is q_weight
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["attn.q_proj.lora_A.weight", "attn.q_proj.lora_B.weight",
                         "attn.v_proj.lora_A.weight", "attn.v_proj.lora_B.weight"]
    assert set(lk.lora_state_dict(model)) == set(trainable)


def test_apply_lora_regex_and_refusals_leave_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.Linear(4, 4))
    lk.apply_lora(model, r"[02]", r=2)
    assert isinstance(model[0], lk.LoRALinear) and isinstance(model[2], lk.LoRALinear)

    fresh = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="1 \\(Conv1d\\)"):
        lk.apply_lora(fresh, r"[01]", r=2)
    with pytest.raises(ValueError, match="no module"):
        lk.apply_lora(fresh, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="positive integer"):
        lk.apply_lora(fresh, r"0", r=0)
    assert type(fresh[0]) is nn.Linear and all(p.requires_grad for p in fresh.parameters())


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def _inputs(M=3, K=8, N=6, r=2, dtype=torch.float32):
    return torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype), \
        torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(x=torch.randn(3, 9)), ValueError, "in_features=8"),
    (lambda a: a.update(lora_A=torch.randn(2, 9)), ValueError, "lora_A must have shape"),
    (lambda a: a.update(lora_B=torch.randn(6, 3)), ValueError, "lora_B must have shape"),
    (lambda a: a.update(lora_B=torch.randn(5, 2)), ValueError, "out_features=6"),
    (lambda a: a.update(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (lambda a: a.update(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank must be positive"),
    (lambda a: a.update(x=a["x"].double()), TypeError, "x has dtype torch.float64 but weight"),
    (lambda a: a.update(lora_B=a["lora_B"].half()), TypeError, "lora_A and lora_B must share a dtype"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "x has dtype torch.int64"),
    (lambda a: a.update(x=torch.empty(3, 8, device="meta")), ValueError, "x is on meta"),
    (lambda a: a.update(lora_A=torch.empty(2, 8, device="meta")), ValueError, "lora_A is on meta"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout probability"),
    (lambda a: a.update(dropout_p=-0.1), ValueError, "dropout probability"),
    (lambda a: a.update(scaling=float("nan")), ValueError, "scaling must be finite"),
])
def test_lora_linear_refuses_bad_input(change, error, message):
    x, w, b, A, B = _inputs()
    args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scaling=1.0, dropout_p=0.0)
    change(args)
    with pytest.raises(error, match=message):
        lk.lora_linear(**args)


def test_refused_merge_modifies_nothing():
    _, w, _, A, B = _inputs()
    before = w.clone()
    with pytest.raises(ValueError):
        lk.merge_lora_(w, A[:, :5], B, 1.0)
    with pytest.raises(ValueError):
        lk.merge_lora_(w, A, B, float("inf"))
    assert torch.equal(w, before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "positive integer"), (dict(r=-2), "positive integer"), (dict(r=2.5), "positive integer"),
    (dict(dropout=1.0), "dropout probability"), (dict(init="zeros"), "init must be"),
])
def test_module_refuses_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lk.LoRALinear(8, 8, **kwargs)


def test_from_linear_refuses_non_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        lk.LoRALinear.from_linear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    layer = lk.LoRALinear(8, 4, r=2, backend=backend, device=DEVICE)
    x = torch.randn(0, 3, 8, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(layer.lora_A.weight.grad) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_computes_in_the_autocast_dtype_with_fp32_masters(backend):
    dtype = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16
    layer = lk.LoRALinear(32, 16, r=4, backend=backend, device=DEVICE)  # fp32 weights and masters
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32
    x64 = x.detach().double()
    ref = nn.functional.linear(x64, layer.weight.double(), layer.bias.double()) + layer.scaling * (
        x64 @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
