"""DoRA on the fused kernels (lora_kernels.dora) against PEFT's own DoRA layer.

PEFT's layer is the specification: forward, the gradients of x, A, B and the magnitude,
dropout (the same torch generator draws the same mask), merge/unmerge, adapter files.
"""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels as lk
from lora_kernels import peft_accel
from lora_kernels.dora import WeightNorms, dora_linear, dora_weight_norm, weight_row_norms
from lora_kernels.peft_interop import load_peft_adapter, save_peft_adapter
from conftest import ALL_BACKENDS, DEVICE, TOLERANCE, relative_error

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
    assert relative_error(dora_weight_norm(W, A, B, 0.7, weight_row_norms(W)), dense) <= BOUND[dtype]


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
    w = weight_row_norms(W)
    f = torch.compile(lambda x: dora_linear(x, W, None, A, B, 0.5, m, backend="reference", weight_norm=w),
                      fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 12)
    torch.testing.assert_close(f(x), dora_linear(x, W, None, A, B, 0.5, m, backend="reference"))
    layer = lk.LoRALinear(12, 9, r=3, use_dora=True, backend="reference")  # its cached ‖W0ᵢ‖: computed in the graph
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


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


def test_weight_norms_follow_the_weight():
    W = torch.randn(6, 5)
    cache = WeightNorms()
    first = cache(W)
    assert torch.equal(first, torch.linalg.norm(W, dim=1)) and cache(W) is first
    W.mul_(2)  # in place: the version counter moves
    assert torch.equal(cache(W), torch.linalg.norm(W, dim=1))
    assert cache(W, torch.float64).dtype == torch.float64  # another norm dtype: computed again
    assert torch.equal(cache(W.bfloat16()), torch.linalg.norm(W.bfloat16(), dim=1))
    assert torch.equal(copy.deepcopy(cache)(2 * W), torch.linalg.norm(2 * W, dim=1))


def test_weight_norms_never_take_a_new_storage_at_an_old_address_for_the_old_weight():
    # Two tensors over one buffer: the same address, another storage (as a freed weight's address
    # handed to the next one). A write through a third moves neither one's version counter.
    buf = bytearray(6 * 5 * 4)
    views = [torch.frombuffer(buf, dtype=torch.float32).view(6, 5) for _ in range(3)]
    views[2].copy_(torch.randn(6, 5))
    cache = WeightNorms()
    cache(views[0])
    views[2].mul_(3)
    assert views[1].data_ptr() == views[0].data_ptr() and views[1]._version == views[0]._version
    assert torch.equal(cache(views[1]), torch.linalg.norm(views[1], dim=1))


def assert_fresh(layer, x):
    """The ‖W0ᵢ‖ the layer's forward uses, and its output, are those of its weight as it is now."""
    dtype = layer.lora_A.weight.dtype
    assert torch.equal(layer._weight_norms(layer.weight, dtype), weight_row_norms(layer.weight, dtype))
    fresh = dora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                        layer.lora_magnitude_vector, backend=layer.backend)
    assert torch.equal(layer(x), fresh)


def test_the_cached_weight_norm_follows_merges_loads_and_dtype_moves():
    torch.manual_seed(0)
    layer = lk.LoRALinear(40, 24, r=4, alpha=8, use_dora=True, backend="reference").eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(24) + 0.5)
    x = torch.randn(3, 40)
    assert_fresh(layer, x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()  # the weight comes back within a rounding, written through .data
    assert not torch.equal(layer.weight, w0)  # so the test can fail
    assert_fresh(layer, x)
    other = lk.LoRALinear(40, 24, r=4, alpha=8, use_dora=True)
    layer.load_state_dict(other.state_dict())
    assert_fresh(layer, x)
    layer.half().float()  # new storages; the weight rounded to fp16 on the way
    assert_fresh(layer, x)
    layer.double()
    assert_fresh(layer, x.double())


def test_accelerated_dora_follows_merges_of_its_own_and_of_a_plain_adapter_beside_it():
    model, layer = peft_dora(40, 24, 4, torch.float32)
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False))
    lk.accelerate_peft(model)
    model.eval()
    x = torch.randn(3, 40)
    base = layer.base_layer
    A, B, m = peft_params(layer)
    cache = getattr(layer, peft_accel._STATE).weight_norms
    for adapter in ("default", "plain"):  # PEFT's DoRA merge, then lora_kernels' merge through .data
        model(x)  # the cache is filled
        model.set_adapter(adapter)
        model.merge_adapter()
        model.unmerge_adapter()
        model.set_adapter("default")
        assert torch.equal(cache(base.weight, A.dtype), weight_row_norms(base.weight, A.dtype)), adapter
        fresh = dora_linear(x, base.weight, base.bias, A, B, layer.scaling["default"], m, backend="reference")
        assert torch.equal(model(x), fresh), adapter


def test_lora_linear_module_matches_peft_and_round_trips_merge():
    model, layer = peft_dora(20, 12, 4, torch.float64)
    base = nn.Linear(20, 12, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(layer.base_layer.weight)
        base.bias.copy_(layer.base_layer.bias)
    ours = lk.LoRALinear.from_linear(base, r=4, alpha=8, use_dora=True)
    assert ours.lora_magnitude_vector.shape == (12,)
    assert torch.equal(ours.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1))  # m starts at ‖W0‖, as PEFT's
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
    with torch.no_grad():  # row 0 of W0 + s·B A is exactly zero; row 1 of W0 is zero, not that of B
        layer.base_layer.weight[:2].zero_()
        layer.lora_B.default.weight[0].zero_()
    x = torch.randn(3, 6, dtype=torch.float64)
    ours = run_ours(layer, x, torch.ones(3, 4, dtype=torch.float64), "reference")[0]
    theirs = model(x).detach()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert not torch.isfinite(theirs[:, 0]).any()
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# At initialisation (B = 0, m = ‖W0‖) DoRA is its base layer, bit for bit, as PEFT's is
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pefts_scenario_accelerated_at_init_is_the_base_model_bit_for_bit(dtype, bias):
    # PEFT's tests/test_initialization.py::test_lora_use_dora_linear, on the accelerated model.
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("linear", nn.Linear(1000, 1000, bias=bias, dtype=dtype))
    x = torch.rand(10, 1000, dtype=dtype)
    with torch.no_grad():
        want = base(x)
    model = get_peft_model(copy.deepcopy(base).eval(), LoraConfig(use_dora=True, target_modules=["linear"]))
    lk.accelerate_peft(model)
    assert torch.equal(model(x), want)  # with autograd recording, as PEFT's test runs
    assert lk.accelerate_peft(model).current()["base_model.model.linear"] == "fused"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_new_dora_layer_is_its_base_layer_bit_for_bit(dtype, bias):
    layer = lk.LoRALinear(70, 33, bias=bias, r=4, alpha=8, use_dora=True, backend="reference", dtype=dtype)
    x = torch.randn(2, 5, 70, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    m = weight_row_norms(layer.weight)  # PEFT's initial magnitude
    A, B = torch.randn(4, 70, dtype=dtype), torch.zeros(33, 4, dtype=dtype)
    assert torch.equal(dora_weight_norm(layer.weight, A, B, 2.0), m)
    assert torch.equal(dora_linear(x, layer.weight, layer.bias, A, B, 2.0, m, backend="reference"),
                       F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("adapter_dtype", ["fp32-adapters", "adapters-in-the-base-dtype"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_at_init_is_no_further_from_the_base_than_pefts(dtype, adapter_dtype):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("linear", nn.Linear(256, 200, dtype=dtype))
    x = torch.randn(16, 256, dtype=dtype)
    with torch.no_grad():
        want = base(x).double()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, target_modules=["linear"]),
                            autocast_adapter_dtype=adapter_dtype == "fp32-adapters")
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours)
    with torch.no_grad():
        got, peft_y = ours(x), theirs(x)
    peft_off, our_off = (peft_y.double() - want).abs(), (got.double() - want).abs()
    assert our_off.max() <= peft_off.max() and our_off.norm() <= peft_off.norm()
    assert torch.equal(got, peft_y)  # the reference backend computes PEFT's very c and y
    if adapter_dtype != "fp32-adapters":  # PEFT's magnitude then starts at its own norm: exact, and ours too
        assert peft_off.max() == 0 and our_off.max() == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kernel_backends_at_init_scale_by_exactly_one_within_their_tolerance(backend):
    layer = lk.LoRALinear(64, 48, r=4, alpha=8, use_dora=True, backend=backend, device=DEVICE)
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    assert torch.equal(m / dora_weight_norm(layer.weight, A, B, layer.scaling).to(m.dtype), torch.ones_like(m))
    x = torch.randn(9, 64, device=DEVICE)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert relative_error(layer(x), want) <= TOLERANCE[torch.float32]
    if backend == "reference":
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_training_steps_keep_matching_peft(backend):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(40, 24, device=DEVICE))
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"]))
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours, backend=backend)
    optimisers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    x, target = torch.randn(6, 40, device=DEVICE), torch.randn(6, 24, device=DEVICE)
    for _ in range(5):
        for model, opt in zip((ours, theirs), optimisers):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    layer = theirs.base_model.model.proj
    assert layer.lora_B.default.weight.abs().min() > 0  # trained away from the initialisation
    for (name, got), want in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(got, want) <= BOUND[torch.float32], name
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= BOUND[torch.float32]
