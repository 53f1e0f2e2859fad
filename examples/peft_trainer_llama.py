"""Fine-tune a tiny Llama with HuggingFace PEFT and Trainer, its LoRA layers on lora_kernels.

The base model is built from a ``LlamaConfig`` (random weights, nothing downloaded) and saved
as a checkpoint; PEFT adds LoRA to every attention and MLP projection; ``accelerate_peft`` makes
those layers run on lora_kernels (the fused kernels on a GPU, the reference path on a CPU) while
the model stays a PEFT model; transformers' ``Trainer`` trains it with gradient checkpointing on
a fixed set of random sequences (memorised, so the loss falls). The adapter is then saved with
``save_pretrained``, loaded onto the base checkpoint with ``PeftModel.from_pretrained``,
accelerated again, and checked to give the trained model's outputs. Seconds on a CPU::

    python examples/peft_trainer_llama.py --steps 30

The last line reads ``reload check passed`` (the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import lora_kernels as lk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example, also when imported
from train_llama_lora import TARGETS, tiny_llama  # noqa: E402


class Sequences(torch.utils.data.Dataset):
    """``n`` random token sequences (the seed fixes them), each its own label: a causal-LM task."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def checkpointing_args(training_arguments) -> dict:
    """Gradient checkpointing, non-reentrant, under the name this transformers knows.

    NOTE: transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; the old
    name still works there but warns that v6 drops it.
    """
    names = {f.name for f in dataclasses.fields(training_arguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(workdir: Path, steps: int = 30, batch: int = 4, seq: int = 32, r: int = 8, alpha: float = 16.0,
        dropout: float = 0.05, lr: float = 5e-3, seed: int = 0, log=print) -> dict:
    """Train, save, reload and compare; returns the losses and the reload check's figures."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    gpu = torch.cuda.is_available()
    # NOTE: PEFT 0.21 calls a transformers 5 method that warns of its own rename: not this example's doing
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(seed)
    base = tiny_llama()
    base.config.use_cache = False  # no KV cache under gradient checkpointing
    base.save_pretrained(workdir / "base")  # the "pretrained" checkpoint the adapter is trained on

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    report = lk.accelerate_peft(model)  # PEFT's LoRA layers now run on lora_kernels; still a PEFT model
    log(str(report).splitlines()[0])
    if report.skipped:
        raise RuntimeError(f"accelerate_peft left layers to PEFT:\n{report}")

    data = Sequences(4 * batch, seq, base.config.vocab_size, seed)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="constant", logging_steps=max(1, steps // 6), save_strategy="no",
        report_to="none", disable_tqdm=True, seed=seed, use_cpu=not gpu, bf16=gpu,
        **checkpointing_args(TrainingArguments),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    inner = model.get_base_model()
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    checkpointing = inner.is_gradient_checkpointing if checkpointing is None else checkpointing
    log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps (gradient checkpointing "
        f"{'on' if checkpointing else 'off'})")

    model.save_pretrained(workdir / "adapter")  # adapter_config.json + adapter_model.safetensors
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(workdir / "base"), workdir / "adapter")
    again = lk.accelerate_peft(reloaded)
    reloaded.to(model.device)

    model.eval()
    reloaded.eval()
    ids = data.ids.to(model.device)
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
        loaded = reloaded(input_ids=ids).logits.float()
        with reloaded.disable_adapter():
            plain = reloaded(input_ids=ids).logits.float()
        again.undo()  # PEFT's own forward, for comparison
        peft_logits = reloaded(input_ids=ids).logits.float()
    result = {
        "losses": losses,
        "accelerated": len(report.accelerated), "reaccelerated": len(again.accelerated),
        # The reloaded adapter gives the trained model's outputs ...
        "reload_rel_err": relative_error(loaded, trained),
        # ... and they are the adapter's, not the base model's (a fresh LoRA B is zero).
        "adapter_effect": relative_error(plain, trained),
        # lora_kernels computes what PEFT's own forward computes.
        "peft_rel_err": relative_error(trained, peft_logits),
    }
    result["passed"] = (losses[-1] < losses[0] and result["reload_rel_err"] <= 1e-6
                        and result["adapter_effect"] > 1e-3 and result["reaccelerated"] == result["accelerated"]
                        and result["peft_rel_err"] <= (2e-2 if gpu else 1e-5))
    log(f"reloaded adapter: relative difference to the trained model's logits {result['reload_rel_err']:.2e}; "
        f"adapter disabled: {result['adapter_effect']:.2e}; {result['reaccelerated']} layer(s) accelerated again; "
        f"against PEFT's own forward: {result['peft_rel_err']:.2e}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temporary dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (default 1: on a busy machine more threads wait on each other)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.out or Path(tmp), steps=args.steps, r=args.rank)
    print("reload check passed" if result["passed"] else f"reload check FAILED: {result}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
