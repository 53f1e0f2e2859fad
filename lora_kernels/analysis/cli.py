"""``python -m lora_kernels.analysis``: the Section 7 analyses of saved adapters, as a report folder."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Optional, Sequence

import torch

from .adapters import BaseWeights, load_adapter, pair_layers
from .core import FACTORS
from .report import amplification_table, similarity_table, write_report

_DESCRIPTION = """\
Analyse saved LoRA adapters as in Section 7 of the LoRA paper and write a report
(report.md, report.json, plots/*.png) into --output.

  one adapter + --base   amplification (Table 7): ‖UᵀWVᵀ‖_F for the top-r directions
                         of ΔW, of W and of random ones, ‖W‖_F, ‖ΔW‖_F and
                         ‖ΔW‖_F / ‖UᵀWVᵀ‖_F per layer
  two adapters           subspace similarity φ(i, j) per layer (Figures 3-4), with a
                         heat map per layer; with --base, amplification of both too

An adapter is this package's state dict (lora_state_dict, saved with safetensors or
torch.save) or a PEFT adapter folder / adapter_model.safetensors; layers of the two
adapters pair up by module path (PEFT's 'base_model.model.' prefix is ignored).
Base weights: any state dict (file or folder of shards) with '<path>.weight' keys.
"""

_EPILOG = """\
examples:
  python -m lora_kernels.analysis run_r8/ run_r64/ -o sim_r8_r64
  python -m lora_kernels.analysis run_r8/adapter_model.safetensors --base llama/ -o amp_r8
  python -m lora_kernels.analysis a.pt b.pt --factors A --layers 'q_proj|v_proj' -o out

factors (which singular vectors are compared):
""" + "\n".join(f"  {k:7s} {v}" for k, v in FACTORS.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_kernels.analysis",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="one or two adapters: .safetensors / .pt / .bin file, or a PEFT output folder")
    p.add_argument("-o", "--output", default="adapter_analysis", help="report folder (default: %(default)s)")
    p.add_argument("--base", metavar="PATH",
                   help="base-model state dict (file or folder) for the amplification analysis")
    p.add_argument("--factors", default="A,B,dW_in,dW_out",
                   help="comma-separated factors for subspace similarity, from: " + ", ".join(FACTORS)
                   + " (default: %(default)s)")
    p.add_argument("--layers", metavar="REGEX", help="analyse only layers whose path matches (re.search)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--alpha", type=float,
                       help="lora_alpha: scaling = alpha/r per layer (default: adapter_config.json, else scaling 1)")
    scale.add_argument("--scaling", type=float, help="one scaling s for every layer (ΔW = s·B·A)")
    p.add_argument("--use-rslora", action="store_true", help="with --alpha: scaling = alpha/sqrt(r)")
    p.add_argument("--adapter-name", help="pick this adapter when keys hold several (lora_A.<name>.weight)")
    p.add_argument("--device", default="auto", help="torch device, or 'auto' (CUDA if available) (default: %(default)s)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="compute precision (default: %(default)s)")
    p.add_argument("--weight-svd", choices=("exact", "lowrank"), default="exact",
                   help="top-r singular values of W: exact svdvals or randomized svd_lowrank (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: %(default)s)")
    p.add_argument("--max-table", type=int, default=8,
                   help="largest i, j of the φ grids printed in report.md (JSON has all) (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the heat maps (matplotlib not needed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.adapters) > 2:
        parser.error("give one adapter (amplification, with --base) or two (subspace similarity)")
    if len(args.adapters) == 1 and not args.base:
        parser.error("one adapter: the amplification analysis needs the base weights (--base PATH); "
                     "give a second adapter for subspace similarity")
    factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    unknown = [f for f in factors if f not in FACTORS]
    if unknown or not factors:
        parser.error(f"--factors: unknown {unknown}; choose from {', '.join(FACTORS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    keep = re.compile(args.layers).search if args.layers else (lambda _: True)

    started = time.perf_counter()
    adapters = [load_adapter(a, args.adapter_name, args.alpha, args.scaling, args.use_rslora)
                for a in args.adapters]
    for a in adapters:
        a.layers = {k: v for k, v in a.layers.items() if keep(k)}
        if not a.layers:
            parser.error(f"{a.source}: no LoRA layer left to analyse" + (" after --layers" if args.layers else ""))
    report = {
        "adapters": [{"source": a.source, "layers": list(a.layers), "scaling": a.scaling_note,
                      "skipped": a.skipped} for a in adapters],
        "base": args.base,
        "settings": {"device": str(device), "dtype": args.dtype, "seed": args.seed, "weight_svd": args.weight_svd},
    }
    if len(adapters) == 2:
        pairs, alone1, alone2 = pair_layers(adapters[0].layers, adapters[1].layers)
        if not pairs:
            parser.error("the two adapters share no layer (compare their key names)")
        report["similarity"] = {
            "factors": factors,
            "unpaired_1": alone1,
            "unpaired_2": alone2,
            "layers": similarity_table(adapters[0], adapters[1], pairs, factors, device, dtype),
        }
    if args.base:
        base = BaseWeights(args.base)
        report["amplification"] = [
            {"adapter": n + 1, "layers": amplification_table(a, base, device, dtype, args.seed, args.weight_svd)}
            for n, a in enumerate(adapters)
        ]
        found = sum("amplification" in r for amp in report["amplification"] for r in amp["layers"])
        if not found:
            parser.error(f"no base weight in {args.base} matches an adapted layer")
    report["settings"]["seconds"] = round(time.perf_counter() - started, 3)
    written = write_report(args.output, report, max_table=args.max_table, plots=not args.no_plots)
    print(f"wrote {len(written)} files to {args.output}: report.md, report.json"
          + (f", {len(written) - 2} plots" if len(written) > 2 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
