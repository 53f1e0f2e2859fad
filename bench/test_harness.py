"""Tests of the suite itself, on the CPU: providers compute the formula, the probes count
what they claim, targets are judged right, and a run writes every output.

The GPU-only paths (target columns, peak-memory tables) are exercised on
synthetic results, since no GPU is needed to render them.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import providers as prov
from bench import report, run, shapes, targets, timing
from lora_kernels import cost_model

CPU = torch.device("cpu")


def _case(tokens=48, k=80, n=72, r=4, dropout=0.0) -> shapes.Case:
    return shapes.Case(shapes.Layer("t", k, n), tokens, r, dropout)


@pytest.mark.parametrize("name", [p for p in prov.PROVIDERS if p not in ("merged", "compile")])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_provider_matches_formula(name, dtype, tol):
    if prov.unavailable_reason(name, CPU):
        pytest.skip(prov.unavailable_reason(name, CPU))
    case = _case()
    setup = prov.make_setup(case, CPU, dtype)
    x = torch.randn(case.tokens, case.layer.in_features, dtype=dtype, requires_grad=True)
    dy = torch.randn(case.tokens, case.layer.out_features, dtype=dtype)
    built = prov.build(name, setup)
    ref = run.reference_for(built, setup, run.reference_grads(setup, x, dy), x, dy)
    assert run.check_provider(name, built, x, dy, ref) < tol


def test_merged_and_compile_match_formula():
    case = _case()
    setup = prov.make_setup(case, CPU, torch.float32)
    x = torch.randn(case.tokens, case.layer.in_features, requires_grad=True)
    dy = torch.randn(case.tokens, case.layer.out_features)
    ref = run.reference_grads(setup, x, dy)
    assert run.check_provider("merged", prov.build("merged", setup), x, None, ref) < 1e-4
    torch._dynamo.reset()
    assert run.check_provider("compile", prov.build("compile", setup), x, dy, ref) < 1e-4


def test_base_is_not_the_lora_layer():
    """B is random, so the LoRA term is of the same order as the base output (a real computation)."""
    setup = prov.make_setup(_case(), CPU, torch.float32)
    x = torch.randn(48, 80)
    base = x @ setup.weight.t()
    lora = setup.scaling * (x @ setup.lora_A.t()) @ setup.lora_B.t()
    assert lora.norm() > 0.1 * base.norm()


def test_unsloth_function_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: prov.UnslothStyleLoRA.apply(x, w, a, b, 0.7, 0.0), (x, a, b))


def test_unsloth_dropout_gradients_use_the_forward_mask():
    torch.manual_seed(0)
    p, s = 0.3, 0.7
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 32, dtype=torch.float64)
    a = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    y = prov.UnslothStyleLoRA.apply(x, w, a, b, s, p)
    # Recover the mask from the output: y - x Wᵀ = s · (x ⊙ D) Aᵀ Bᵀ, D = mask / (1 - p).
    dy = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
    xa = torch.linalg.lstsq(b, ((y - x @ w.t()) / s).t()).solution.t()  # (M, r) = (x ⊙ D) Aᵀ
    assert torch.allclose(db, s * dy.t() @ xa, atol=1e-8)
    # dx - dy W = s · (dy B A) ⊙ D: D takes only the values 0 and 1 / (1 - p).
    d = (dx - dy @ w) / (s * (dy @ b @ a))
    assert torch.all(torch.isclose(d, torch.zeros_like(d), atol=1e-6) | torch.isclose(d, torch.full_like(d, 1 / (1 - p))))
    keep = d > 0.5
    assert torch.allclose(da, s * (dy @ b).t() @ (x * keep / (1 - p)), atol=1e-8)
    assert 0.15 < 1 - keep.double().mean().item() < 0.45


def test_saved_activation_bytes_counts_x_and_xa():
    case = _case(dropout=0.0)
    setup = prov.make_setup(case, CPU, torch.bfloat16)
    x = torch.randn(48, 80, dtype=torch.bfloat16, requires_grad=True)
    bound = (48 * 80 + 48 * 4) * 2
    for name in ("unsloth", "eager", "reference"):
        built = prov.build(name, setup)
        saved, y = timing.saved_activation_bytes(lambda: built.forward(x), built.params)
        assert saved == bound, name
    base = prov.build("base", setup)
    saved, _ = timing.saved_activation_bytes(lambda: base.forward(x), base.params)
    assert saved == 0  # frozen W0: dx = dy W0 needs only the parameter


def test_saved_activation_bytes_counts_views_once():
    t = torch.randn(10, 10, requires_grad=True)

    def f():
        return (t[:5] * t[5:]).sum() + (t.t() * 2).sin().sum()

    saved, _ = timing.saved_activation_bytes(f, [])
    assert saved >= 400  # t's storage (400 bytes) once, plus the intermediates sin saves


def test_rotation_and_cpu_timer():
    rot = timing.Rotation(3)
    assert [rot.next() for _ in range(4)] == [1, 2, 0, 1]
    assert timing.rotation_count(1, CPU) == 2
    out = timing.bench_cpu(lambda: torch.ones(10).sum(), 1, 2)
    assert out["p20"] <= out["ms"] <= out["p80"] and out["reps"] >= 5


def _rows(mode, case, **ms):
    return [run._row(case, mode, p, "ok", ms=v) for p, v in ms.items()]


def test_targets_met_and_missed():
    big, small = _case(tokens=8192), _case(tokens=512, dropout=0.1)
    results = (
        _rows("fwd", big, base=1.0, merged=1.01, peft=2.0, eager=1.9, compile=1.5, unsloth=1.3, triton=1.04, cuda=1.2)
        + _rows("fwd+bwd", big, base=2.0, peft=4.0, unsloth=2.1, triton=2.15, cuda=2.5, dora=2.2)
        + _rows("fwd+bwd", small, base=1.0, peft=3.0, triton=1.4, cuda=1.6, dora=2.0)
    )
    run.add_ratios(results)
    checks = {(c["mode"], c["case"], c["provider"], c["target"]): c["met"] for c in targets.evaluate(results)}
    n = [x.name for x in targets.TARGETS]
    fwd_t, fb_t, fbd_t, small_t, _, merged_t, fastest_t = n[:7]
    dora_t = next(name for name in n if name.startswith("DoRA"))
    assert checks[("fwd+bwd", big.key, "dora", dora_t)] is True  # 2.2 / triton's 2.15 = 1.023 ≤ 1.05
    assert ("fwd+bwd", small.key, "dora", dora_t) not in checks  # for ≥ 4096 tokens
    assert checks[("fwd", big.key, "triton", fwd_t)] is True
    assert checks[("fwd", big.key, "cuda", fwd_t)] is False
    assert checks[("fwd", big.key, "merged", merged_t)] is True
    assert checks[("fwd", big.key, "triton", fastest_t)] is True
    assert checks[("fwd", big.key, "cuda", fastest_t)] is True  # 1.2 < unsloth 1.3
    assert checks[("fwd+bwd", big.key, "triton", fb_t)] is True  # 1.075 ≤ 1.10
    assert checks[("fwd+bwd", big.key, "cuda", fb_t)] is False  # 1.25
    assert checks[("fwd+bwd", big.key, "triton", fastest_t)] is False  # unsloth 2.1 < 2.15
    assert checks[("fwd+bwd", small.key, "triton", small_t)] is True
    assert checks[("fwd+bwd", small.key, "cuda", small_t)] is False
    assert ("fwd+bwd", big.key, "triton", fbd_t) not in checks  # p = 0 here
    assert not any(k[3].startswith("fwd+bwd ≤ 1.15") for k in checks)  # dropout target is for ≥ 4096 tokens


def test_the_4bit_target():
    """Issue #20: the 4-bit layer, fwd+bwd, ≤ 1.2× the frozen 16-bit layer at 8192 tokens, 4096→4096, r = 16."""
    case = shapes.Case(shapes.Layer("t", 4096, 4096), 8192, 16, 0.0)
    other = shapes.Case(shapes.Layer("t", 4096, 4096), 2048, 16, 0.0)
    results = (_rows("fwd+bwd", case, base=2.0, qlora_triton=2.3, qlora_peft=3.5)
               + _rows("fwd+bwd", other, base=1.0, qlora_triton=1.5))
    run.add_ratios(results)
    checks = [c for c in targets.evaluate(results) if c["target"].startswith("4-bit")]
    assert [(c["case"], c["provider"], c["met"]) for c in checks] == [(case.key, "qlora_triton", True)]  # 1.15


def test_memory_and_merge_targets():
    case, mcase = _case(tokens=4096), shapes.Case(shapes.Layer("t", 80, 72), 0, 4, 0.0)
    results = [
        run._row(case, "memory", "base", "ok", saved_bytes=0, bound_bytes=100, peak_bytes=1000),
        run._row(case, "memory", "triton", "ok", saved_bytes=100, bound_bytes=100, peak_bytes=1500),
        run._row(case, "memory", "cuda", "ok", saved_bytes=101, bound_bytes=100, peak_bytes=1400),
    ] + _rows("merge", mcase, base=1.0, triton=1.1, cuda=1.3, eager=3.0)
    run.add_ratios(results)
    met = {(c["mode"], c["provider"], c["target"][:5]): c["met"] for c in targets.evaluate(results)}
    assert met[("memory", "triton", "saved")] and not met[("memory", "cuda", "saved")]
    assert met[("merge", "triton", "merge")] and not met[("merge", "cuda", "merge")]
    assert results[1]["peak_ratio"] == 1.5


def test_gpu_report_renders_targets_and_peak_memory(tmp_path):
    """The tables and plot as a GPU run would produce them (synthetic numbers)."""
    big = _case(tokens=8192)
    results = _rows("fwd", big, base=1.0, merged=1.0, peft=2.0, triton=1.2)
    results.append(run._row(big, "fwd", "cuda", "skipped", "not built"))
    results.append(run._row(big, "fwd", "unsloth", "error", "RuntimeError: boom"))
    results += [
        run._row(big, "memory", "base", "ok", saved_bytes=0, bound_bytes=2**20, peak_bytes=2**21),
        run._row(big, "memory", "triton", "ok", saved_bytes=2**20, bound_bytes=2**20, peak_bytes=2**22),
    ]
    for r in results:
        if r["mode"] == "memory" and r["status"] == "ok":
            r["saved_ratio"] = r["saved_bytes"] / r["bound_bytes"]
    run.add_ratios(results)
    config = {"dtype": "bf16", "timer": "do_bench", "warmup_ms": 25, "rep_ms": 100,
              "model_device": run.add_predictions(results, CPU, torch.bfloat16)}
    checks = targets.evaluate(results)
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "x", "triton": "y", "peft": "z", "git_commit": "abc",
           "git_dirty": False, "date": "today"}
    providers = ["base", "merged", "peft", "unsloth", "triton", "cuda"]
    text = report.render_text(env, config, results, checks, providers)
    assert "MISSED" in text and "triton: 1.200× > 1.05×" in text
    # The cost model's prediction beside each measured ratio it covers, and what it assumed.
    want = cost_model.predict(8192, 80, 72, 4, torch.bfloat16, 0.0, "fwd", "peft").ratio
    assert f"2.000 ({want:.3f})" in text and "predicted ratio (docs/cost_model.md) on H100 SXM" in text
    assert "triton's predicted forward plan" in text
    assert "peak memory" in text and "4.0 (2.00)" in text
    assert "ERROR" in text and "cuda skipped: not built" in text
    assert report.CPU_WARNING not in text
    md = report.render_markdown(env, config, results, checks, providers)
    assert "## Targets" in md and "| targets |" in md and f"2.000 ({want:.3f})" in md
    report.plot(tmp_path / "p.png", env, config, results, providers)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_main_cpu_end_to_end(tmp_path, capsys):
    """A CPU run with --cpu-timings: the CPU's own tables, then the timed suite without predictions in its cells."""
    rc = run.main(["--layers", "k,v", "--tokens", "32", "--ranks", "4", "--dropout", "0,0.1", "--cpu-timings",
                   "--providers", "merged,peft,eager,unsloth,triton,cuda,reference", "--host-reps", "10",
                   "--host-repeats", "1", "--step-steps", "1",
                   "--warmup", "1", "--reps", "3", "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert report.CPU_WARNING in out and report.CPU_TIMINGS_WARNING in out and "triton skipped" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["env"]["torch"] == torch.__version__ and "git_commit" in doc["env"]
    assert doc["config"]["layers"] == [{"name": "k/v", "in": 256, "out": 64}]
    assert doc["config"]["providers"][0] == "base"  # always measured
    # memory is the CPU run's own saved-bytes table (the Triton path included), not a timed mode
    assert {r["mode"] for r in doc["results"]} == set(shapes.MODES) - {"memory"}
    assert [r["providers"]["triton"]["status"] for r in doc["cpu"]["saved_layer"]["rows"]] == ["ok", "ok"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok and all(r["rel_err"] < 2e-2 for r in ok)
    assert all(r["ratio"] > 0 and r["p20"] <= r["ms"] <= r["p80"] for r in ok)
    assert not any("predicted_ratio" in r for r in doc["results"])  # predictions: their own H100 table
    assert doc["cpu"]["predicted"]["device"] == "H100 SXM" and "[predicted]" in out
    skipped = {r["provider"]: r["reason"] for r in doc["results"] if r["status"] == "skipped"}
    assert "CUDA" in skipped["cuda"] and "interpreter" in skipped["triton"]
    assert "CPU RUN" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_cli_shapes_and_modes(tmp_path):
    args = run.parse_args(["--in", "100,200", "--out", "50,60", "--modes", "forward,fwd_bwd", "--device", "cpu",
                           "--cpu-timings"])
    config = run.make_config(args)
    assert config["layers"] == [{"name": "100x50", "in": 100, "out": 50}, {"name": "200x60", "in": 200, "out": 60}]
    assert config["modes"] == ["fwd", "fwd+bwd"]
    assert shapes.layers_from_names(["q", "o", "gate", "up"], shapes.LLAMA3_8B) == [
        shapes.Layer("q/o", 4096, 4096), shapes.Layer("gate/up", 4096, 14336)]
    with pytest.raises(SystemExit):
        run.make_config(run.parse_args(["--providers", "nope", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="--cpu-timings"):  # CPU times only when asked for
        run.make_config(run.parse_args(["--modes", "fwd", "--device", "cpu"]))
    assert run.make_config(run.parse_args(["--device", "cpu"]))["modes"] == []
    with pytest.raises(ValueError):
        shapes.parse_modes("fwd,sideways")
