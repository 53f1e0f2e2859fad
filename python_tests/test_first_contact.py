"""The GPU first-contact script's pieces (bench/first_contact.py) that can be checked without a GPU.

The whole script runs in CI as a dry run (`.ci/run`: LORA_KERNELS_DRY_RUN=1 bash
bench/gpu_check.sh OUTDIR first, then `first_contact.py verify`); these tests pin the parts
whose failure on a GPU would cost a lease: poisoning, the ncu report, the checks on OUTDIR.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import first_contact as fc  # noqa: E402


def test_poisoned_fills_new_tensors_with_nan_and_restores_the_mode():
    before = torch.are_deterministic_algorithms_enabled()
    with fc.poisoned():
        t = torch.empty(5)
        i = torch.empty(3, dtype=torch.int64)
        t[:3] = 1.0  # a "kernel" that forgets two elements
    assert torch.isnan(t[3:]).all() and (i == torch.iinfo(torch.int64).max).all()
    assert fc.relative_error(t, torch.ones(5)) == math.inf  # the unwritten elements fail the check
    assert torch.are_deterministic_algorithms_enabled() == before


def test_relative_error_refuses_missing_or_misshapen_outputs():
    ref = torch.randn(4, 3, dtype=torch.float64)
    assert fc.relative_error(None, ref) == math.inf
    assert fc.relative_error(ref.t(), ref) == math.inf
    assert fc.relative_error(ref.float(), ref) < 1e-6


def test_correctness_cases_cover_every_family_bf16_first_large_once():
    cases = list(fc.correctness_cases("triton"))
    assert {f for _, f, _ in cases} == set(fc.FAMILIES)
    assert [d for d, _, _ in cases] == sorted((d for d, _, _ in cases), key=["bf16", "fp16", "fp32"].index)
    large = fc.DRY_LARGE if fc.DRY_RUN else fc.LARGE
    assert {d for d, _, s in cases if s == large} == {"bf16"}
    assert {f for _, f, _ in fc.correctness_cases("cuda")} == set(fc.CUDA_FAMILIES)


@pytest.mark.parametrize("family", ["forward fused", "backward g_pass", "merge/unmerge"])
def test_check_single_passes_on_the_reference_backend(family):
    errs = fc.check_single("reference", family, (7, 24, 10, 4), torch.float32)
    assert errs and max(errs.values()) < 1e-5, errs


def test_check_multi_passes_on_the_reference_backend():
    errs = fc.check_multi("reference", (9, 16, 12, 4), torch.float32)
    assert set(errs) == {"y", "dx", "dA", "dB"} and max(errs.values()) < 1e-5, errs


NCU_CSV = '''==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python3","127.0.0.1","_lora_forward_kernel","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","150,000,000"
"0","1234","python3","127.0.0.1","_lora_forward_kernel","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","70,000,000"
"0","1234","python3","127.0.0.1","_lora_forward_kernel","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","500,000"
"1","1234","python3","127.0.0.1","_lora_backward_kernel","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","600"
'''


def test_ncu_report_puts_measured_beside_the_cost_model(tmp_path):
    csv = tmp_path / "ncu.csv"
    csv.write_text(NCU_CSV)
    res = fc.Results(tmp_path)
    assert fc.stage_ncu_report(tmp_path, res, csv) == 0
    lines = (tmp_path / "ncu.txt").read_text().splitlines()
    fwd = next(line for line in lines if line.startswith("_lora_forward_kernel")).split()
    assert float(fwd[1]) == pytest.approx(500.0)  # µs
    assert float(fwd[4]) == pytest.approx(0.22)  # GB read + written
    model_us, tflops, model_gb = float(fwd[2]), float(fwd[3]), float(fwd[5])
    assert 100 < model_us < 2000 and 0.1 < model_gb < 1.0 and tflops > 100  # ~293 GFLOP in 0.5 ms
    bwd = next(line for line in lines if line.startswith("_lora_backward_kernel")).split()
    assert float(bwd[1]) == pytest.approx(600.0)
    assert json.loads((tmp_path / "bench.json").read_text())["stages"]["ncu"]["report"] == lines


def test_ncu_report_says_when_ncu_wrote_nothing(tmp_path):
    fc.stage_ncu_report(tmp_path, fc.Results(tmp_path), tmp_path / "absent.csv")
    assert "did not run" in (tmp_path / "ncu.txt").read_text()


def _row(stage, provider, ms, mode="fwd", dropout=0.0, **extra):
    return {"stage": stage, "provider": provider, "mode": mode, "dropout": dropout, "in": 64, "out": 64,
            "tokens": 64, "status": "ok", "reason": "", "ms": ms, **extra}


def test_headline_keeps_each_process_frozen_layer_apart(tmp_path):
    res = fc.Results(tmp_path)
    for row in (_row("headline", "base", 1.0, ratio=1.0), _row("headline", "triton", 1.1, ratio=1.1),
                _row("headline-cuda", "base", 2.0, ratio=1.0), _row("headline-cuda", "cuda", 2.2, ratio=1.1)):
        res.add(row)
    text = fc.render_headline(res)
    assert text.startswith("# headline")
    assert "| base | 1.00× (1.000 ms) |" in text and "| base (cuda's process) | 1.00× (2.000 ms) |" in text
    assert "| cuda | 1.10× (2.200 ms) |" in text


def _finished_run(out: Path) -> None:
    (out / "summary.txt").write_text("env              budget   20s  measured    4s  rc=0\n"
                                     "extra            budget   40s  skipped: no time left\n")
    for name in ("env.txt", "build.log", "run.log", "correctness.log"):
        (out / name).write_text("x\n")
    (out / "headline.md").write_text("# headline\n\n| base | 1 |\n| triton | 1 |\n")
    res = fc.Results(out)
    res.add({"stage": "correctness", "backend": "triton", "family": "dropout", "dtype": "bf16", "shape": [1, 7, 9, 1],
             "status": "ok", "detail": ""})


def test_verify_accepts_a_complete_run_and_names_each_problem(tmp_path):
    _finished_run(tmp_path)
    assert fc.verify(tmp_path, "first") == []
    with (tmp_path / "summary.txt").open("a") as f:
        f.write("headline         budget  130s  measured  130s  rc=124  (cut off at its limit)\n")
    fc.Results(tmp_path).add({"stage": "correctness", "backend": "triton", "family": "merge/unmerge",
                              "dtype": "fp16", "shape": [1, 7, 9, 1], "status": "wrong", "detail": "merged=1e-1"})
    (tmp_path / "headline.md").write_text("| base | 1 |\n")
    for i in range(3):
        (tmp_path / f"extra{i}.txt").write_text("x")
    problems = "\n".join(fc.verify(tmp_path, "first"))
    for expected in ("10 files", "stage failed: 'headline", "merge/unmerge fp16", "heading 'headline'",
                     "no triton row"):
        assert expected in problems, problems
