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
