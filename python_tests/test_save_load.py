"""State-dict round trips of LoRALinear models, merged and unmerged, with torch.save and safetensors."""

import io

import pytest
import torch
from torch import nn

import lora_kernels as lk



def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 6, bias=False))
    lk.apply_lora(model, r"[02]", r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    return model.eval()


def torch_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def safetensors_round_trip(state, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    return st.load_file(tmp_path / "model.safetensors")


ROUND_TRIPS = ["torch", "safetensors"]


def round_trip(kind, state, tmp_path):
    return torch_round_trip(state) if kind == "torch" else safetensors_round_trip(state, tmp_path)


@pytest.mark.parametrize("kind", ROUND_TRIPS)
def test_unmerged_round_trip(kind, tmp_path):
    model = make_model(0)
    x = torch.randn(4, 12)
    state = round_trip(kind, model.state_dict(), tmp_path)
    fresh = make_model(1)
    fresh.load_state_dict(state)  # strict
    assert not any(m.merged for m in fresh.modules() if isinstance(m, lk.LoRALinear))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(fresh.parameters(), model.parameters()))


@pytest.mark.parametrize("kind", ROUND_TRIPS)
def test_adapter_only_round_trip(kind, tmp_path):
    """lora_state_dict holds the factors only; it loads with strict=False onto the same base weights."""
    model = make_model(0)
    x = torch.randn(4, 12)
    state = round_trip(kind, lk.lora_state_dict(model), tmp_path)
    assert set(state) == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
    fresh = make_model(1)
    base = {k: v for k, v in model.state_dict().items() if k not in state and not k.endswith("_extra_state")}
    fresh.load_state_dict(base, strict=False)
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ROUND_TRIPS)
def test_merged_round_trip_restores_the_merged_state(kind, tmp_path):
    """A merged layer's weight already holds s·B A: loading it must come back merged, not add s·B A twice."""
    model = make_model(0)
    x = torch.randn(4, 12)
    expected = model(x)
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            m.merge()
    state = round_trip(kind, model.state_dict(), tmp_path)
    fresh = make_model(1)
    fresh.load_state_dict(state)
    layers = [m for m in fresh.modules() if isinstance(m, lk.LoRALinear)]
    assert all(m.merged for m in layers)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    for m in layers:
        m.unmerge()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    # And an unmerged state dict loaded into a merged model leaves it unmerged.
    for m in layers:
        m.merge()
    fresh.load_state_dict(make_model(0).state_dict())
    assert not any(m.merged for m in layers)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_merged_state_dict_loads_as_merged():
    """The merged flag travels with the weight, so s·B A is never added a second time."""
    model = make_model(0)
    x = torch.randn(4, 12)
    expected = model(x)
    model[0].merge()
    fresh = make_model(1)
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].merged
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
