"""PEFT interop: from_peft equals PEFT and shares its parameters; adapters round-trip both ways; refusals."""

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import identity_dropout_peft_model  # noqa: E402
import lora_kernels as lk  # noqa: E402
from lora_kernels.peft_interop import (  # noqa: E402
    UnsupportedPeftFeature,
    from_peft,
    load_peft_adapter,
    save_peft_adapter,
    to_peft,
)


class Block(nn.Module):
    """Attention-ish projections and an MLP, plus an embedding (a target PEFT can wrap but we cannot)."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        h = torch.tanh(self.q_proj(x)) * self.v_proj(x)
        return self.down_proj(torch.nn.functional.silu(self.up_proj(h)))


def peft_block(dropout=0.0, **config):
    torch.manual_seed(0)
    # init False: lora_B is random, so LoRA really contributes.
    config = {**dict(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]), **config}
    return get_peft_model(Block(), LoraConfig(**config))


def grads(model, x):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, named


def canonical(name):
    """PEFT's parameter name and ours for the same tensor, both mapped to PEFT's state-dict name."""
    for ours, theirs in (("lora_A.weight", "lora_A.default.weight"), ("lora_B.weight", "lora_B.default.weight")):
        if name.endswith(ours):
            return name[: -len(ours)] + theirs
    return name


def test_from_peft_shares_parameters_and_matches_outputs_and_gradients():
    model = peft_block()
    x = torch.randn(6, 24)
    y_ref, dx_ref, g_ref = grads(model, x)
    params_before = {n: p for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    from_peft(model, backend="reference")
    layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    assert len(layers) == 4 and not any(isinstance(m, peft.tuners.lora.layer.Linear) for m in model.modules())
    # The very same tensors, not copies.
    ids_after = {id(p) for p in model.parameters()}
    assert ids_after == {id(p) for p in params_before.values()}
    q = model.base_model.model.q_proj
    assert q.lora_A.weight is params_before["base_model.model.q_proj.lora_A.default.weight"]
    assert q.weight is params_before["base_model.model.q_proj.base_layer.weight"]
    assert q.scaling == 2.0 and not q.weight.requires_grad

    y, dx, g = grads(model, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert {canonical(n) for n in g} == set(g_ref)
    for n, grad in g.items():
        torch.testing.assert_close(grad, g_ref[canonical(n)], rtol=1e-5, atol=1e-6)

    # The state dict keeps PEFT's keys, in order; full checkpoints load both ways.
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for k, v in state_before.items():
        assert torch.equal(state_after[k], v)
    model.load_state_dict(state_before)  # strict: every key matched
    q.merge()
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before state_dict"):
        model.state_dict()
    q.unmerge()
    # The optimizer made before the swap trains the swapped model.
    a0 = q.lora_A.weight.detach().clone()
    opt.step()
    assert not torch.equal(q.lora_A.weight, a0)


def test_save_peft_adapter_after_from_peft_writes_what_save_pretrained_wrote(tmp_path):
    model = peft_block()
    model.save_pretrained(tmp_path / "peft")
    from_peft(model)
    save_peft_adapter(model, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert list(ours) and set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    def config(d):  # target_modules is a set in PEFT: written in hash order
        c = json.loads((tmp_path / d / "adapter_config.json").read_text())
        return {**c, "target_modules": sorted(c["target_modules"])}

    assert config("ours") == config("peft")
    # to_peft restores PEFT's layers (same tensors), and save_pretrained works again.
    to_peft(model)
    assert isinstance(model.base_model.model.q_proj, peft.tuners.lora.layer.Linear)
    model.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(again) == set(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_dropout_keep_rate_and_expectation_match_peft():
    """Identity factors and a zero base weight make y = dropout(x): the kept fraction and scale are visible."""
    p, d, n = 0.3, 64, 512
    model = identity_dropout_peft_model(p, d)
    x = torch.ones(n, d)
    y_peft = model(x)
    from_peft(model)
    y_ours = model(x)
    for y in (y_peft, y_ours):
        kept = y != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.01
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
        assert abs(y.mean().item() - 1.0) < 0.02  # the expectation is the p=0 output
    assert not torch.equal(y_peft, y_ours)  # different generators, different masks
    model.eval()
    torch.testing.assert_close(model(x), x)


def test_autocast_with_fp32_masters_matches_peft():
    model = peft_block()
    x = torch.randn(8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, dx_ref, g_ref = grads(model, x)
    from_peft(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dx, g = grads(model, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 2e-2 and rel(dx, dx_ref) < 5e-2
    for n, grad in g.items():
        assert grad.dtype == torch.float32
        assert rel(grad, g_ref[canonical(n)]) < 5e-2, n


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {
        n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    modules, params = _snapshot(model)
    assert modules == snap[0]
    assert params.keys() == snap[1].keys()
    for n, (v, flag) in params.items():
        assert torch.equal(v, snap[1][n][0]) and flag == snap[1][n][1]


def _multiple_active(model):
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])


def _lora_bias():
    return peft_block(lora_bias=True)


def _fan_in_fan_out(model):
    model.base_model.model.v_proj.fan_in_fan_out = True


def test_from_peft_converts_dora_layers_sharing_their_magnitude(tmp_path):
    model = peft_block(use_dora=True)
    x = torch.randn(6, 24)
    y_ref, dx_ref, g_ref = grads(model, x)
    model.save_pretrained(tmp_path / "before")
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    from_peft(model)
    layer = model.base_model.model.q_proj
    assert isinstance(layer, lk.LoRALinear) and layer.use_dora
    assert any(layer.lora_magnitude_vector is m for m in mags.values())  # shared, not copied
    y, dx, g = grads(model, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    mag_grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_magnitude_vector")}
    assert len(mag_grads) == 4 and all(v is not None for v in mag_grads.values())
    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert any(k.endswith("lora_magnitude_vector") for k in after)


@pytest.mark.parametrize("make, change, message", [
    (lambda: peft_block(target_modules=["q_proj", "embed"]), None, "non-Linear LoRA target \\(Embedding\\)"),
    (peft_block, _multiple_active, "multiple active adapters"),
    (peft_block, lambda m: m.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"])),
     "multiple adapters loaded"),
    (_lora_bias, None, "lora_bias"),
    (peft_block, _fan_in_fan_out, "fan_in_fan_out"),
    (peft_block, lambda m: m.base_model.model.q_proj.merge(), "merged"),
], ids=["embedding", "multi-active", "multi-loaded", "lora_bias", "fan_in_fan_out", "merged"])
def test_from_peft_refuses_unsupported_features_and_changes_nothing(make, change, message):
    model = make()
    if change:
        change(model)
    snap = _snapshot(model)
    with pytest.raises(UnsupportedPeftFeature, match=message):
        from_peft(model)
    _assert_unchanged(model, snap)


def test_save_peft_adapter_loads_in_peft(tmp_path):
    torch.manual_seed(1)
    base = Block()
    ours = lk.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj", "up_proj"], r=4, alpha=16, dropout=0.1)
    ours.down_proj = lk.LoRALinear.from_linear(ours.down_proj, r=2, alpha=4, dropout=0.1)  # a second rank: rank/alpha patterns
    for m in ours.modules():
        if isinstance(m, lk.LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny-block")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"down_proj": 2} and config["lora_dropout"] == 0.1
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        f"base_model.model.{n}.lora_{ab}.weight" for n in ("q_proj", "v_proj", "up_proj", "down_proj") for ab in "AB"}

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours.eval()
    x = torch.randn(5, 24)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)

    # And back: load_peft_adapter wraps a fresh model's plain Linears with the adapter's settings.
    fresh = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(fresh(x), ours(x), rtol=1e-5, atol=1e-6)
    assert fresh.down_proj.r == 2 and fresh.q_proj.scaling == 4.0 and fresh.q_proj.dropout == 0.1
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(lk.lora_state_dict(fresh))


def test_load_peft_adapter_reads_save_pretrained_output(tmp_path):
    model = peft_block(use_rslora=True).eval()
    model.save_pretrained(tmp_path)
    base = copy.deepcopy(model.get_base_model())  # same base weights, still wrapped by PEFT: unwrap by hand
    ours = Block()
    ours.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k})
    lk.apply_lora(ours, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, alpha=8, use_rslora=True)
    load_peft_adapter(ours, tmp_path)
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours.eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_load_peft_adapter_refusals_load_nothing(tmp_path):
    model = peft_block()
    model.save_pretrained(tmp_path)
    target = lk.apply_lora(Block(), ["q_proj", "v_proj", "up_proj", "down_proj"], r=8, alpha=8)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="r=8"):
        load_peft_adapter(target, tmp_path)
    _assert_unchanged(target, snap)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    plain = Block()
    snap = _snapshot(plain)
    with pytest.raises(ValueError, match="has only"):  # a DoRA adapter without its magnitude vectors
        load_peft_adapter(plain, tmp_path)
    _assert_unchanged(plain, snap)


def test_save_pretrained_after_from_peft_writes_the_adapter_or_refuses(tmp_path):
    model = peft_block()
    model.save_pretrained(tmp_path / "before")
    from_peft(model)
    model.save_pretrained(tmp_path / "after")  # PEFT's own would write 0 tensors
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert after and set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(UnsupportedPeftFeature, match="safe_serialization=False.*to_peft"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(UnsupportedPeftFeature, match="selected_adapters"):
        model.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert not (tmp_path / "bin").exists() and not (tmp_path / "sel").exists()
    to_peft(model)
    assert "save_pretrained" not in vars(model)  # PEFT's own again
    model.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == set(before)
