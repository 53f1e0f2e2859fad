"""End-to-end training step of a Llama-style model: frozen vs PEFT LoRA (plain and accelerated) vs lora_kernels LoRA.

Each provider gets a fresh model with the same random weights (nothing is
downloaded) and runs warm-up steps, then timed steps (on the CPU the providers alternate step by
step, see ``--interleave``); it reports the median step
time and the peak memory allocated, and both as ratios to the frozen model.

- ``frozen``: every parameter frozen, but the embedding output requires grad
  (as transformers' ``enable_input_require_grads`` does), so backward still runs through every layer
  and computes activation gradients: the cost floor any adapter method pays.
  A step is forward + backward.
- ``peft``: ``peft.get_peft_model`` with LoRA on q/k/v/o/gate/up/down, factors in
  the model's dtype; a step is forward + backward + AdamW step.
- ``peft_accel``: the same PEFT model after ``lora_kernels.accelerate_peft`` (it stays a PEFT model).
- ``lora_kernels``: ``apply_lora`` on the same targets and settings.

Targets on a GPU (``--check`` exits 1 when missed by ``peft_accel`` or ``lora_kernels``):
at most 1.15× the frozen step time and at most 10% more peak memory.

    python bench/train_step.py                       # tiny config (CPU default)
    python bench/train_step.py --config llama-2048 --check --json out.json   # GPU: hidden 2048, 12 layers, 4x2048 bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIME_TARGET = 1.15
MEMORY_TARGET = 1.10


@dataclass
class Config:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    dtype: str


CONFIGS = {
    "tiny": Config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=256, batch=2, seq=64,
                   dtype="float32"),
    # The CPU case: a small Llama whose MLP layers are 256→688.
    "small": Config(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=688, vocab=1024, batch=4, seq=128,
                    dtype="float32"),
    "llama-2048": Config(hidden=2048, layers=12, heads=16, kv_heads=16, intermediate=5504, vocab=32000, batch=4,
                         seq=2048, dtype="bfloat16"),
}


def build_model(cfg: Config, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab,
                         max_position_embeddings=max(cfg.seq, 128))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, cfg.dtype))


def prepare(provider: str, model, args):
    """Adapt ``model`` for ``provider``; returns (model, optimizer or None)."""
    if provider == "frozen":
        model.requires_grad_(False)
        # as transformers' enable_input_require_grads: backward runs through every layer
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
        return model, None
    if provider in ("peft", "peft_accel"):
        import peft

        config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS)
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        if provider == "peft_accel":
            import lora_kernels as lk

            report = lk.accelerate_peft(model, backend=args.backend)
            if report.skipped:
                raise RuntimeError(f"accelerate_peft left layers to PEFT:\n{report}")
    elif provider == "lora_kernels":
        import lora_kernels as lk

        lk.apply_lora(model, TARGETS, r=args.r, alpha=args.alpha, dropout=args.dropout, backend=args.backend)
    else:
        raise ValueError(provider)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One provider's model, optimizer and inputs, warmed up; :meth:`time` runs timed steps."""

    def __init__(self, provider: str, cfg: Config, args, device: torch.device):
        self.provider, self.device, self.times = provider, device, []
        self.model, self.opt = prepare(provider, build_model(cfg, device), args)
        self.model.train()
        self.ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device,
                                 generator=torch.Generator(device=device).manual_seed(1))
        for _ in range(args.warmup):
            self.step()
        sync(device)

    def step(self):
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.loss = loss
        return loss

    def time(self, steps: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            sync(self.device)
            self.times.append(time.perf_counter() - start)

    def result(self, peak=None) -> dict:
        return dict(provider=self.provider, step_ms=1e3 * statistics.median(self.times),
                    min_ms=1e3 * min(self.times), peak_bytes=peak, loss=float(self.loss.detach()),
                    trainable=sum(p.numel() for p in self.model.parameters() if p.requires_grad))


def run_provider(provider: str, cfg: Config, args, device: torch.device) -> dict:
    """One provider alone: its model is the only one in memory, so its peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = Runner(provider, cfg, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner.time(args.steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return runner.result(peak)


def run_interleaved(providers: list[str], cfg: Config, args, device: torch.device) -> list[dict]:
    """Every provider's model at once, timed one step each in turn, round after round.

    NOTE: on a shared CPU the load drifts over seconds; timing the providers one after another
    let that drift decide the ratios. Alternating gives every provider the same conditions. Peak memory is not measured (the models share it).
    """
    runners = [Runner(p, cfg, args, device) for p in providers]
    for _ in range(args.steps):
        for runner in runners:
            runner.time(1)
    return [runner.result() for runner in runners]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: llama-2048 on a GPU, tiny on the CPU")
    parser.add_argument("--providers", default="frozen,peft,peft_accel,lora_kernels")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--backend", default="auto", help="lora_kernels backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if lora_kernels misses the targets (GPU only)")
    parser.add_argument("--interleave", choices=("auto", "yes", "no"), default="auto",
                        help="time the providers in alternating steps (default on the CPU; on a GPU each provider "
                             "runs alone, so that its peak memory is its own)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = CONFIGS[args.config or ("llama-2048" if device.type == "cuda" else "tiny")]
    providers = [p for p in args.providers.split(",") if p]
    if "peft" in providers or "peft_accel" in providers:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed: skipping the peft providers", file=sys.stderr)
            providers = [p for p in providers if p not in ("peft", "peft_accel")]

    interleave = args.interleave == "yes" or (args.interleave == "auto" and device.type != "cuda")
    if interleave:
        results = run_interleaved(providers, cfg, args, device)
    else:
        results = [run_provider(p, cfg, args, device) for p in providers]
    base = next((r for r in results if r["provider"] == "frozen"), None)
    print(f"device={device} config={asdict(cfg)} r={args.r} dropout={args.dropout} steps={args.steps} "
          f"({'providers alternating step by step' if interleave else 'one provider at a time'})")
    print(f"{'provider':<14}{'step ms':>10}{'x frozen':>10}{'peak MiB':>11}{'x frozen':>10}{'trainable':>12}")
    for r in results:
        r["time_ratio"] = r["step_ms"] / base["step_ms"] if base else None
        r["memory_ratio"] = (r["peak_bytes"] / base["peak_bytes"]) if base and r["peak_bytes"] else None
        mib = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "n/a"
        tr = f"{r['time_ratio']:.3f}" if r["time_ratio"] else "-"
        mr = f"{r['memory_ratio']:.3f}" if r["memory_ratio"] else "-"
        print(f"{r['provider']:<14}{r['step_ms']:>10.2f}{tr:>10}{mib:>11}{mr:>10}{r['trainable']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), config=asdict(cfg), args=vars(args), results=results), f, indent=2)

    ours = [r for r in results if r["provider"] in ("peft_accel", "lora_kernels")]
    if args.check and device.type == "cuda" and base and ours:
        misses = []
        for r in ours:
            if r["time_ratio"] > TIME_TARGET:
                misses.append(f"{r['provider']}: step time {r['time_ratio']:.3f}x frozen > {TIME_TARGET}x")
            if r["memory_ratio"] and r["memory_ratio"] > MEMORY_TARGET:
                misses.append(f"{r['provider']}: peak memory {r['memory_ratio']:.3f}x frozen > {MEMORY_TARGET}x")
        if misses:
            print("targets missed: " + "; ".join(misses))
            return 1
        print("targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
