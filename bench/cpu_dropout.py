"""CPU training step with dropout: lora_kernels' reference path against PEFT.

    python bench/cpu_dropout.py                       # 256→688, 2048 tokens, r 8, p 0.05, fp32
    python bench/cpu_dropout.py --tokens 512 --threads 1

On the CPU ``lora_kernels`` runs its reference path, whose dropout mask is the counter-based
Philox-4x32-10 mask of every backend (bit for bit), regenerated in backward instead of stored;
PEFT draws ``nn.Dropout``'s mask from PyTorch's generator and keeps it. Times forward +
backward (grads of x, A, B) and, apart, the mask alone; where the extension is built, the
reference path's mask is timed both compiled (csrc/cpu/dropout.cpp) and with PyTorch ops. Providers are measured in alternation,
round after round, and each one's median round is reported, so a machine whose load changes
during the run biases no provider. A comparison, not a test: see docs/compatibility.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference  # noqa: E402


def build(args):
    torch.manual_seed(0)
    base = nn.Linear(args.in_features, args.out_features)
    ours = lk.LoRALinear.from_linear(base, r=args.r, alpha=2 * args.r, dropout=args.dropout, backend="reference")
    nn.init.normal_(ours.lora_B.weight)
    providers = {"lora_kernels": ours}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft is not installed: timing lora_kernels alone")
    else:
        wrapper = nn.Sequential()
        wrapper.add_module("proj", nn.Linear(args.in_features, args.out_features))
        wrapper.proj.load_state_dict(base.state_dict())
        model = get_peft_model(wrapper, LoraConfig(target_modules=["proj"], r=args.r, lora_alpha=2 * args.r,
                                                   lora_dropout=args.dropout))
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
            layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        layer.train()
        providers["peft"] = layer
    return providers


def train_step(layer, x):
    def run():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).square().mean().backward()
    return run


def with_torch_mask(fn):
    """``fn`` with the reference path's mask computed by PyTorch ops (as where the extension is not built)."""
    def run():
        reference.COMPILED_MASK = False
        try:
            fn()
        finally:
            reference.COMPILED_MASK = True
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench/cpu_dropout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="in_features", type=int, default=256)
    p.add_argument("--out", dest="out_features", type=int, default=688)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5, help="calls per provider per round")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    M, K = x.shape
    cases = {}
    for name, layer in build(args).items():
        if name == "lora_kernels" and reference.COMPILED_MASK:
            # Both masks of the reference path, in the same rounds: the compiled one and the torch ops.
            cases["fwd+bwd lora_kernels"] = train_step(layer, x)
            cases["fwd+bwd lora_kernels, torch mask"] = with_torch_mask(train_step(layer, x))
        else:
            cases[f"fwd+bwd {name}"] = train_step(layer, x)
    if reference.COMPILED_MASK:
        cases["mask: Philox, compiled"] = lambda: reference.dropout_keep_mask(M, K, args.dropout, 12345)
    cases["mask: Philox, torch ops"] = lambda: reference.keep_mask_torch(M, K, args.dropout, 12345)
    cases["mask: bernoulli (nn.Dropout)"] = lambda: torch.empty(M, K).bernoulli_(1 - args.dropout)

    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
    print(f"{args.in_features}→{args.out_features}, {args.tokens} tokens, r {args.r}, dropout {args.dropout}, fp32, "
          f"{args.threads} thread(s), torch {torch.__version__}; median of {args.rounds} alternating rounds")
    for name, ts in times.items():
        print(f"  {name:34s} {statistics.median(ts):8.2f} ms   (min {min(ts):.2f})")
    if "fwd+bwd peft" in times:
        for name in ("lora_kernels", "lora_kernels, torch mask"):
            if f"fwd+bwd {name}" in times:
                ratio = statistics.median(times[f"fwd+bwd {name}"]) / statistics.median(times["fwd+bwd peft"])
                print(f"  {name} / peft: {ratio:.2f}x")


if __name__ == "__main__":
    main()
