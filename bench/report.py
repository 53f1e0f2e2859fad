"""Turn one run's results into terminal tables, Markdown, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .providers import DESCRIPTIONS
from .shapes import MERGE_MODES, MODES
from .targets import describe

CPU_WARNING = (
    "CPU RUN (no GPU here): each table says what it measures. Host overhead (Triton launches stubbed) and "
    "activation bytes saved for backward are measured on this CPU (the bytes are exact and the same on a GPU "
    "for these shapes and dtype); the GPU figures are the cost model's predictions, in a table of their own. "
    "No number here is a GPU time."
)
CPU_TIMINGS_WARNING = (
    "CPU timings (--cpu-timings): PyTorch's CPU kernels on small shapes, median [p20-p80] of "
    "time.perf_counter; they say nothing about GPU performance or the H100 targets."
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


def _ms_text(row: dict) -> str:
    return f"{row['ms']:.4f}"


def _ms_spread_text(row: dict) -> str:
    """The median and, where measured, its spread: ``0.1234 [0.1200-0.1300]`` (p20-p80)."""
    if row.get("p20") is None:
        return _ms_text(row)
    return f"{row['ms']:.4f} [{row['p20']:.4f}-{row['p80']:.4f}]"


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
            ms_rows.append(_case_cells(first(k), mode) + [_cell(r.get(p), _ms_text if on_gpu else _ms_spread_text)
                                                          for p in present])
            ratio = [_cell(r.get(p), _ratio_text) for p in present]
            if on_gpu:
                ratio.append(_targets_cell(by_row.get((mode, k), [])))
            ratio_rows.append(_case_cells(first(k), mode) + ratio)
        if any("predicted_ratio" in v for k in keys for v in cases[k].values()):
            notes = [prediction_note(model_device, cases, keys)] + notes
        floor = "one copy of W0 (base)" if mode in MERGE_MODES else "base"
        where = "" if on_gpu else ", CPU"
        spread = "median ms" if on_gpu else "median ms [p20-p80]"
        out.append(Table(f"[{mode}] {MODE_TITLES[mode]}{where}: {spread}", _case_headers(mode) + present, ms_rows))
        out.append(Table(f"[{mode}] × {floor}{where} (lower is better)",
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


def _kib(b: int) -> str:
    return f"{b / 2**10:.2f}"


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def _skip_notes(cells_by_row: list[dict[str, dict]]) -> list[str]:
    seen: dict[tuple[str, str], None] = {}
    for cells in cells_by_row:
        for name, c in cells.items():
            if c.get("status") == "skipped":
                seen[(name, c["reason"])] = None
    return [f"{name} skipped: {reason}" for name, reason in seen]


def _saved_cell(c: dict, fmt, ref: Optional[int]) -> str:
    if c.get("status") == "skipped":
        return "skip"
    text = fmt(c["saved_bytes"])
    return f"{text} ({c['saved_bytes'] / ref:.2f})" if ref else text


def check_table(check: dict) -> Table:
    title = "[check] the Triton kernels run for real under Triton's CPU interpreter (correctness, not speed)"
    if check.get("skipped"):
        return Table(title, ["status"], [["skip"]], [f"triton skipped: {check['skipped']}"])
    ok = check["rel_err"] <= check["tolerance"] and check["saved_real"] == check["saved_stubbed"]
    return Table(title, ["case", "dtype", "rel err of y, dx, dA, dB vs fp32", "bound", "saved bytes, run",
                         "saved bytes, launches stubbed", "status"],
                 [[check["case"], check["dtype"], f"{check['rel_err']:.2e}", f"{check['tolerance']:.0e}",
                   str(check["saved_real"]), str(check["saved_stubbed"]), "ok" if ok else "FAILED"]],
                 [f"{check['seconds']} s; the saved-bytes tables below count the Triton path with its launches "
                  "stubbed: which tensors are saved is the host code's choice, not the kernels' (equal here)"])


def saved_layer_table(saved: dict) -> Table:
    providers = saved["providers"]
    rows = []
    for r in saved["rows"]:
        rows.append(_case_cells(r, "memory") + [_kib(r["bound_bytes"])]
                    + [_saved_cell(r["providers"][p], _kib, r["bound_bytes"]) for p in providers])
    notes = [f"{saved['dtype']}; bytes of the distinct storages autograd keeps for backward during one forward "
             "(saved_tensors_hooks; views of one storage once; parameters and 0-dim tensors excluded); "
             "(n) = saved / (x + x·Aᵀ). Exact: a GPU run keeps the same bytes for the same shapes and dtype",
             "triton: the package's Triton path with its launches stubbed (see [check]); F.dropout counted as on a "
             "GPU (native_dropout, a bool mask: the CPU's own saves its mask in x's dtype)"]
    return Table(f"[saved] activation memory saved for backward per layer, KiB (× x + x·Aᵀ): measured, "
                 f"transfers to a GPU unchanged", _case_headers("memory") + ["x+xa KiB"] + providers, rows,
                 notes + _skip_notes([r["providers"] for r in saved["rows"]]))


def saved_step_table(step: dict) -> Table:
    m, providers = step["model"], step["providers"]
    rows = []
    for r in step["rows"]:
        frozen = r["providers"].get("frozen", {}).get("saved_bytes")
        cells = []
        for p in providers:
            c = r["providers"][p]
            if c.get("status") == "skipped":
                cells.append("skip")
            elif frozen is not None and p != "frozen":
                cells.append(f"{_mib(c['saved_bytes'])} (+{_mib(c['saved_bytes'] - frozen)})")
            else:
                cells.append(_mib(c["saved_bytes"]))
        rows.append([f"{r['dropout']:g}"] + cells)
    title = (f"[saved] activation memory saved for backward per training step, small Llama, MiB "
             f"(+ adapter's extra over frozen): measured, transfers to a GPU unchanged")
    notes = [f"LlamaForCausalLM hidden {m['hidden']}, {m['layers']} layers, MLP {m['intermediate']}, vocab "
             f"{m['vocab']}, batch {m['batch']} × {m['seq']} tokens, {m['dtype']}; LoRA r={step['r']} on "
             "q,k,v,o,gate,up,down; one forward with the loss; counted as in the per-layer table, "
             "every parameter excluded",
             "frozen: no adapter, embedding output requiring grad (backward through every layer); peft_accel and "
             "lora_kernels: the Triton path, launches stubbed; F.dropout counted as on a GPU"]
    return Table(title, ["p"] + providers, rows, notes + _skip_notes([r["providers"] for r in step["rows"]]))


def host_call_table(host: dict) -> Table:
    sh = host["shape"]
    title = (f"[host] host time per call, µs (CPU; M={sh['M']} K={sh['K']} N={sh['N']} r={sh['r']} {sh['dtype']}; "
             f"median of {host['repeats']} rounds of {host['reps']} calls)")
    if host.get("skipped"):
        return Table(title, ["status"], [["skip"]], [f"skipped: {host['skipped']}"])
    rows_in = host["rows"]
    lin = rows_in.get("nn.Linear (frozen)", {}).get("fwd_bwd")
    peft = rows_in.get("PEFT lora.Linear", {}).get("fwd_bwd")
    rows = []
    for name, t in rows_in.items():
        rows.append([name, f"{t['fwd']:.1f}", f"{t['fwd_bwd']:.1f}",
                     f"{t['fwd_bwd'] / lin:.2f}" if lin else "—", f"{t['fwd_bwd'] / peft:.2f}" if peft else "—"])
    notes = ["lora_kernels: LoRALinear(backend='triton'), forward plan fused, every Triton launch stubbed: the "
             "package's own host path (module, checks, autograd, launcher); nn.Linear and PEFT compute their tiny "
             "GEMMs on the CPU (bench/host_overhead.py)",
             "+ Triton launch: the same with Triton's launch path run as on a GPU (binding, specialization key, "
             "cache lookup; compiling and the driver's launch left out)",
             "targets (GPU, host side): ours ≤ 3× nn.Linear and ≤ PEFT's layer, fwd+bwd"]
    return Table(title, ["provider", "fwd", "fwd+bwd", "fwd+bwd × nn.Linear", "fwd+bwd × PEFT"], rows, notes)


def host_step_table(host: dict) -> Table:
    m = host["model"]
    title = (f"[host] host time per training step, ms (CPU; tiny Llama; median of {host['steps']} steps, "
             "providers alternating)")
    rows_in = host["rows"]
    frozen = rows_in.get("frozen")
    rows = [[name, f"{us / 1e3:.2f}", f"{us / frozen:.2f}" if frozen else "—"] for name, us in rows_in.items()]
    notes = [f"LlamaForCausalLM hidden {m['hidden']}, {m['layers']} layers, batch {m['batch']} × {m['seq']} tokens, "
             f"{m['dtype']}; LoRA r={host['r']}, dropout {host['dropout']:g} on q,k,v,o,gate,up,down; a step is "
             "forward + backward (+ AdamW over the adapter) (bench/train_step.py)",
             f"peft_accel, lora_kernels: the Triton path with its {host['launches']} launches stubbed (the LoRA "
             "layers' base GEMMs run inside them, so ours computes less than frozen and PEFT, which compute "
             "every GEMM on the CPU)"]
    if host.get("skipped"):
        notes.append(f"peft_accel, lora_kernels skipped: {host['skipped']}")
    return Table(title, ["provider", "step ms", "× frozen"], rows, notes)


def predicted_table(pred: dict) -> Table:
    by_case: dict[str, dict[str, dict]] = {}
    for r in pred["rows"]:
        by_case.setdefault(r["case"], {})[r["mode"]] = r
    names = list(pred["rows"][0]["ratios"]) if pred["rows"] else []
    modes = list(dict.fromkeys(r["mode"] for r in pred["rows"]))
    rows = []
    for per_mode in by_case.values():
        first = next(iter(per_mode.values()))
        rows.append(_case_cells(first, "fwd") + [first["plan"]]
                    + [f"{per_mode[m]['ratios'][n]:.3f}" for n in names for m in modes]
                    + [f"{per_mode[m]['frozen_ms']:.4f}" for m in modes])
    return Table(f"[predicted] the cost model's predictions for an {pred['device']} (not measured), "
                 f"{pred['dtype']}, × frozen layer",
                 _case_headers("fwd") + ["triton fwd plan"] + [f"{n} {m}" for n in names for m in modes]
                 + [f"frozen {m} ms" for m in modes], rows,
                 ["lora_kernels/cost_model.py (docs/cost_model.md): FLOPs, HBM bytes, Philox work and launch gaps "
                  "at an H100's achievable rates, for the shapes a GPU run of this command measures; frozen ms: the "
                  "floor's predicted time. No GPU run has checked these yet (docs/gpu_results.md)"])


def cpu_tables(sections: dict) -> list[Table]:
    """The tables of a CPU run (bench/cpu_tables.py), in the order of its sections."""
    builders = {"check": check_table, "saved_layer": saved_layer_table, "saved_step": saved_step_table,
                "host_call": host_call_table, "host_step": host_step_table, "predicted": predicted_table}
    return [build(sections[name]) for name, build in builders.items() if name in sections]


def header_lines(env: dict, config: dict) -> list[str]:
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores)"
    lines = [
        f"Device: {where}; dtype {config['dtype']}; torch {env['torch']}, triton {env['triton']}, "
        f"peft {env['peft']}; commit {(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}; "
        f"{env['date']}",
    ]
    if env.get("gpu") is not None or config.get("modes"):
        lines.append(f"Timing: {config['timer']}; warm-up {config['warmup_ms']} ms, repetitions {config['rep_ms']} "
                     "ms; median of repetitions; ratios against the base layer measured in this process.")
    if env.get("gpu") is None:
        lines.insert(0, CPU_WARNING)
        if config.get("modes"):
            lines.append(CPU_TIMINGS_WARNING)
    return lines


def render_text(env: dict, config: dict, results: list[dict], checks: list[dict], providers: list[str],
                cpu: Optional[dict] = None) -> str:
    on_gpu = env.get("gpu") is not None
    parts = ["\n".join(header_lines(env, config))]
    parts += [t.text() for t in cpu_tables(cpu or {})]
    parts += [t.text() for t in tables(results, checks, providers, on_gpu, config.get("model_device", ""))]
    if on_gpu:
        parts.append("\n".join(target_summary(checks)) or "Targets: none applied to these shapes.")
    else:
        parts.append("Targets: not evaluated (they are H100 targets; this is a CPU run).")
    return "\n\n".join(parts)


def render_markdown(env: dict, config: dict, results: list[dict], checks: list[dict], providers: list[str],
                    cpu: Optional[dict] = None) -> str:
    on_gpu = env.get("gpu") is not None
    lines = ["# LoRA linear benchmark", ""]
    for h in header_lines(env, config):
        lines += [f"> {h}" if h in (CPU_WARNING, CPU_TIMINGS_WARNING) else h, ""]
    if results:
        lines += ["Providers:", ""] + [f"- `{p}`: {DESCRIPTIONS[p]}" for p in providers] + [""]
    for t in cpu_tables(cpu or {}) + tables(results, checks, providers, on_gpu, config.get("model_device", "")):
        lines += [t.markdown(), ""]
    if on_gpu:
        lines += ["## Targets", "", "```", *(target_summary(checks) or ["none applied"]), "```", ""]
    return "\n".join(lines)


def write_json(path: Path, env: dict, config: dict, results: list[dict], checks: list[dict],
               cpu: Optional[dict] = None) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    doc = {"env": env, "config": config, "providers": DESCRIPTIONS, "results": results, "targets": checks}
    if cpu is not None:
        doc["cpu"] = cpu
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
