"""What a CPU can measure of the layer: the sections of ``python bench/run.py`` without a GPU.

Each section is labelled for what it is, and none of them is a GPU time:

- ``host``: the package's host time per call and per training step, its Triton launches stubbed
  (:mod:`bench.host_overhead`), beside PEFT's and a frozen ``nn.Linear``'s (which compute their
  tiny GEMMs on the CPU);
- ``saved``: the activation bytes autograd keeps for backward, per layer and per small Llama step,
  counted exactly (:func:`bench.timing.saved_activation_bytes`). Which tensors a layer saves is
  decided by its host code, not by its kernels' values, so for the same shapes and dtype these are
  the bytes a GPU run keeps;
- ``predicted``: the cost model's ratios for an H100 (:mod:`lora_kernels.cost_model`): arithmetic,
  not a measurement;
- ``check``: the Triton kernels run for real under Triton's CPU interpreter at a tiny shape, against
  the formula in fp32, and the bytes they save against the stubbed count above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F

from lora_kernels import cost_model

from . import host_overhead
from . import providers as prov
from . import run as runmod
from . import shapes, timing, train_step

CPU = torch.device("cpu")
# Providers whose layer runs the package's Triton path (launches stubbed where counted on the CPU).
TRITON_PROVIDERS = ("triton", "peft_accel", "lora_kernels")
# The saved-bytes table's providers by default (compile is left out: it compiles for a minute or more here).
SAVED_PROVIDERS = ("base", "peft", "eager", "unsloth", "triton", "cuda", "reference")
STEP_PROVIDERS = ("frozen", "peft", "peft_accel", "lora_kernels")
HOST_SHAPE = (16, 64, 48, 8)  # M, K, N, r: host_overhead.py's default, tiny so that host time dominates
CHECK_CASE = shapes.Case(shapes.Layer("check", 64, 48), 32, 8, 0.0)
PREDICTED_DEVICE = "H100"
PREDICTED_PLANS = {"triton": "auto", "unsloth": "unsloth", "peft": "peft"}


def triton_reason(device: torch.device = CPU) -> str:
    """Empty if the package's Triton path runs on ``device`` here (on the CPU: under the interpreter)."""
    return prov.unavailable_reason("triton", device, allow_interpreter=True)


# --------------------------------------------------------------------------- #
# host: time per call and per training step, launches stubbed
# --------------------------------------------------------------------------- #


def host_per_call(reps: int = 200, repeats: int = 5, shape=HOST_SHAPE) -> dict:
    """:func:`bench.host_overhead.comparison` on the CPU: medians over ``repeats`` rounds of ``reps``
    calls, µs of forward and of forward+backward, fp32."""
    why = triton_reason()
    M, K, N, r = shape
    rows = host_overhead.comparison(M, K, N, r, CPU, torch.float32, reps, repeats) if not why else {}
    return {"shape": dict(M=M, K=K, N=N, r=r, dtype="fp32"), "reps": reps, "repeats": repeats,
            "rows": rows, "skipped": why}


def _step_args(r: int, alpha: float, dropout: float, warmup: int, steps: int = 0) -> argparse.Namespace:
    return argparse.Namespace(r=r, alpha=alpha, dropout=dropout, backend="triton", warmup=warmup, steps=steps)


def host_per_step(config: str = "tiny", steps: int = 10, warmup: int = 3, r: int = 16, dropout: float = 0.05,
                  providers=STEP_PROVIDERS) -> dict:
    """Host time of one training step of a tiny Llama (bench/train_step.py), the providers alternating
    step by step, every Triton launch of ours stubbed (the base GEMMs of its LoRA layers included);
    the frozen model and PEFT compute on the CPU."""
    why = triton_reason()
    names = [p for p in providers if not (why and p in TRITON_PROVIDERS)]
    cfg = train_step.CONFIGS[config]
    with host_overhead.counting(suppress=True, torch_ops=False) as counter:
        results = train_step.run_interleaved(names, cfg, _step_args(r, 32.0, dropout, warmup, steps), CPU)
    return {"config": config, "model": dataclasses.asdict(cfg), "r": r, "dropout": dropout, "steps": steps,
            "rows": {res["provider"]: res["step_ms"] * 1e3 for res in results},
            "launches": len(counter.triton), "skipped": why}


# --------------------------------------------------------------------------- #
# saved: activation bytes kept for backward
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def dropout_as_on_a_gpu() -> Iterator[None]:
    """``F.dropout`` in training as on a GPU: ATen's fused ``native_dropout``, which saves a bool mask.

    NOTE: on the CPU, ATen's dropout is ``x * noise`` and saves the noise in ``x``'s dtype (2 bytes an
    element in bf16, against the GPU's 1): without this, PEFT's and the eager formula's saved bytes with
    dropout would be the CPU's, not a GPU's. ``nn.Dropout`` looks ``F.dropout`` up at each call.
    """
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0 or inplace:
            return original(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def count_saved(run, params, stub: bool) -> tuple[int, int]:
    """``(bytes saved for backward, Triton launches)`` of ``run()`` (dropout as on a GPU); with ``stub``
    the Triton launches are no-ops."""
    with dropout_as_on_a_gpu():
        if not stub:
            return timing.saved_activation_bytes(run, params)[0], 0
        with host_overhead.counting(suppress=True, torch_ops=False) as counter:
            saved, _ = timing.saved_activation_bytes(run, params)
    if not counter.triton:
        raise RuntimeError("no Triton launch was made: the package's Triton path did not run")
    return saved, len(counter.triton)


def layer_saved_bytes(name: str, case: shapes.Case, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One provider's saved bytes for one forward of one case (``triton``: launches stubbed)."""
    why = prov.unavailable_reason(name, CPU, allow_interpreter=True) or prov.skip_reason(name, "memory", case)
    if why:
        return {"status": "skipped", "reason": why}
    setup = prov.make_setup(case, CPU, dtype)
    built = prov.build(name, setup)
    x = torch.randn(case.tokens, case.layer.in_features, dtype=dtype, requires_grad=True)
    saved, launches = count_saved(lambda: built.forward(x), built.params, stub=name == "triton")
    return {"status": "ok", "saved_bytes": saved, "launches": launches}


def bound_bytes(case: shapes.Case, dtype: torch.dtype) -> int:
    """``x`` and ``x·Aᵀ``: what the layer's backward needs (the dropout mask is regenerated)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return case.tokens * (case.layer.in_features + case.r) * elt


def saved_per_layer(cases: list[shapes.Case], providers=SAVED_PROVIDERS, dtype: torch.dtype = torch.bfloat16) -> dict:
    rows = []
    for case in cases:
        cells = {name: layer_saved_bytes(name, case, dtype) for name in providers}
        rows.append({"case": case.key, "layer": case.layer.name, "in": case.layer.in_features,
                     "out": case.layer.out_features, "tokens": case.tokens, "r": case.r, "dropout": case.dropout,
                     "bound_bytes": bound_bytes(case, dtype), "providers": cells})
    return {"dtype": str(dtype).replace("torch.", ""), "providers": list(providers), "rows": rows}


def step_saved_bytes(provider: str, cfg: train_step.Config, r: int, dropout: float) -> dict:
    """Saved bytes of one forward (loss included) of a Llama built from ``cfg`` for ``provider``."""
    model, _ = train_step.prepare(provider, train_step.build_model(cfg, CPU), _step_args(r, 32.0, dropout, 0))
    model.train()
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(1))
    saved, launches = count_saved(lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters()),
                                  stub=provider in TRITON_PROVIDERS)
    return {"saved_bytes": saved, "launches": launches}


def saved_per_step(config: str = "small", dropouts=(0.0, 0.05), r: int = 16, dtype: str = "bfloat16",
                   providers=STEP_PROVIDERS) -> dict:
    """Saved bytes of one training step's forward of a small Llama, per provider and dropout."""
    why = triton_reason()
    cfg = dataclasses.replace(train_step.CONFIGS[config], dtype=dtype)
    rows = []
    for p in dropouts:
        cells = {}
        for name in providers:
            if why and name in TRITON_PROVIDERS:
                cells[name] = {"status": "skipped", "reason": why}
            else:
                cells[name] = {"status": "ok", **step_saved_bytes(name, cfg, r, p)}
        rows.append({"dropout": p, "providers": cells})
    return {"config": config, "model": dataclasses.asdict(cfg), "r": r, "providers": list(providers), "rows": rows}


# --------------------------------------------------------------------------- #
# predicted: the cost model for an H100 (not measured)
# --------------------------------------------------------------------------- #


def predictions(device: str = PREDICTED_DEVICE) -> dict:
    """The cost model's ratios to the frozen layer for the shapes a GPU run of the same command
    measures (the GPU quick preset: Llama-3-8B, bf16)."""
    spec = cost_model.device_spec(device)
    preset = shapes.PRESETS[("cuda", "quick")]
    layers = shapes.layers_from_names(preset.layers, shapes.LLAMA3_8B)
    rows = []
    for case in shapes.activation_cases(layers, preset.tokens, preset.ranks, preset.dropouts):
        k, n = case.layer.in_features, case.layer.out_features
        for mode in cost_model.MODES:
            preds = {name: cost_model.predict(case.tokens, k, n, case.r, torch.bfloat16, case.dropout, mode, plan,
                                              spec) for name, plan in PREDICTED_PLANS.items()}
            rows.append({"case": case.key, "layer": case.layer.name, "in": k, "out": n, "tokens": case.tokens,
                         "r": case.r, "dropout": case.dropout, "mode": mode,
                         "plan": preds["triton"].plan,
                         "ratios": {name: pr.ratio for name, pr in preds.items()},
                         "frozen_ms": preds["triton"].frozen_seconds * 1e3})
    return {"device": spec.name, "dtype": "bf16", "rows": rows}


# --------------------------------------------------------------------------- #
# check: the Triton kernels for real, under the interpreter
# --------------------------------------------------------------------------- #


def interpreter_check(case: shapes.Case = CHECK_CASE, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``triton`` run for real at a tiny shape: the largest relative error of y, dx, dA, dB against the
    formula in fp32, and its saved bytes real against stubbed (they must be equal)."""
    why = triton_reason()
    if why:
        return {"skipped": why}
    t0 = time.perf_counter()
    setup = prov.make_setup(case, CPU, dtype)
    built = prov.build("triton", setup)
    x = torch.randn(case.tokens, case.layer.in_features, dtype=dtype, requires_grad=True)
    dy = torch.randn(case.tokens, case.layer.out_features, dtype=dtype)
    # with dropout the masks are the kernels' own: finiteness only (as the suite's correctness check)
    ref = runmod.reference_grads(setup, x, dy) if case.dropout == 0 else None
    err = runmod.check_provider("triton", built, x, dy, ref)
    real, _ = count_saved(lambda: built.forward(x), built.params, stub=False)
    stubbed, _ = count_saved(lambda: built.forward(x), built.params, stub=True)
    return {"case": case.key, "dtype": str(dtype).replace("torch.", ""), "rel_err": err,
            "tolerance": runmod.TOLERANCE[dtype], "saved_real": real, "saved_stubbed": stubbed,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_all(cases: list[shapes.Case], providers=SAVED_PROVIDERS, host_reps: int = 200, host_repeats: int = 5,
            step_steps: int = 10, log=None) -> dict:
    """Every section, in order; ``log(name, seconds)`` after each."""
    out: dict = {}
    with warnings.catch_warnings():
        # NOTE: PEFT 0.21 calls a transformers 5 method that warns of its own rename: noise for this run
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        _run_sections(out, cases, providers, host_reps, host_repeats, step_steps, log)
    return out


def _run_sections(out, cases, providers, host_reps, host_repeats, step_steps, log) -> None:
    for name, fn in (("check", interpreter_check),
                     ("saved_layer", lambda: saved_per_layer(cases, providers)),
                     ("saved_step", saved_per_step),
                     ("host_call", lambda: host_per_call(host_reps, host_repeats)),
                     ("host_step", lambda: host_per_step(steps=step_steps)),
                     ("predicted", predictions)):
        t0 = time.perf_counter()
        out[name] = fn()
        if log is not None:
            log(name, time.perf_counter() - t0)
