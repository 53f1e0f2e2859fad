"""transformers: a tiny random Llama takes apply_lora on every projection, trains, and matches PEFT."""

import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

import lora_kernels as lk  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_llama_lora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_llama_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def test_apply_lora_swaps_every_projection_and_starts_equal_to_the_base():
    torch.manual_seed(0)
    model = example.tiny_llama()
    base = copy.deepcopy(model)
    lk.apply_lora(model, example.TARGETS, r=4, alpha=8)
    swapped = [n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers
    assert {n.rpartition(".")[2] for n in swapped} == set(example.TARGETS)
    assert type(model.lm_head) is torch.nn.Linear  # not a target
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)  # lora_B starts at zero
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad} == set(lk.lora_state_dict(model))


def test_example_training_loss_falls():
    losses = example.train(steps=8, batch=2, seq=16, device="cpu", log=lambda *_: None)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses


def test_bf16_autocast_with_fp32_masters_trains():
    torch.manual_seed(0)
    model = example.tiny_llama()
    lk.apply_lora(model, example.TARGETS, r=4, alpha=8, lora_dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_from_peft_on_a_llama_matches_peft():
    peft = pytest.importorskip("peft")
    from lora_kernels.peft_interop import from_peft

    torch.manual_seed(0)
    model = peft.get_peft_model(example.tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=example.TARGETS, init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 10))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out.logits.detach(), grads

    logits_ref, grads_ref = run()
    from_peft(model)
    assert sum(isinstance(m, lk.LoRALinear) for m in model.modules()) == 14
    logits, grads = run()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):  # the same parameters, in the same order
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_train_step_benchmark_runs_its_tiny_config():
    spec = importlib.util.spec_from_file_location(
        "train_step", EXAMPLE.parent.parent / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    providers = "frozen,peft,peft_accel,lora_kernels" if importlib.util.find_spec("peft") else "frozen,lora_kernels"
    assert bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                       "--providers", providers]) == 0


def lora_llama(seed=0):
    torch.manual_seed(seed)
    model = lk.apply_lora(example.tiny_llama(), example.TARGETS, r=4, alpha=8, dropout=0.1)
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # as if trained
    return model.eval()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_save_pretrained_round_trips_through_from_pretrained_and_load_lora_pretrained(tmp_path, merged):
    pytest.importorskip("safetensors")
    from transformers import LlamaForCausalLM

    model = lora_llama()
    model.model.layers[0].self_attn.q_proj.scaling = 0.75  # a set_scale-like override travels too
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        if merged:
            for m in model.modules():
                if isinstance(m, lk.LoRALinear):
                    m.merge()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "lora_kernels.json").exists()
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, lk.LoRALinear) for m in loaded.modules())  # transformers alone drops them
    lk.load_lora_pretrained(loaded, tmp_path)
    layers = dict((n, m) for n, m in loaded.named_modules() if isinstance(m, lk.LoRALinear))
    assert len(layers) == 14 and all(m.merged == merged for m in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.scaling == 0.75 and q.dropout == 0.1 and q.r == 4
    for name, p in model.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p), name
        assert dict(loaded.named_parameters())[name].requires_grad == p.requires_grad, name
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_load_lora_pretrained_refuses_what_it_cannot_restore(tmp_path):
    from transformers import LlamaForCausalLM

    example.tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="lora_kernels.json is missing"):
        lk.load_lora_pretrained(example.tiny_llama(), tmp_path)
    lora_llama().save_pretrained(tmp_path / "lora")
    already = lora_llama()
    before = {n: p.clone() for n, p in already.state_dict().items()}
    with pytest.raises(ValueError, match="not the plain nn.Linear from_pretrained builds"):
        lk.load_lora_pretrained(already, tmp_path / "lora")
    assert all(torch.equal(already.state_dict()[n], v) for n, v in before.items())
    assert type(LlamaForCausalLM.from_pretrained(tmp_path / "lora").lm_head) is torch.nn.Linear


def test_disable_enable_adapters_and_peft_methods_on_an_apply_lora_model():
    model = lora_llama()
    base = example.tiny_llama()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "_extra" not in k})
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        model.disable_adapters()  # transformers' method name, on this model
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
        model.enable_adapters()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
        with lk.adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
        model.model.layers[1].mlp.up_proj.merge()
        with pytest.raises(RuntimeError, match="merged, unmerge\\(\\) them first.*layers.1.mlp.up_proj"):
            model.disable_adapters()
        assert all(m.adapter_enabled for m in model.modules() if isinstance(m, lk.LoRALinear))
    for method in ("add_adapter", "load_adapter", "set_adapter"):
        with pytest.raises(RuntimeError, match="accelerate_peft"):
            getattr(model, method)("x")


def test_second_apply_lora_says_the_layer_already_has_an_adapter():
    model = lora_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="already have an adapter.*layers.0.self_attn.q_proj"):
        lk.apply_lora(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already have an adapter"):
        lk.apply_lora(model, r".*proj.*", r=2)  # the factors inside a LoRALinear are no targets either
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_merge_and_unload_and_print_trainable_parameters(capsys):
    model = lora_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    trainable, total = lk.print_trainable_parameters(model)
    assert trainable == sum(v.numel() for v in lk.lora_state_dict(model).values())
    assert total == sum(p.numel() for p in model.parameters())
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        expected = model(ids).logits
        plain = lk.merge_and_unload(model)
        assert not any(isinstance(m, lk.LoRALinear) for m in plain.modules())
        assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert plain.model.layers[0].self_attn.q_proj.weight is q_weight  # merged in place, not copied
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert "save_pretrained" not in vars(plain)  # a plain transformers model again
    with pytest.raises(ValueError, match="no LoRALinear layer"):
        lk.merge_and_unload(plain)
