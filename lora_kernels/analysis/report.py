"""Per-layer results of the Section 7 analyses, and the report written from them.

``similarity_table`` and ``amplification_table`` return JSON-ready lists of
per-layer records; ``write_report`` turns them into ``report.json``,
``report.md`` and, for similarity, one heat map of ``phi`` per layer under
``plots/``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Optional

import torch

from .adapters import Adapter, BaseWeights
from .core import FACTORS, adapter_similarities, amplification, random_subspace_similarity

# Stacked factors of one batch stay under this many elements (per tensor).
_BATCH_ELEMENTS = 1 << 26


def _round(x: float, digits: int = 6) -> Optional[float]:
    # JSON has no inf / nan: a non-finite value (e.g. a zero base weight) is written as null.
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _grid(t: torch.Tensor) -> list[list[float]]:
    return [[_round(v) for v in row] for row in t.tolist()]


def _layer_label(path: str) -> str:
    return path or "(root)"


def similarity_table(
    adapter1: Adapter,
    adapter2: Adapter,
    pairs: list[tuple[str, str]],
    factors: list[str],
    device: torch.device,
    dtype: torch.dtype,
) -> list[dict]:
    """``phi`` grids for every paired layer and factor.

    Layers with the same factor shapes are stacked and go through one batched
    SVD per factor and adapter (chunked to bound memory).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, (p1, p2) in enumerate(pairs):
        l1, l2 = adapter1.layers[p1], adapter2.layers[p2]
        groups[(l1.lora_A.shape, l1.lora_B.shape, l2.lora_A.shape, l2.lora_B.shape)].append(n)
    records: list[Optional[dict]] = [None] * len(pairs)
    for shapes, members in groups.items():
        per_layer = max(math.prod(s) for s in shapes)
        chunk = max(1, _BATCH_ELEMENTS // per_layer)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            layers1 = [adapter1.layers[pairs[n][0]] for n in idx]
            layers2 = [adapter2.layers[pairs[n][1]] for n in idx]

            def stack(layers, attr):
                return torch.stack([getattr(l, attr) for l in layers]).to(device)

            ab1 = (stack(layers1, "lora_A"), stack(layers1, "lora_B"))
            ab2 = (stack(layers2, "lora_A"), stack(layers2, "lora_B"))
            zero1 = (ab1[1].flatten(1) == 0).all(1).tolist()
            zero2 = (ab2[1].flatten(1) == 0).all(1).tolist()
            grids = {f: g.cpu() for f, g in adapter_similarities(ab1, ab2, factors, dtype).items()}
            for b, n in enumerate(idx):
                l1, l2 = layers1[b], layers2[b]
                d_out, d_in = l1.lora_B.shape[0], l1.lora_A.shape[1]
                rec = {
                    "layer": pairs[n][0],
                    "layer_2": pairs[n][1],
                    "r_1": l1.r,
                    "r_2": l2.r,
                    "d_out": d_out,
                    "d_in": d_in,
                    "notes": [],
                }
                if zero1[b] or zero2[b]:
                    which = " and ".join(w for w, z in (("first", zero1[b]), ("second", zero2[b])) if z)
                    rec["notes"].append(
                        f"lora_B is zero in the {which} adapter (untrained?): B and dW directions are arbitrary"
                    )
                rec["factors"] = {}
                for f in factors:
                    phi = grids[f][b]
                    dim = d_in if f in ("A", "dW_in") else d_out
                    k1, k2 = phi.shape
                    rand = random_subspace_similarity(k1, k2, dim)
                    k = min(k1, k2)
                    rec["factors"][f] = {
                        "space_dim": dim,
                        "phi_1_1": _round(phi[0, 0].item()),
                        "phi_diag": [_round(v) for v in phi.diagonal()[:k].tolist()],
                        "phi_mean": _round(phi.mean().item()),
                        "random_phi_mean": _round(rand.mean().item()),
                        "phi": _grid(phi),
                    }
                records[n] = rec
    return records


def amplification_table(
    adapter: Adapter,
    base: BaseWeights,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    weight_svd: str = "exact",
    layers: Optional[list[str]] = None,
) -> list[dict]:
    """Table 7's quantities per layer of ``adapter`` against the base weights.

    One layer at a time: the work is the ``O(r d_out d_in)`` projection and
    the singular values of ``W``, and stacking full weights would only cost memory.
    """
    generator = torch.Generator().manual_seed(seed)
    records = []
    for path in layers if layers is not None else adapter.layers:
        layer = adapter.layers[path]
        d_out, d_in = layer.lora_B.shape[0], layer.lora_A.shape[1]
        W, note = base.weight(path, (d_out, d_in))
        rec = {"layer": path, "r": layer.r, "scaling": _round(layer.scaling), "d_out": d_out, "d_in": d_in,
               "notes": [note] if note else []}
        if W is not None:
            amp = amplification(
                W.to(device), layer.lora_A, layer.lora_B, layer.scaling,
                generator=generator, dtype=dtype, weight_svd=weight_svd,
            )
            w_norm = amp.weight_norm.item()
            rec.update(
                weight_norm=_round(w_norm),
                delta_norm=_round(amp.delta_norm.item()),
                projected={
                    "delta": _round(amp.projected_delta.item()),
                    "weight": _round(amp.projected_weight.item()),
                    "random": _round(amp.projected_random.item()),
                },
                random_rms=_round(w_norm * amp.k / math.sqrt(d_out * d_in)),
                amplification=_round(amp.factor.item()),
            )
            if amp.delta_norm.item() == 0:
                rec["notes"].append("ΔW is zero (untrained?): its directions are arbitrary")
        records.append(rec)
    return records


# --- writing -----------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}" if abs(x) >= 10 else f"{x:.4f}"
    return str(x)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out


def plot_name(path: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", path) or "root") + ".png"


def plot_similarity(record: dict, file: str) -> None:
    """One heat map of ``phi(i, j)`` per factor, like the paper's Figures 3–4."""
    # The Figure API draws without pyplot, so no GUI backend is touched (works headless).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    factors = list(record["factors"])
    fig = Figure(figsize=(3.4 * len(factors) + 1.0, 3.8), layout="constrained")
    axes = fig.subplots(1, len(factors), squeeze=False)
    for ax, f in zip(axes[0], factors):
        phi = record["factors"][f]["phi"]
        k1, k2 = len(phi), len(phi[0])
        im = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                       extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5), interpolation="nearest")
        ax.set_title(f"{f}  (d={record['factors'][f]['space_dim']})", fontsize=9)
        ax.set_xlabel("j (adapter 2)")
        ax.set_ylabel("i (adapter 1)")
        for axis, k in ((ax.xaxis, k2), (ax.yaxis, k1)):
            axis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=1))
    fig.colorbar(im, ax=axes[0].tolist(), label="φ(i, j)", shrink=0.85)
    fig.suptitle(_layer_label(record["layer"]), fontsize=10)
    fig.savefig(file, dpi=100)


def _similarity_markdown(records: list[dict], factors: list[str], max_table: int, plots: bool) -> list[str]:
    lines = [
        "## Subspace similarity",
        "",
        "φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j): U_i the top-i singular vectors of adapter 1, U_j the top-j of "
        "adapter 2 (1 = one span contains the other, 0 = orthogonal). Random baseline: E[φ(i, j)] = max(i, j)/d.",
        "",
    ]
    lines += [f"- `{f}`: {FACTORS[f]}" for f in factors] + [""]
    rows = []
    for rec in records:
        for f in factors:
            q = rec["factors"][f]
            rows.append([f"`{_layer_label(rec['layer'])}`", f, rec["r_1"], rec["r_2"], q["space_dim"],
                         q["phi_1_1"], q["phi_diag"][-1], q["phi_mean"], q["random_phi_mean"]])
    lines += _md_table(["layer", "factor", "r₁", "r₂", "d", "φ(1,1)", "φ(k,k), k=min(r₁,r₂)", "mean φ",
                        "mean φ, random"], rows)
    for rec in records:
        label = _layer_label(rec["layer"])
        lines += ["", f"### `{label}`" + (f" ↔ `{rec['layer_2']}`" if rec["layer_2"] != rec["layer"] else ""), ""]
        lines += [f"d_out={rec['d_out']}, d_in={rec['d_in']}, r₁={rec['r_1']}, r₂={rec['r_2']}"]
        lines += [f"> {n}" for n in rec["notes"]]
        for f in factors:
            phi = rec["factors"][f]["phi"]
            k1, k2 = min(len(phi), max_table), min(len(phi[0]), max_table)
            shown = "" if (k1, k2) == (len(phi), len(phi[0])) else f" (first {k1}×{k2}; full grid in report.json)"
            lines += ["", f"φ(i, j) for `{f}`{shown}:", ""]
            lines += _md_table(["i \\ j"] + [str(j + 1) for j in range(k2)],
                               [[i + 1] + phi[i][:k2] for i in range(k1)])
        if plots:
            lines += ["", f"![φ heat map for {label}](plots/{plot_name(rec['layer'])})"]
    return lines


def _amplification_markdown(title: str, records: list[dict]) -> list[str]:
    lines = [
        f"## Amplification: {title}",
        "",
        "‖UᵀWVᵀ‖_F with U (d_out × r), V (r × d_in) the top-r singular directions of ΔW, of W itself, or "
        "random; amplification = ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (ΔW's directions). For random directions the "
        "root-mean-square of ‖UᵀWVᵀ‖_F is ‖W‖_F·r/√(d_out·d_in).",
        "",
    ]
    rows = [
        [f"`{_layer_label(r['layer'])}`", r["r"], r["scaling"], r.get("projected", {}).get("delta"),
         r.get("projected", {}).get("weight"), r.get("projected", {}).get("random"),
         r.get("weight_norm"), r.get("delta_norm"), r.get("amplification")]
        for r in records
    ]
    lines += _md_table(["layer", "r", "scaling", "‖UᵀWVᵀ‖ (ΔW)", "‖UᵀWVᵀ‖ (W)", "‖UᵀWVᵀ‖ (random)",
                        "‖W‖_F", "‖ΔW‖_F", "amplification"], rows)
    notes = [f"- `{_layer_label(r['layer'])}`: {n}" for r in records for n in r["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return lines


def write_report(out_dir: str, report: dict, max_table: int = 8, plots: bool = True) -> list[str]:
    """Write ``report.json``, ``report.md`` and (for similarity) ``plots/*.png``; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    sim = report.get("similarity")
    if sim and plots:
        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
        for rec in sim["layers"]:
            file = os.path.join(out_dir, "plots", plot_name(rec["layer"]))
            plot_similarity(rec, file)
            written.append(file)
    lines = ["# LoRA adapter analysis", ""]
    lines += [f"- adapter {n + 1}: `{a['source']}` ({len(a['layers'])} layers; {a['scaling']})"
              for n, a in enumerate(report["adapters"])]
    if report.get("base"):
        lines.append(f"- base weights: `{report['base']}`")
    s = report["settings"]
    lines.append(f"- computed on {s['device']} in {s['dtype']}")
    for n, a in enumerate(report["adapters"]):
        if a["skipped"]:
            lines.append(f"- skipped in adapter {n + 1}: " + ", ".join(a["skipped"]))
    if sim:
        for side, names in (("1", sim["unpaired_1"]), ("2", sim["unpaired_2"])):
            if names:
                lines.append(f"- layers only in adapter {side}: " + ", ".join(f"`{x}`" for x in names))
        lines += [""] + _similarity_markdown(sim["layers"], sim["factors"], max_table, plots)
    for n, amp in enumerate(report.get("amplification", [])):
        lines += [""] + _amplification_markdown(f"adapter {amp['adapter']}", amp["layers"])
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    js = os.path.join(out_dir, "report.json")
    with open(js, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    return [md, js] + written
