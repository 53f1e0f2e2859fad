"""Several adapters in one batch: MultiLoRALinear against the other ways to serve and train them.

Providers, for one linear layer (Llama-3-8B's q projection by default, rank 16) and a batch whose
sequences are spread round-robin over n adapters (n = 1, 4, 16, 64):

  multi     MultiLoRALinear(x, adapter_ids): the fused SGMV kernels, one call for the whole batch
  loop      one LoRALinear per adapter, each on its own rows (the row groups are known beforehand;
            the gather of x and the scatter into y are timed)
  peft      PEFT's mixed-batch path, model(x, adapter_names=[...]): inference only
  single    LoRALinear over the whole batch with one adapter: the yardstick

at serving sizes (one token per sequence: 64 and 256 tokens) and a training size (8192 tokens), for
the forward and forward+backward. The target: 16 adapters in one 8192-token batch, forward+backward
within 1.25x of the single-adapter layer.

  python bench/multi_lora.py            # on a GPU: triton.testing.do_bench, median ms
  python bench/multi_lora.py --check    # exit 1 if the target is missed (GPU only)

Without a GPU it runs tiny shapes with the reference backend to check that every provider works,
says so, and exits 0; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import lora_kernels as lk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lora_kernels as lk
from lora_kernels.multi_lora import MultiLoRALinear

TARGET_ADAPTERS, TARGET_TOKENS, TARGET_RATIO = 16, 8192, 1.25
GPU_DEFAULTS = dict(in_features=4096, out_features=4096, serving=(64, 256), training=8192, seq_len=128)
CPU_DEFAULTS = dict(in_features=64, out_features=48, serving=(64,), training=256, seq_len=16)


def timer(device: torch.device):
    """``time(fn, grad_to_none) -> ms``: do_bench's median on the GPU, a short median loop on the CPU."""
    if device.type == "cuda":
        import triton.testing

        def time_gpu(fn, grad_to_none):
            return triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])[0]
        return time_gpu

    def time_cpu(fn, grad_to_none):
        runs = []
        for _ in range(5):
            for t in grad_to_none:
                t.grad = None
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs[1:])
    return time_cpu


class _Proj(nn.Module):
    """The one-layer model PEFT wraps."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def build(n, K, N, r, device, dtype, backend):
    """The base layer, the adapters' factors, and each provider's module over them (same weights)."""
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    factors = [((torch.randn(r, K, device=device) / K**0.5).to(dtype),
                (torch.randn(N, r, device=device) * 0.1).to(dtype)) for _ in range(n)]
    multi = MultiLoRALinear.from_linear(base, {}, capacity=n, r_max=r, backend=backend)
    multi.check_ids = False  # the value check of the ids synchronises with the host; serving code skips it
    singles = []
    for i, (A, B) in enumerate(factors):
        multi.add_adapter(f"a{i}", r, alpha=2 * r, lora_A=A, lora_B=B)
        layer = lk.LoRALinear.from_linear(base, r=r, alpha=2 * r, backend=backend)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
        singles.append(layer)
    return base, multi, singles, factors


def build_peft(base, factors, r):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = get_peft_model(_Proj(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]), adapter_name="a0")
    for i in range(1, len(factors)):
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        for i, (A, B) in enumerate(factors):
            lora.lora_A[f"a{i}"].weight.copy_(A)
            lora.lora_B[f"a{i}"].weight.copy_(B)
    return model.eval()


def cases(args, device, dtype):
    """One row per (tokens, adapters, mode): ms per provider."""
    K, N, r = args.in_features, args.out_features, args.rank
    time_it = timer(device)
    rows = []
    for tokens, seq in [(t, 1) for t in args.serving] + [(args.training, args.seq_len)]:
        batch = tokens // seq
        for n in args.adapters:
            if n > batch:
                continue
            base, multi, singles, factors = build(n, K, N, r, device, dtype, args.backend)
            seq_adapter = torch.arange(batch) % n  # round-robin: every batch is mixed
            ids = seq_adapter.to(device)
            groups = [(seq_adapter == i).nonzero().squeeze(1).to(device) for i in range(n)]
            peft_model = build_peft(base, factors, r) if args.peft else None
            names = [f"a{i}" for i in seq_adapter.tolist()]
            for mode in args.modes:
                train = mode == "fwd+bwd"
                x = torch.randn(batch, seq, K, device=device, dtype=dtype, requires_grad=train)
                dy = torch.randn(batch, seq, N, device=device, dtype=dtype)
                params = [multi.lora_A, multi.lora_B] + [p for s in singles for p in (s.lora_A.weight, s.lora_B.weight)]
                for m in [multi, *singles]:
                    m.train(train)

                def run_multi():
                    y = multi(x, ids)
                    if train:
                        y.backward(dy)

                def run_loop():
                    y = x.new_empty(batch, seq, N)
                    for layer, rows in zip(singles, groups):
                        y = y.index_copy(0, rows, layer(x.index_select(0, rows)))
                    if train:
                        y.backward(dy)

                def run_single():
                    y = singles[0](x)
                    if train:
                        y.backward(dy)

                grads = [x] + params if train else []
                with torch.set_grad_enabled(train):
                    row = dict(tokens=tokens, adapters=n, mode=mode,
                               multi=time_it(run_multi, grads), loop=time_it(run_loop, grads),
                               single=time_it(run_single, grads), peft=None)
                    if peft_model is not None and not train:
                        row["peft"] = time_it(lambda: peft_model(x, adapter_names=names), [])
                rows.append(row)
                print(_format(row), flush=True)
            del base, multi, singles, peft_model
    return rows


def _format(row):
    cells = [f"{row['tokens']:>6} {row['adapters']:>4} {row['mode']:>8}"]
    for p in ("multi", "loop", "peft", "single"):
        cells.append(f"{row[p]:>9.3f}" if row[p] is not None else f"{'-':>9}")
    cells.append(f"{row['multi'] / row['single']:>8.2f}x")
    return " ".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    parser.add_argument("--in", dest="in_features", type=int, default=d["in_features"])
    parser.add_argument("--out", dest="out_features", type=int, default=d["out_features"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--serving", type=lambda s: [int(v) for v in s.split(",")], default=list(d["serving"]),
                        help="serving token counts (one token per sequence)")
    parser.add_argument("--training", type=int, default=d["training"], help="training token count")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence when training")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip PEFT's mixed-batch path")
    parser.add_argument("--check", action="store_true", help="exit 1 if the 16-adapter target is missed (GPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    if on_gpu:
        print(f"GPU run on {torch.cuda.get_device_name()}: {args.in_features}->{args.out_features}, r={args.rank}, "
              f"{args.dtype}, median ms (triton.testing.do_bench)")
    else:
        print(f"CPU run (no GPU): tiny shapes {args.in_features}->{args.out_features}, r={args.rank}, {args.dtype}, "
              f"backend={args.backend}: checks that every provider runs; the timings mean nothing")
    print(f"{'tokens':>6} {'n':>4} {'mode':>8} {'multi':>9} {'loop':>9} {'peft':>9} {'single':>9} {'multi/single':>9}")
    rows = cases(args, device, dtype)
    target = [r for r in rows if r["tokens"] == TARGET_TOKENS and r["adapters"] == TARGET_ADAPTERS
              and r["mode"] == "fwd+bwd"]
    if not on_gpu:
        print("target (16 adapters, 8192 tokens, fwd+bwd within 1.25x of one adapter): not assessed on the CPU")
        return 0
    if not target:
        print("target case not run (needs --training 8192 and 16 in --adapters)")
        return 0
    ratio = target[0]["multi"] / target[0]["single"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"target: 16 adapters, 8192 tokens, fwd+bwd = {ratio:.2f}x the single-adapter layer "
          f"(goal <= {TARGET_RATIO}x): {verdict}")
    return 1 if args.check and ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    raise SystemExit(main())
