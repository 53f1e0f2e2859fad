"""Run the LoRA linear benchmark suite: every provider side by side, ratios to the frozen base layer.

    python bench/run.py                 # quick default (a few minutes on an H100; < 1 min on a CPU)
    python bench/run.py --cpu-timings   # without a GPU: also time the providers' CPU kernels
    python bench/run.py --full          # every default shape: Llama-3-8B × {512, 2048, 8192} tokens × r {8, 16, 64}
    python bench/run.py --layers q,down --tokens 4096 --ranks 16 --modes fwd,fwd+bwd --providers base,triton

Without a GPU it measures what a CPU can (bench/cpu_tables.py): the package's host overhead per
call and per training step, the activation bytes saved for backward per layer and per small Llama
step, the Triton kernels under the interpreter against fp32, and, in a table of their own, the cost
model's predictions for an H100; CPU timings of the providers only with --cpu-timings.

Writes results.json, results.md and (where times were taken) results.png to --out-dir (default
bench/results/). See docs/benchmarks.md for what each provider and mode means and how times are taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():  # before Triton is imported: the CPU run executes the package's Triton path
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import env as envmod  # noqa: E402
from lora_kernels import cost_model  # noqa: E402
from bench import providers as prov  # noqa: E402
from bench import report, shapes, targets, timing  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error of a provider's output against an fp32 computation of the formula.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"providers: {', '.join(prov.PROVIDERS)} (default: all but reference on a GPU, all on the CPU)\n"
               f"modes: {', '.join(shapes.MODES)} (default: all)\n"
               f"layers (Llama-3-8B): {', '.join(f'{k}={v[0]}x{v[1]}' for k, v in shapes.LLAMA3_8B.items())}\n"
               "on the CPU the same names are 16x smaller (hidden 256)",
    )
    p.add_argument("--full", action="store_true", help="every default shape instead of the quick subset")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--layers", help="comma list of projections: q,k,v,o,gate,up,down (equal shapes run once)")
    p.add_argument("--in", dest="in_features", type=_ints, help="custom in_features (comma list, with --out)")
    p.add_argument("--out", dest="out_features", type=_ints, help="custom out_features (comma list, with --in)")
    p.add_argument("--tokens", type=_ints, help="token counts M (batch × sequence), comma list")
    p.add_argument("--ranks", type=_ints, help="LoRA ranks, comma list")
    p.add_argument("--dropout", type=_floats, help="dropout probabilities, comma list (default 0,0.1)")
    p.add_argument("--modes", default="all", help="comma list of modes, or all")
    p.add_argument("--providers", help="comma list of providers (base is always measured)")
    p.add_argument("--warmup", type=float, help="warm-up budget per measurement, ms (default 25 GPU / 5 CPU)")
    p.add_argument("--reps", type=float, help="repetition budget per measurement, ms (default 100 GPU / 40 CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU runs: torch threads (default 1: steadier times on a shared machine)")
    p.add_argument("--cpu-timings", action="store_true",
                   help="CPU runs: also time the providers on the CPU (median and p20-p80; these are CPU kernels' "
                        "times, not the GPU's; Triton under its interpreter is not timed)")
    p.add_argument("--host-reps", type=int, default=200, help="CPU runs: calls per round of the host-overhead table")
    p.add_argument("--host-repeats", type=int, default=5, help="CPU runs: rounds of the host-overhead table")
    p.add_argument("--step-steps", type=int, default=10, help="CPU runs: timed steps of the host time per step")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but CUDA is not available")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)  # do_bench records its events on the current device
    kind = "cuda" if device.type == "cuda" else "cpu"
    preset = shapes.PRESETS[(kind, "full" if args.full else "quick")]
    table = shapes.LLAMA3_8B if kind == "cuda" else shapes.LLAMA3_8B_CPU
    if args.in_features or args.out_features:
        layers = shapes.custom_layers(args.in_features or [], args.out_features or [])
    else:
        layers = shapes.layers_from_names(args.layers.split(",") if args.layers else preset.layers, table)
    gpu = device.type == "cuda"
    if args.providers:
        names = args.providers.split(",")
    elif gpu:
        names = list(prov.DEFAULT_PROVIDERS)
    elif args.cpu_timings:  # on the CPU the package runs its reference path: show it beside the others
        names = list(prov.DEFAULT_PROVIDERS) + ["reference"]
    else:
        from bench.cpu_tables import SAVED_PROVIDERS

        names = list(SAVED_PROVIDERS)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in prov.PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {', '.join(prov.PROVIDERS)}")
    if "base" not in names:
        names.insert(0, "base")  # every ratio is taken against it
    dropouts = args.dropout if args.dropout is not None else list(preset.dropouts)
    for d in dropouts:
        if not 0.0 <= d < 1.0:
            raise SystemExit(f"dropout must be in [0, 1), got {d}")
    modes = list(shapes.parse_modes(args.modes))
    if not gpu:
        # NOTE: on the CPU the saved bytes are always measured (their own table, the Triton path included);
        # the timed modes are CPU kernels' times, so only when asked for.
        timed = [m for m in modes if m != "memory"]
        if timed and args.modes != "all" and not args.cpu_timings:
            raise SystemExit(f"--modes {args.modes}: on the CPU the timed modes ({', '.join(timed)}) run only with "
                             "--cpu-timings (they time PyTorch's CPU kernels, not a GPU's)")
        modes = timed if args.cpu_timings else []
    return {
        "device": str(device),
        "dtype": args.dtype,
        "preset": "full" if args.full else "quick",
        "layers": [{"name": l.name, "in": l.in_features, "out": l.out_features} for l in layers],
        "tokens": args.tokens or list(preset.tokens),
        "ranks": args.ranks or list(preset.ranks),
        "dropouts": dropouts,
        "modes": modes,
        "providers": [n for n in prov.PROVIDERS if n in names],
        "warmup_ms": args.warmup if args.warmup is not None else (25.0 if gpu else 5.0),
        "rep_ms": args.reps if args.reps is not None else (100.0 if gpu else 40.0),
        "timer": "triton.testing.do_bench (CUDA events, L2 flushed each repetition)" if gpu
        else "time.perf_counter (CPU)",
        "lora_alpha": prov.LORA_ALPHA,
        "bias": False,
    }


class Progress:
    """tqdm when installed, else one line rewritten in place."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="meas", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(label[:60])
            self.bar.update(1)
        elif self.tty:
            sys.stderr.write(f"\r[{self.done}/{self.total}] {label[:70]:<70}")
            sys.stderr.flush()
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            sys.stderr.write(f"[{self.done}/{self.total}] {label}\n")  # a log, not a terminal
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")


def _row(case: shapes.Case, mode: str, provider: str, status: str, reason: str = "", **values) -> dict:
    return {"mode": mode, "case": case.key, "layer": case.layer.name, "in": case.layer.in_features,
            "out": case.layer.out_features, "tokens": case.tokens, "r": case.r, "dropout": case.dropout,
            "provider": provider, "status": status, "reason": reason, **values}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_grads(s: prov.Setup, x: torch.Tensor, dy: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The formula (no dropout) and its gradients in fp32: for the LoRA layer and for the base layer."""
    xf = x.detach().float().requires_grad_()
    a = s.lora_A.float().requires_grad_()
    b = s.lora_B.float().requires_grad_()
    w = s.weight.detach().float()
    y = xf @ w.t() + s.scaling * ((xf @ a.t()) @ b.t())
    dx, da, db = torch.autograd.grad(y, (xf, a, b), dy.float())
    y0 = (xf @ w.t()).detach()
    return {"lora": {"y": y.detach(), "x": dx, "A": da, "B": db},
            "base": {"y": y0, "x": (dy.float() @ w)}}


def reference_for(built: prov.Built, s: prov.Setup, ref: Optional[dict], x: torch.Tensor, dy: torch.Tensor):
    """``ref``, or for a provider computing with its own W0 (a 4-bit one, dequantised) the formula on that weight."""
    if built.weight is None or ref is None:
        return ref
    return reference_grads(dataclasses.replace(s, weight=built.weight), x, dy)


def check_provider(name: str, built: prov.Built, x: torch.Tensor, dy: Optional[torch.Tensor],
                   ref: Optional[dict]) -> float:
    """Largest relative error of the output (and, when ``dy`` is given, of dx, dA, dB) against fp32.

    Also the first call, so compilation and autotuning happen outside the timed region.
    With dropout (``ref`` None) only finiteness is checked: masks differ between providers.
    """
    x.grad = None
    y = built.forward(x)
    outs = {"y": y}
    if dy is not None:
        y.backward(dy)
        outs["x"] = x.grad
        if name != "base":
            # NOTE: the first two trainable tensors are A and B (DoRA's magnitude comes third)
            outs["A"], outs["B"] = (t.grad for t in built.trainable[:2])
    if ref is None:
        err = 0.0 if all(t is not None and torch.isfinite(t).all() for t in outs.values()) else math.inf
    else:
        want = ref["base" if name == "base" else "lora"]
        err = max(relative_error(t, want[k]) if t is not None else math.inf for k, t in outs.items())
    for t in built.trainable + [x]:
        t.grad = None
    return err


def run_activation_case(case, config, device, dtype, progress, results) -> None:
    modes = [m for m in config["modes"] if m in ("fwd", "fwd+bwd", "memory")]
    setup = prov.make_setup(case, device, dtype)
    m, k, n = case.tokens, case.layer.in_features, case.layer.out_features
    elt = torch.empty((), dtype=dtype).element_size()
    need_dy = any(md in ("fwd+bwd", "memory") for md in modes)
    count = timing.rotation_count(m * k * elt + (m * n * elt if need_dy else 0), device)
    xs = [torch.randn(m, k, device=device, dtype=dtype).requires_grad_() for _ in range(count)]
    dys = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(count)] if need_dy else []
    dy0 = dys[0] if dys else torch.randn(m, n, device=device, dtype=dtype)
    ref = reference_grads(setup, xs[0], dy0) if case.dropout == 0 else None
    bound = (m * k + m * case.r) * elt  # x + x·Aᵀ
    rot = timing.Rotation(count)
    if "compile" in config["providers"]:
        torch._dynamo.reset()  # one static graph per case; never hit the recompile limit

    for name in config["providers"]:
        why = prov.unavailable_reason(name, device, config.get("allow_interpreter", False))
        todo = []
        for mode in modes:
            skip = why or prov.skip_reason(name, mode, case)
            if skip:
                results.append(_row(case, mode, name, "skipped", skip))
                progress.step(f"{mode} {case.key} {name}")
            else:
                todo.append(mode)
        if not todo:
            continue
        try:
            built = prov.build(name, setup)
            trains = any(md in ("fwd+bwd", "memory") for md in todo)
            mine = reference_for(built, setup, ref, xs[0], dy0)
            err = check_provider(name, built, xs[0], dy0 if trains else None, mine)
        except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the suite
            for mode in todo:
                results.append(_row(case, mode, name, "error", f"{type(exc).__name__}: {exc}"))
                progress.step(f"{mode} {case.key} {name}")
            _release(device)
            continue
        wrong = err > TOLERANCE[dtype]
        status = "wrong" if wrong else "ok"
        reason = (f"output or gradients differ from the fp32 formula: relative error {err:.2e} > "
                  f"{TOLERANCE[dtype]:.0e}" if wrong else "")
        grads = built.trainable + xs
        for mode in todo:
            try:
                if mode == "fwd":
                    def fn(f=built.forward):
                        f(xs[rot.next()])
                    values = timing.bench(device, fn, config["warmup_ms"], config["rep_ms"], grads)
                elif mode == "fwd+bwd":
                    def fn(f=built.forward):
                        i = rot.next()
                        f(xs[i]).backward(dys[i])
                    values = timing.bench(device, fn, config["warmup_ms"], config["rep_ms"], grads)
                else:
                    values = measure_memory(built, xs[0], dys[0], device)
                    values["bound_bytes"] = bound
                    values["saved_ratio"] = values["saved_bytes"] / bound
                results.append(_row(case, mode, name, status, reason, rel_err=err, rotation=count, **values))
            except Exception as exc:  # noqa: BLE001
                results.append(_row(case, mode, name, "error", f"{type(exc).__name__}: {exc}"))
            finally:
                for t in grads:
                    t.grad = None
                progress.step(f"{mode} {case.key} {name}")
        del built
        _release(device)
    del setup, xs, dys, dy0, ref
    _release(device)


def measure_memory(built: prov.Built, x: torch.Tensor, dy: torch.Tensor, device: torch.device) -> dict:
    """Saved-for-backward bytes of one forward, and peak-memory growth of one forward+backward."""
    def reset():
        for t in built.trainable + [x]:
            t.grad = None

    built.forward(x).backward(dy)  # warm: allocator pools, compiled graphs
    reset()
    saved, y = timing.saved_activation_bytes(lambda: built.forward(x), built.params)
    y.backward(dy)
    del y
    reset()

    def step():
        built.forward(x).backward(dy)

    peak = timing.peak_bytes(device, step)
    reset()
    return {"saved_bytes": saved, "peak_bytes": peak}


def run_merge_case(case, config, device, dtype, progress, results) -> None:
    modes = [m for m in config["modes"] if m in shapes.MERGE_MODES]
    setup = prov.make_setup(case, device, dtype)
    w0 = setup.weight.detach()
    count = timing.rotation_count(w0.numel() * w0.element_size(), device)
    weights = [w0.clone() for _ in range(count)]
    merged_ref = w0.float() + setup.scaling * (setup.lora_B.float() @ setup.lora_A.float())
    rot = timing.Rotation(count)
    if "compile" in config["providers"]:
        torch._dynamo.reset()
    for name in config["providers"]:
        why = prov.unavailable_reason(name, device) or (prov.skip_reason(name, modes[0], case) if modes else "")
        if why:
            for mode in modes:
                results.append(_row(case, mode, name, "skipped", why))
                progress.step(f"{mode} {case.key} {name}")
            continue
        try:
            with torch.no_grad():
                built = prov.build(name, setup)
                w = w0.clone()
                if name == "base":
                    err = 0.0
                else:
                    built.merge(w)
                    err = relative_error(w, merged_ref)
                    built.unmerge(w)
                    err = max(err, relative_error(w, w0))
                del w
        except Exception as exc:  # noqa: BLE001
            for mode in modes:
                results.append(_row(case, mode, name, "error", f"{type(exc).__name__}: {exc}"))
                progress.step(f"{mode} {case.key} {name}")
            _release(device)
            continue
        wrong = err > TOLERANCE[dtype]
        status, reason = ("wrong", f"merge/unmerge relative error {err:.2e} > {TOLERANCE[dtype]:.0e}") if wrong \
            else ("ok", "")
        for mode in modes:
            op = built.merge if mode == "merge" else built.unmerge

            def fn(op=op):
                with torch.no_grad():
                    op(weights[rot.next()])
            try:
                values = timing.bench(device, fn, config["warmup_ms"], config["rep_ms"])
                results.append(_row(case, mode, name, status, reason, rel_err=err, rotation=count, **values))
            except Exception as exc:  # noqa: BLE001
                results.append(_row(case, mode, name, "error", f"{type(exc).__name__}: {exc}"))
            progress.step(f"{mode} {case.key} {name}")
        del built
        _release(device)
    del setup, weights, merged_ref
    _release(device)


def add_ratios(results: list[dict]) -> None:
    """``ratio`` (ms / base ms) and ``peak_ratio`` for every measured row, from the same run's base."""
    base = {(r["mode"], r["case"]): r for r in results if r["provider"] == "base" and r["status"] == "ok"}
    for r in results:
        b = base.get((r["mode"], r["case"]))
        if r["status"] not in ("ok", "wrong") or b is None:
            continue
        if "ms" in r:
            r["ratio"] = r["ms"] / b["ms"]
        if r.get("peak_bytes") is not None and b.get("peak_bytes"):
            r["peak_ratio"] = r["peak_bytes"] / b["peak_bytes"]


# The cost model's plan for each provider it covers (lora_kernels/cost_model.py). The eager formula
# runs PEFT's kernels; a merged layer's forward is the frozen layer's.
# NOTE: cuda's forward is the two-pass plan (docs/cuda.md); the model's backward for it is the Triton
# one's, which moves the same dy, W0 and x bytes and differs only in the thin passes: an approximation.
MODEL_PLANS = {"base": "frozen", "merged": "frozen", "triton": "auto", "unsloth": "unsloth", "peft": "peft",
               "eager": "peft", "cuda": "two_pass", "dora": "dora", "peft_dora": "peft_dora",
               "qlora_triton": "qlora", "qlora_unsloth": "qlora_unsloth", "qlora_peft": "qlora_peft"}


def add_predictions(results: list[dict], device: torch.device, dtype: torch.dtype) -> str:
    """``predicted_ratio`` (and for ``triton`` the forward ``predicted_plan``) from the cost model, on
    every fwd / fwd+bwd row of a provider it covers; returns the name of the device it assumed."""
    spec = cost_model.device_spec(device)
    for r in results:
        plan = MODEL_PLANS.get(r["provider"])
        if plan is None or r["mode"] not in cost_model.MODES or r["tokens"] < 1:
            continue
        pred = cost_model.predict(r["tokens"], r["in"], r["out"], r["r"], dtype, r["dropout"], r["mode"], plan, spec)
        r["predicted_ratio"] = pred.ratio
        if plan in ("auto", "qlora"):
            r["predicted_plan"] = pred.plan
    return spec.name


def run_suite(config: dict, progress_enabled: bool = True) -> list[dict]:
    device, dtype = torch.device(config["device"]), DTYPES[config["dtype"]]
    layers = [shapes.Layer(l["name"], l["in"], l["out"]) for l in config["layers"]]
    act_modes = [m for m in config["modes"] if m not in shapes.MERGE_MODES]
    merge_modes = [m for m in config["modes"] if m in shapes.MERGE_MODES]
    act = shapes.activation_cases(layers, config["tokens"], config["ranks"], config["dropouts"]) if act_modes else []
    mrg = shapes.merge_cases(layers, config["ranks"]) if merge_modes else []
    n = len(config["providers"])
    progress = Progress(n * (len(act) * len(act_modes) + len(mrg) * len(merge_modes)), progress_enabled)
    results: list[dict] = []
    try:
        for case in act:
            run_activation_case(case, config, device, dtype, progress, results)
        for case in mrg:
            run_merge_case(case, config, device, dtype, progress, results)
    finally:
        progress.close()
    add_ratios(results)
    if device.type == "cuda":  # on the CPU the predictions are a table of their own (cpu_tables.predictions)
        config["model_device"] = add_predictions(results, device, dtype)
    return results


def run_cpu_sections(config: dict, args: argparse.Namespace) -> dict:
    """The CPU run's own tables (bench/cpu_tables.py), with the suite's layers, tokens, ranks and dropouts."""
    from bench import cpu_tables

    layers = [shapes.Layer(l["name"], l["in"], l["out"]) for l in config["layers"]]
    cases = shapes.activation_cases(layers, config["tokens"], config["ranks"], config["dropouts"])
    saved_providers = [p for p in config["providers"] if p not in ("merged", "compile")]

    def log(name: str, seconds: float) -> None:
        if not args.no_progress:
            print(f"[cpu] {name}: {seconds:.1f} s", file=sys.stderr)

    return cpu_tables.run_all(cases, saved_providers, args.host_reps, args.host_repeats, args.step_steps, log)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = make_config(args)
    device = torch.device(config["device"])
    env = envmod.collect(device)
    cpu = None
    start = time.perf_counter()
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
        config["threads"] = args.threads
        cpu = run_cpu_sections(config, args)
    results = run_suite(config, progress_enabled=not args.no_progress) if config["modes"] else []
    config["elapsed_s"] = round(time.perf_counter() - start, 1)
    checks = targets.evaluate(results) if device.type == "cuda" else []
    print(report.render_text(env, config, results, checks, config["providers"], cpu))

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", env, config, results, checks, cpu)
    (out / "results.md").write_text(report.render_markdown(env, config, results, checks, config["providers"], cpu))
    written = ["results.json", "results.md"]
    if not args.no_plot and results:
        try:
            report.plot(out / "results.png", env, config, results, config["providers"])
            written.append("results.png")
        except ImportError as exc:
            print(f"no plot: {exc} (pip install matplotlib)", file=sys.stderr)
    print(f"\nWrote {', '.join(str(out / w) for w in written)} in {config['elapsed_s']} s.")
    bad = [r for r in results if r["status"] in ("error", "wrong")]
    if cpu is not None:
        bad += cpu_failures(cpu)
    if bad:
        print(f"{len(bad)} measurement(s) failed or computed a wrong output; see the notes under the tables.",
              file=sys.stderr)
        return 1
    return 0


def cpu_failures(cpu: dict) -> list[str]:
    """What makes a CPU run fail: the Triton kernels wrong under the interpreter, or saving other bytes
    when run than when stubbed (the saved-bytes tables would not describe them)."""
    check = cpu.get("check", {})
    if check.get("skipped") or not check:
        return []
    bad = []
    if not check["rel_err"] <= check["tolerance"]:
        bad.append(f"triton under the interpreter: relative error {check['rel_err']:.2e} > {check['tolerance']:.0e}")
    if check["saved_real"] != check["saved_stubbed"]:
        bad.append(f"triton saved {check['saved_real']} bytes run, {check['saved_stubbed']} stubbed")
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
