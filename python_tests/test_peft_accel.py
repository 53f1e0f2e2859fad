"""accelerate_peft: a PEFT model, still PEFT's, whose LoRA layers run on lora_kernels.

A tiny Llama built from a config (nothing downloaded). With dropout 0 the accelerated
model's logits and every gradient equal PEFT's to fp32 rounding, for one adapter, two
adapters with set_adapter, modules_to_save, bias modes, rsLoRA and a DoRA layer mixed in.
"""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import peft_accel  # noqa: E402

from conftest import identity_dropout_peft_model, relative_error  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = 1e-5  # relative error: fp32 rounding


def tiny_llama(seed=0, bias=False):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                        max_position_embeddings=64, attention_bias=bias, mlp_bias=bias))


def lora_config(**kw):
    # init_lora_weights=False: lora_B is random, so every adapter really contributes.
    return LoraConfig(**{**dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **kw})


def two_adapters():
    model = get_peft_model(tiny_llama(), lora_config())
    model.add_adapter("second", lora_config(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    model.set_adapter("second")
    return model


def dora_layer_mixed_in():
    model = get_peft_model(tiny_llama(), lora_config())
    layer = model.base_model.model.model.layers[1].self_attn.o_proj
    torch.manual_seed(3)
    layer.update_layer("default", 4, 8, config=lora_config(use_dora=True))
    assert "default" in layer.lora_variant
    return model


VARIANTS = {
    "one-adapter": lambda: get_peft_model(tiny_llama(), lora_config()),
    "two-adapters-set_adapter": two_adapters,
    "modules_to_save": lambda: get_peft_model(tiny_llama(), lora_config(modules_to_save=["lm_head"])),
    "bias-none": lambda: get_peft_model(tiny_llama(bias=True), lora_config()),
    "bias-lora_only": lambda: get_peft_model(tiny_llama(bias=True), lora_config(bias="lora_only")),
    "bias-all": lambda: get_peft_model(tiny_llama(bias=True), lora_config(bias="all")),
    "rslora": lambda: get_peft_model(tiny_llama(), lora_config(use_rslora=True, r=8, lora_alpha=5)),
    "dora-layer-mixed-in": dora_layer_mixed_in,
}

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def step(model, ids=IDS):
    """Logits, loss, and the gradient of every trainable parameter (by name)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                                 for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(ours, theirs, bound=FP32):
    (lo, go), (lt, gt) = ours, theirs
    assert relative_error(lo, lt) <= bound
    assert set(go) == set(gt) and go
    for name in gt:
        assert relative_error(go[name], gt[name]) <= bound, name


def count_fused(monkeypatch):
    calls = []
    for name in ("lora_linear", "dora_linear"):
        real = getattr(peft_accel, name)
        monkeypatch.setattr(peft_accel, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


def peft_linears(model):
    return [m for m in model.modules() if type(m) is lora_layer.Linear]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_every_gradient_match_peft(variant, monkeypatch):
    theirs = VARIANTS[variant]()
    ours = copy.deepcopy(theirs)
    report = lk.accelerate_peft(ours)
    assert len(report.accelerated) == len(peft_linears(ours)) and not report.skipped
    calls = count_fused(monkeypatch)
    result = step(ours)
    gradients = result[1]
    assert_same_step(result, step(theirs))
    # Which layers ran fused: all but the layers without an active adapter (DoRA ones included).
    expected = sum(why == "fused" for why in report.current().values())
    assert len(calls) == expected > 0
    if variant.startswith("bias-"):  # trained base biases get their gradient from the fused path
        trained = [n for n in gradients if n.endswith("base_layer.bias")]
        assert len(trained) == (0 if variant == "bias-none" else 14)
    if variant == "dora-layer-mixed-in":
        assert expected == 14 and "DoraLinearVariant" not in str(report)
    if variant == "two-adapters-set_adapter":
        assert expected == 4  # "second" sits on q_proj and down_proj of 2 layers
        assert report.current()["base_model.model.model.layers.0.self_attn.k_proj"] == "no active adapter on this layer"
        for model in (ours, theirs):
            model.set_adapter("default")
        calls.clear()
        assert_same_step(step(ours), step(theirs))
        assert len(calls) == 14


def test_triton_backend_under_the_interpreter_matches_peft():
    if lk.backends.unavailable_reason("triton", torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj", "down_proj"])).to(device)
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours, backend="triton")
    ids = IDS[:1, :5].to(device)
    assert_same_step(step(ours, ids), step(theirs, ids))


def test_the_model_stays_peft_and_undo_restores_peft(monkeypatch):
    theirs = get_peft_model(tiny_llama(), lora_config())
    ours = copy.deepcopy(theirs)
    params = {n: p for n, p in ours.named_parameters()}
    keys = list(ours.state_dict())
    class_methods = [vars(lora_layer.Linear)[m] for m in ("forward", "merge", "unmerge")]
    report = lk.accelerate_peft(ours)
    assert {n: p for n, p in ours.named_parameters()} == params  # same names, same tensors
    assert list(ours.state_dict()) == keys
    assert isinstance(ours, PeftModel) and len(peft_linears(ours)) == 14
    # Only this model's layers changed: the class and the other model are untouched.
    assert [vars(lora_layer.Linear)[m] for m in ("forward", "merge", "unmerge")] == class_methods
    assert all("forward" not in vars(m) for m in peft_linears(theirs))
    calls = count_fused(monkeypatch)
    step(theirs)
    assert not calls
    # deepcopy carries the acceleration over, bound to the copy's own layers.
    twin = copy.deepcopy(ours)
    assert all(m.forward.args[0] is m for m in peft_linears(twin))
    step(twin)
    assert len(calls) == 14

    report.undo()
    assert all("forward" not in vars(m) and "merge" not in vars(m) for m in peft_linears(ours))
    calls.clear()
    assert_same_step(step(ours), step(theirs), bound=0)
    assert not calls


def test_gradient_checkpointing_matches_peft():
    theirs = get_peft_model(tiny_llama(), lora_config())
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours)
    theirs.train(), ours.train()
    assert_same_step(step(ours), step(theirs))


def test_disable_adapter_and_adapter_names_run_peft_code(monkeypatch):
    theirs = get_peft_model(tiny_llama(), lora_config())
    theirs.add_adapter("other", lora_config(r=2))
    theirs.eval()  # PEFT takes adapter_names= in eval mode only
    ours = copy.deepcopy(theirs)
    report = lk.accelerate_peft(ours)
    calls = count_fused(monkeypatch)
    with torch.no_grad():
        with ours.disable_adapter():
            assert set(report.current().values()) == {"adapters disabled (base layer only, PEFT's forward)"}
            off = ours(input_ids=IDS).logits
        with theirs.disable_adapter():
            torch.testing.assert_close(off, theirs(input_ids=IDS).logits, rtol=0, atol=0)
        assert not calls
        names = ["default", "other"]
        mixed = ours(input_ids=IDS, adapter_names=names).logits  # on the segmented multi-adapter kernels
        assert relative_error(mixed, theirs(input_ids=IDS, adapter_names=names).logits) <= FP32
        assert not calls
        ours.base_model.set_adapter(["default", "other"])
        theirs.base_model.set_adapter(["default", "other"])
        both = ours(input_ids=IDS).logits  # several active adapters: one fused call per layer
        assert relative_error(both, theirs(input_ids=IDS).logits) <= FP32
        assert len(calls) == 14 and set(report.current().values()) == {"fused"}


@pytest.mark.parametrize("names", [["default", "other", "__base__"], ["__base__"] * 3, ["other", "other", "default"]])
def test_adapter_names_mixed_batches_run_on_the_multi_adapter_kernels(names, monkeypatch):
    theirs = get_peft_model(tiny_llama(), lora_config())
    theirs.add_adapter("other", lora_config(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    theirs.eval()
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours)
    mixed = []
    real = peft_accel._mixed_forward
    monkeypatch.setattr(peft_accel, "_mixed_forward", lambda *a, **k: mixed.append(1) or real(*a, **k))
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=names).logits
        want = theirs(input_ids=ids, adapter_names=names).logits
    assert relative_error(got, want) <= FP32
    assert len(mixed) == 14  # every LoRA layer, those where "other" is absent included
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check still speaks
        ours(input_ids=ids, adapter_names=names[:2])


def two_active(dropout=0.0):
    model = get_peft_model(tiny_llama(), lora_config(lora_dropout=dropout))
    model.add_adapter("other", lora_config(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"],
                                           lora_dropout=dropout))
    model.base_model.set_adapter(["default", "other"])
    for n, p in model.named_parameters():  # PEFT's set_adapter trains only the first; train both
        p.requires_grad_(".lora_" in n)
    return model


def test_two_active_adapters_train_fused_with_pefts_gradients(monkeypatch):
    theirs = two_active()
    ours = copy.deepcopy(theirs)
    report = lk.accelerate_peft(ours)
    assert set(report.current().values()) == {"fused"}
    calls = count_fused(monkeypatch)
    result = step(ours)
    assert_same_step(result, step(theirs))
    assert len(calls) == 14 and any(".other." in n for n in result[1])


def test_two_active_adapters_with_dropout_keep_pefts_forward():
    model = two_active(dropout=0.1)
    report = lk.accelerate_peft(model)
    model.train()
    reasons = set(report.current().values())
    assert any("a mask per adapter" in why for why in reasons), reasons
    model.eval()  # dropout off: the stacked fused call applies again
    assert set(report.current().values()) == {"fused"}


def test_merge_unmerge_and_merge_and_unload(monkeypatch):
    model = dora_layer_mixed_in()
    lk.accelerate_peft(model)
    merges = []
    real = peft_accel.merge_lora_
    monkeypatch.setattr(peft_accel, "merge_lora_", lambda *a, **k: merges.append(1) or real(*a, **k))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        weights = [m.base_layer.weight.detach().clone() for m in peft_linears(model)]
        model.merge_adapter()
        assert len(merges) == 13  # the DoRA layer is merged by PEFT's own code
        assert all(m.merged_adapters == ["default"] for m in peft_linears(model))
        assert relative_error(model(input_ids=IDS).logits, expected) < FP32
        model.unmerge_adapter()
        assert not any(m.merged for m in peft_linears(model))
        for m, w in zip(peft_linears(model), weights):
            assert relative_error(m.base_layer.weight, w) < FP32
        # safe_merge: merged into a copy, then swapped in; NaNs refused as PEFT refuses them.
        layer = peft_linears(model)[0]
        layer.merge(safe_merge=True)
        assert layer.merged_adapters == ["default"]
        layer.unmerge()
        with warnings_as_errors(), pytest.raises(UserWarning, match="Already unmerged"):
            layer.unmerge()
        w0 = layer.base_layer.weight.detach().clone()
        layer.lora_B["default"].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaNs detected"):
            layer.merge(safe_merge=True)
        assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
        layer.lora_B["default"].weight[0, 0] = 0.0
        expected = model(input_ids=IDS).logits
        plain = model.merge_and_unload()
        assert not peft_linears(plain) and type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        assert relative_error(plain(input_ids=IDS).logits, expected) < FP32


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_save_pretrained_round_trips_exactly(tmp_path):
    model = two_adapters()
    lk.accelerate_peft(model)
    model.set_adapter("default")
    step(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    lk.accelerate_peft(loaded)
    for name, t in model.state_dict().items():
        if ".default." in name:
            assert torch.equal(loaded.state_dict()[name], t), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_training_lowers_the_loss_as_peft_does():
    def train(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(20):
            loss = model(input_ids=IDS, labels=IDS).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    theirs = get_peft_model(tiny_llama(), lora_config(lora_dropout=0.0))
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours)
    a, b = train(ours), train(theirs)
    assert a[-1] < a[0] - 0.3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(y)


def test_torch_compile_fullgraph_matches_eager():
    model = get_peft_model(tiny_llama(), lora_config())
    # NOTE: on older torch (2.8) Dynamo cannot trace transformers' own Llama code in one graph:
    # judged on the un-accelerated PEFT model first, so only a break of ours can fail this test.
    try:
        step(torch.compile(get_peft_model(tiny_llama(), lora_config()), fullgraph=True, backend="aot_eager"))
    except torch._dynamo.exc.Unsupported as exc:
        pytest.skip(f"this torch cannot compile the plain PEFT Llama with fullgraph=True: {str(exc).splitlines()[0]}")
    torch._dynamo.reset()
    lk.accelerate_peft(model)
    eager = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(step(compiled), eager)


def test_dropout_keep_rate_distribution_and_determinism():
    """Identity factors and a zero base weight make y = dropout(x) · (1/(1-p) on kept entries)."""
    p, d, n = 0.3, 64, 512
    model = identity_dropout_peft_model(p, d)
    x = torch.ones(n, d)
    torch.manual_seed(7)
    y_peft = model(x)
    lk.accelerate_peft(model)
    torch.manual_seed(7)
    y = model(x)
    kept = y != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / y.numel()) ** 0.5)  # binomial: 4 standard errors
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    per_column = kept.double().mean(0)  # no column is favoured
    assert (per_column - (1 - p)).abs().max() < 5 * ((p * (1 - p) / n) ** 0.5)
    assert not torch.equal(y, y_peft)  # our generator, not nn.Dropout's: different masks
    torch.manual_seed(7)
    assert torch.equal(model(x), y)  # torch.manual_seed reproduces the mask
    assert not torch.equal(model(x), y)  # and each call draws a fresh one
    model.eval()
    torch.testing.assert_close(model(x), x)


def test_report_and_refusals():
    model = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"]))
    snapshot = {n: vars(m).get("forward") for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        lk.accelerate_peft(model, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(lk.BackendUnavailableError, match="needs CUDA tensors"):
            lk.accelerate_peft(model, backend="cuda")
    assert {n: vars(m).get("forward") for n, m in model.named_modules()} == snapshot  # nothing changed
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lk.accelerate_peft(tiny_llama())
    report = lk.accelerate_peft(model)
    assert len(report.accelerated) == 4
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding is not PEFT's LoRA Linear" in report.skipped["base_model.model.model.embed_tokens"]
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.merge()
    assert report.current()[
        "base_model.model.model.layers.0.self_attn.q_proj"] == "adapters ['default'] merged into the base weight " \
                                                                "(base layer only)"
    assert "merged into the base weight" in str(report) and "1 left to PEFT" in str(report)
    q.unmerge()
    assert report.current()["base_model.model.model.layers.0.self_attn.q_proj"] == "fused"
    assert lk.accelerate_peft(model, backend="reference").backend == "reference"  # again: changes the backend
    assert q._lora_kernels_accel.backend == "reference"


def test_bf16_model_with_fp32_adapters_under_autocast_runs_fused(monkeypatch):
    """PEFT's default for a bf16 model keeps the factors in fp32; under autocast both compute in bf16."""
    theirs = get_peft_model(tiny_llama().to(torch.bfloat16), lora_config(target_modules=["q_proj", "up_proj"]))
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    ours = copy.deepcopy(theirs)
    lk.accelerate_peft(ours)
    calls = count_fused(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (lo, go), (lt, gt) = step(ours), step(theirs)
    assert len(calls) == 4
    assert relative_error(lo, lt) < 2e-2
    for name in gt:
        assert go[name].dtype == torch.float32 and relative_error(go[name], gt[name]) < 5e-2, name
