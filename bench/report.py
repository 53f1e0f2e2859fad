"""Turn one run's results into terminal tables, Markdown, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .providers import DESCRIPTIONS
from .shapes import MERGE_MODES, MODES
from .targets import describe

CPU_WARNING = (
    "CPU SMOKE RUN: small shapes timed with time.perf_counter on the CPU. These numbers say "
    "nothing about GPU performance or the H100 targets; they only show that the suite works."
)
MODE_TITLES = {
    "fwd": "forward",
    "fwd+bwd": "forward + backward (grads of x, A, B; W0 frozen)",
    "memory": "activation memory saved for backward, and peak memory of forward + backward",
    "merge": "merge (W0 += s·B A), ratio to one copy of W0",
    "unmerge": "unmerge (W0 -= s·B A), ratio to one copy of W0",
}

PLOT_TITLES = {"memory": "activation memory saved for backward, × (x + x·Aᵀ)"}


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = lambda cells: "  ".join(c.rjust(w) if i >= 1 else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        out = [self.title, line(self.headers), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        out = [f"#### {self.title}", "", "| " + " | ".join(map(esc, self.headers)) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"]
        out += ["| " + " | ".join(map(esc, r)) + " |" for r in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)


def _group(results: list[dict], mode: str) -> tuple[list[str], dict[str, dict[str, dict]]]:
    cases: dict[str, dict[str, dict]] = {}
    for row in results:
        if row["mode"] == mode:
            cases.setdefault(row["case"], {})[row["provider"]] = row
    return list(cases), cases


def _case_cells(row: dict, mode: str) -> list[str]:
    cells = [row["layer"], f"{row['in']}→{row['out']}"]
    if mode not in MERGE_MODES:
        cells.append(str(row["tokens"]))
    cells.append(str(row["r"]))
    if mode not in MERGE_MODES:
        cells.append(f"{row['dropout']:g}")
    return cells


def _case_headers(mode: str) -> list[str]:
    return ["layer", "K→N", "r"] if mode in MERGE_MODES else ["layer", "K→N", "tokens", "r", "p"]


def _cell(row: dict | None, fmt) -> str:
    """``fmt(row)`` for a measured row; "skip" / "ERROR" otherwise; "!" marks a wrong output."""
    if row is None:
        return ""
    if row["status"] == "skipped":
        return "skip"
    if row["status"] == "error":
        return "ERROR"
    try:
        value = fmt(row)
    except (KeyError, TypeError):
        value = "?"
    return value + ("!" if row["status"] == "wrong" else "")


def _notes(cases: dict[str, dict[str, dict]], providers: list[str]) -> list[str]:
    seen: dict[tuple[str, str, str], None] = {}
    for rows in cases.values():
        for name in providers:
            row = rows.get(name)
            if row and row["status"] != "ok":
                seen[(name, row["status"], row.get("reason", ""))] = None
    label = {"skipped": "skipped", "error": "ERROR", "wrong": "WRONG OUTPUT (marked !)"}
    return [f"{name} {label[status]}: {reason}" for name, status, reason in seen]


def _targets_cell(checks: list[dict]) -> str:
    if not checks:
        return "—"
    missed = [c for c in checks if not c["met"]]
    if not missed:
        return f"met {len(checks)}/{len(checks)}"
    return f"MISSED {len(missed)}/{len(checks)}: " + "; ".join(describe(c) for c in missed)


def _ratio_text(row: dict) -> str:
    """The measured ratio, and the cost model's prediction in parentheses where it has one."""
    text = f"{row['ratio']:.3f}"
    if row.get("predicted_ratio") is not None:
        text += f" ({row['predicted_ratio']:.3f})"
    return text


def prediction_note(model_device: str, cases: dict[str, dict[str, dict]], keys: list[str]) -> str:
    plans = sorted({v["predicted_plan"] for k in keys for v in cases[k].values() if v.get("predicted_plan")})
    note = (f"(n) = the cost model's predicted ratio (docs/cost_model.md) on {model_device or 'an H100'}; "
            "no (n): a provider the model does not cover")
    if plans:
        note += f"; triton's predicted forward plan: {'/'.join(plans)} (predicted_plan per row in the JSON)"
    return note


def tables(results: list[dict], checks: list[dict], providers: list[str], on_gpu: bool,
           model_device: str = "") -> list[Table]:
    out = []
    by_row: dict[tuple[str, str], list[dict]] = {}
    for c in checks:
        by_row.setdefault((c["mode"], c["case"]), []).append(c)
    for mode in MODES:
        keys, cases = _group(results, mode)
        if not keys:
            continue
        present = [p for p in providers if any(p in cases[k] for k in keys)]
        notes = _notes(cases, present)
        first = lambda k: next(iter(cases[k].values()))  # noqa: E731
        if mode == "memory":
            rows = []
            for k in keys:
                r = cases[k]
                bound = next((v["bound_bytes"] for v in r.values() if "bound_bytes" in v), None)
                rows.append(_case_cells(first(k), mode) + [f"{bound / 2**20:.2f}" if bound else "?"] + [
                    _cell(r.get(p), lambda v: f"{v['saved_bytes'] / 2**20:.2f} ({v['saved_ratio']:.2f})")
                    for p in present])
            saved_notes = ["saved = distinct tensors autograd keeps for backward, parameters excluded; "
                           "(n) = saved / (x + x·Aᵀ)"]
            targets = [_targets_cell(by_row.get((mode, k), [])) for k in keys] if on_gpu else None
            if targets:
                rows = [r + [t] for r, t in zip(rows, targets)]
            out.append(Table(f"[{mode}] saved for backward, MiB (× x + x·Aᵀ)",
                             _case_headers(mode) + ["x+xa MiB"] + present + (["targets"] if targets else []),
                             rows, saved_notes + notes))
            if on_gpu:
                rows = []
                for k in keys:
                    r = cases[k]
                    rows.append(_case_cells(first(k), mode) + [
                        _cell(r.get(p), lambda v: f"{v['peak_bytes'] / 2**20:.1f} ({v['peak_ratio']:.2f})")
                        for p in present])
                out.append(Table(f"[{mode}] peak memory of forward+backward, MiB (× base)",
                                 _case_headers(mode) + present, rows,
                                 ["peak = torch.cuda.max_memory_allocated growth during one forward+backward"]))
            continue
        ms_rows, ratio_rows = [], []
        for k in keys:
            r = cases[k]
            ms_rows.append(_case_cells(first(k), mode) + [
                _cell(r.get(p), lambda v: f"{v['ms']:.4f}") for p in present])
            ratio = [_cell(r.get(p), _ratio_text) for p in present]
            if on_gpu:
                ratio.append(_targets_cell(by_row.get((mode, k), [])))
            ratio_rows.append(_case_cells(first(k), mode) + ratio)
        if any("predicted_ratio" in v for k in keys for v in cases[k].values()):
            notes = [prediction_note(model_device, cases, keys)] + notes
        floor = "one copy of W0 (base)" if mode in MERGE_MODES else "base"
        out.append(Table(f"[{mode}] {MODE_TITLES[mode]}: median ms", _case_headers(mode) + present, ms_rows))
        out.append(Table(f"[{mode}] × {floor} (lower is better)",
                         _case_headers(mode) + present + (["targets"] if on_gpu else []), ratio_rows, notes))
    return out


def target_summary(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    missed = [c for c in checks if not c["met"]]
    lines = [f"Targets: {len(checks) - len(missed)}/{len(checks)} met."]
    by_target: dict[str, list[dict]] = {}
    for c in checks:
        by_target.setdefault(c["target"], []).append(c)
    for name, cs in by_target.items():
        miss = [c for c in cs if not c["met"]]
        lines.append(f"  {'ok    ' if not miss else 'MISSED'} {name}: {len(cs) - len(miss)}/{len(cs)} met")
        for c in miss:
            lines.append(f"         [{c['mode']}] {c['case']}: {describe(c)}")
    return lines


def header_lines(env: dict, config: dict) -> list[str]:
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores)"
    lines = [
        f"Device: {where}; dtype {config['dtype']}; torch {env['torch']}, triton {env['triton']}, "
        f"peft {env['peft']}; commit {(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}; "
        f"{env['date']}",
        f"Timing: {config['timer']}; warm-up {config['warmup_ms']} ms, repetitions {config['rep_ms']} ms; "
        "median of repetitions; ratios against the base layer measured in this process.",
    ]
    if env.get("gpu") is None:
        lines.insert(0, CPU_WARNING)
    return lines


def render_text(env: dict, config: dict, results: list[dict], checks: list[dict], providers: list[str]) -> str:
    on_gpu = env.get("gpu") is not None
    parts = ["\n".join(header_lines(env, config))]
    parts += [t.text() for t in tables(results, checks, providers, on_gpu, config.get("model_device", ""))]
    if on_gpu:
        parts.append("\n".join(target_summary(checks)) or "Targets: none applied to these shapes.")
    else:
        parts.append("Targets: not evaluated (they are H100 targets; this is a CPU run).")
    return "\n\n".join(parts)


def render_markdown(env: dict, config: dict, results: list[dict], checks: list[dict], providers: list[str]) -> str:
    on_gpu = env.get("gpu") is not None
    lines = ["# LoRA linear benchmark", ""]
    for h in header_lines(env, config):
        lines += [f"> {h}" if h == CPU_WARNING else h, ""]
    lines += ["Providers:", ""] + [f"- `{p}`: {DESCRIPTIONS[p]}" for p in providers] + [""]
    for t in tables(results, checks, providers, on_gpu, config.get("model_device", "")):
        lines += [t.markdown(), ""]
    if on_gpu:
        lines += ["## Targets", "", "```", *(target_summary(checks) or ["none applied"]), "```", ""]
    return "\n".join(lines)


def write_json(path: Path, env: dict, config: dict, results: list[dict], checks: list[dict]) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    doc = {"env": env, "config": config, "providers": DESCRIPTIONS, "results": results, "targets": checks}
    path.write_text(json.dumps(clean(doc), indent=1, ensure_ascii=False) + "\n")


def plot(path: Path, env: dict, config: dict, results: list[dict], providers: list[str]) -> None:
    """Grouped bars of each provider's ratio to base, one panel per mode (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for mode in MODES:
        keys, cases = _group(results, mode)
        field_ = "saved_ratio" if mode == "memory" else "ratio"
        present = [p for p in providers
                   if any(cases[k].get(p, {}).get("status") in ("ok", "wrong") for k in keys)]
        if keys and present:
            panels.append((mode, keys, cases, present, field_))
    if not panels:
        return
    most = max(len(k) * (0.22 * len(pr) + 0.3) for _, k, _, pr, _ in panels)
    width = min(40.0, max(9.0, 2.5 + most))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.6 * len(panels)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (mode, keys, cases, present, field_) in zip(axes[:, 0], panels):
        n = len(present)
        bar = 0.8 / n
        for j, p in enumerate(present):
            xs, ys = [], []
            for i, k in enumerate(keys):
                row = cases[k].get(p)
                if row and row["status"] in ("ok", "wrong") and row.get(field_) is not None:
                    xs.append(i - 0.4 + bar * (j + 0.5))
                    ys.append(row[field_])
            ax.bar(xs, ys, bar, label=p, color=colors(providers.index(p) % 10))
            if field_ == "ratio":  # the cost model's prediction: a black tick on the bar
                pred = [(i - 0.4 + bar * (j + 0.5), cases[k][p]["predicted_ratio"]) for i, k in enumerate(keys)
                        if cases[k].get(p, {}).get("predicted_ratio") is not None
                        and cases[k][p]["status"] in ("ok", "wrong")]
                if pred:
                    labelled = "predicted" in ax.get_legend_handles_labels()[1]
                    ax.scatter(*zip(*pred), marker="_", s=60, color="black", zorder=3,
                               label=None if labelled else "predicted")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace(" M=", "\nM=") for k in keys], fontsize=7)
        floor = {"memory": "× (x + x·Aᵀ) saved", "merge": "× copy of W0", "unmerge": "× copy of W0"}
        ax.set_ylabel(floor.get(mode, "× base"))
        ax.set_title(PLOT_TITLES.get(mode, MODE_TITLES[mode]), fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    where = env.get("gpu") or "CPU smoke run: numbers mean nothing for GPU targets"
    fig.suptitle(f"LoRA linear, {config['dtype']}, lower is better: {where}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
