"""The GPU first-contact script's pieces (bench/first_contact.py) that can be checked without a GPU.

The whole script runs in CI as a dry run (`.ci/run`: LORA_KERNELS_DRY_RUN=1 bash
bench/gpu_check.sh OUTDIR first, then `first_contact.py verify`); these tests pin the parts
whose failure on a GPU would cost a lease: poisoning, the ncu report, the checks on OUTDIR,
the stage check for Triton warnings and TMA fallbacks, compiling ahead, and gpu_check.sh's
exit status and bounded build (run with a stand-in `python` or a torch that cannot be imported).
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
                                     "extra            budget   40s  skipped: 12s left\n"
                                     "result: ok\n")
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


def test_verify_reads_the_result_line(tmp_path):
    _finished_run(tmp_path)
    summary = tmp_path / "summary.txt"
    summary.write_text(summary.read_text().replace("result: ok", "result: FAILED: build"))
    assert fc.verify(tmp_path, "first") == ["summary.txt: result: FAILED: build"]
    summary.write_text(summary.read_text().replace("result: FAILED: build\n", ""))
    assert fc.verify(tmp_path, "first") == ["summary.txt has no 'result:' line: the run did not finish"]


# --------------------------------------------------------------------------- #
# A stage fails on a Triton warning or a TMA fallback, and says which
# --------------------------------------------------------------------------- #


def test_poisoned_silences_only_the_determinism_notice():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fc.poisoned():
            warnings.warn("index_add_cpu does not have a deterministic implementation, but you set "
                          "'torch.use_deterministic_algorithms(True, warn_only=True)'.")
            warnings.warn("lora_kernels: the TMA forward kernel failed")
    assert [str(w.message) for w in caught] == ["lora_kernels: the TMA forward kernel failed"]


def _stage_that(monkeypatch, action):
    def stage_env(out, res):
        action()
        return 0
    monkeypatch.setattr(fc, "stage_env", stage_env)


def test_a_triton_warning_fails_the_stage_and_names_itself(tmp_path, monkeypatch, capsys):
    import warnings

    import triton

    _stage_that(monkeypatch, lambda: warnings.warn_explicit("tl.foo is deprecated", DeprecationWarning,
                                                            filename=triton.__file__, lineno=7))
    assert fc.main(["env", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: env: Triton warning: DeprecationWarning: tl.foo is deprecated" in err, err
    failures = json.loads((tmp_path / "bench.json").read_text())["stages"]["env"]["failures"]
    assert failures and "tl.foo is deprecated" in failures[0]


def test_a_tma_fallback_fails_the_stage_and_names_the_case(tmp_path, monkeypatch, capsys):
    from lora_kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_TMA_FAILED_CASES", set())
    case = ("forward", (torch.bfloat16, (130, 72), (72, 1)), (torch.bfloat16, (260, 72), (72, 1)))
    _stage_that(monkeypatch, lambda: triton_ops._TMA_FAILED_CASES.add(case))
    assert fc.main(["env", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: env: TMA fallback to the pointer kernel:" in err and "(130, 72)" in err, err


def test_other_warnings_are_shown_and_do_not_fail_the_stage(tmp_path, monkeypatch, capsys):
    import warnings

    _stage_that(monkeypatch, lambda: warnings.warn("a peft notice", UserWarning))
    assert fc.main(["env", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "a peft notice" in err and "FAILED" not in err


# --------------------------------------------------------------------------- #
# Compiling ahead: worker processes, bounded
# --------------------------------------------------------------------------- #


def test_run_bounded_kills_what_outlives_its_bound():
    import time

    t0 = time.monotonic()
    (rc_slow, out_slow), (rc_quick, out_quick) = fc.run_bounded(
        [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
         [sys.executable, "-c", "print('done')"]], seconds=3)
    assert time.monotonic() - t0 < 20
    assert rc_slow is None and "started" in out_slow
    assert rc_quick == 0 and out_quick.strip() == "done"


def test_compile_ahead_gives_each_worker_every_nth_case_bf16_first(tmp_path, monkeypatch):
    calls = []

    def fake_run_bounded(argvs, seconds):
        calls.append((argvs, seconds))
        return [(0, "warm: case 0 x\nwarm: case 3 x\n"), (None, "warm: case 1 x\n"), (1, "Traceback\nOSError: boom\n")]

    monkeypatch.setattr(fc, "run_bounded", fake_run_bounded)
    monkeypatch.setattr(fc, "DRY_RUN", False)
    log = tmp_path / "correctness.log"
    fc.compile_ahead("triton", tmp_path, log, workers=3, seconds=45)
    (argvs, seconds), = calls
    n = len(list(fc.correctness_cases("triton")))
    shares = [[int(i) for i in argv[argv.index("--cases") + 1].split(",")] for argv in argvs]
    assert seconds == 45 and sorted(i for share in shares for i in share) == list(range(n))
    assert [share[0] for share in shares] == [0, 1, 2]  # each starts with the stage's first (bf16) cases
    assert all(argv[2] == "warm" and argv[argv.index("--backend") + 1] == "triton" for argv in argvs)
    text = log.read_text()
    assert f"3 processes ran 3 of {n} cases" in text and "1 cut off at 45 s" in text and "OSError: boom" in text


def test_compile_ahead_is_skipped_in_the_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "run_bounded", lambda *a: pytest.fail("no worker in a dry run"))
    monkeypatch.setattr(fc, "DRY_RUN", True)
    fc.compile_ahead("triton", tmp_path, tmp_path / "c.log", workers=16, seconds=60)
    assert "skipped: dry run" in (tmp_path / "c.log").read_text()


def test_a_warm_worker_runs_its_cases_and_reports_each(tmp_path, capsys):
    cases = list(fc.correctness_cases("reference"))
    small = [i for i, (d, f, shape) in enumerate(cases) if shape[0] == 1 and d == "fp32"][:2]
    assert fc.main(["warm", "--backend", "reference", "--cases", ",".join(map(str, small)), "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warm: case ")]
    assert [int(line.split()[2]) for line in lines] == small
    assert not (tmp_path / "bench.json").exists()  # workers write nothing: the checks do


# --------------------------------------------------------------------------- #
# gpu_check.sh: its exit status is the stages' verdict, and its build wait is bounded
# --------------------------------------------------------------------------- #

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for `python` on PATH: logs each call with the knobs the stage set; `setup.py` builds
# (a library where --build-lib says), hangs or fails as SHIM_BUILD says; a first_contact.py stage
# named by SHIM_FAIL fails as first_contact.py does.
SHIM = r'''#!/usr/bin/env bash
echo "$* | AUTOTUNE=${LORA_KERNELS_AUTOTUNE:-} MAX_CONFIGS=${LORA_KERNELS_MAX_CONFIGS:-}" >> "$SHIM_LOG"
case "$1" in
  setup.py)
    case "${SHIM_BUILD:-ok}" in
      hang) echo $$ > "$SHIM_LOG.pid"; exec sleep 300;;
      fail) exit 1;;
    esac
    while [ $# -gt 0 ]; do
      [ "$1" = --build-lib ] && mkdir -p "$2/lora_kernels" && touch "$2/lora_kernels/_C.stand-in.so"
      shift
    done;;
  bench/first_contact.py)
    if [ "$2" = "${SHIM_FAIL:-}" ]; then echo "FAILED: $2: Triton warning: a stand-in"; exit 1; fi;;
esac
exit 0
'''


def _gpu_check(tmp_path, bound_s, total_s, **env):
    """Run `LORA_KERNELS_DRY_RUN=1 bash bench/gpu_check.sh OUT first` with ``env``; (exit status,
    summary.txt, seconds). Past ``bound_s`` the run is killed (with everything it started) and
    the test fails."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    full_env = {**os.environ, "LORA_KERNELS_DRY_RUN": "1", "LORA_KERNELS_CHECK_TOTAL": str(total_s), **env}
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "first"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"gpu_check.sh still ran after {bound_s} s")
    return proc.returncode, (out / "summary.txt").read_text(), time.monotonic() - t0


@pytest.fixture
def shim(tmp_path):
    """PATH with the stand-in python first; its call log."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(SHIM)
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "calls.log"
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SHIM_LOG": str(log)}, log


def test_gpu_check_exits_zero_when_every_stage_passes_with_the_stage_knobs(tmp_path, shim):
    env, log = shim
    rc, summary, _ = _gpu_check(tmp_path, bound_s=60, total_s=60, **env)
    assert rc == 0, summary
    assert summary.rstrip().splitlines()[-1] == "result: ok", summary
    calls = log.read_text().splitlines()
    stages = [c.split()[1] for c in calls if c.startswith("bench/first_contact.py")]
    assert stages[:3] == ["env", "correctness", "headline"], calls
    correctness = next(c for c in calls if c.startswith("bench/first_contact.py correctness --backend triton"))
    assert "AUTOTUNE=0 " in correctness and "--warm-seconds" in correctness
    headline = next(c for c in calls if c.startswith("bench/first_contact.py headline"))
    assert headline.endswith("MAX_CONFIGS=2"), headline
    assert any(c.startswith("setup.py") for c in calls)
    assert "build " in summary and "cuda-correct" in summary  # the build joined, its stages ran


def test_gpu_check_exits_nonzero_and_names_a_failed_stage(tmp_path, shim):
    env, _ = shim
    rc, summary, _ = _gpu_check(tmp_path, bound_s=60, total_s=60, SHIM_FAIL="correctness", **env)
    assert rc == 1, summary
    assert "    FAILED: correctness: Triton warning: a stand-in" in summary
    # (the stand-in fails the cuda backend's correctness call too)
    assert summary.rstrip().splitlines()[-1] == "result: FAILED: correctness cuda-correct", summary


def test_gpu_check_exits_nonzero_when_torch_cannot_be_imported(tmp_path):
    """Every stage fails at `import torch` (as on the machine whose torch was broken): the script
    must say so in its exit status, within its time budget."""
    import os

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is hidden by this test')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    rc, summary, secs = _gpu_check(tmp_path, bound_s=120, total_s=60, PYTHONPATH=path)
    assert rc == 1, summary
    stages = [line for line in summary.splitlines() if " budget " in line and "measured" in line]
    assert len(stages) == 6 and all("rc=0" not in line for line in stages), summary
    assert summary.rstrip().splitlines()[-1] == "result: FAILED: env correctness headline build extra train-step"


def test_gpu_check_cuts_off_a_hanging_build_and_ends_it(tmp_path, shim):
    import os
    import time

    env, log = shim
    rc, summary, secs = _gpu_check(tmp_path, bound_s=90, total_s=57, SHIM_BUILD="hang", **env)
    assert rc == 1, summary
    build = next(line for line in summary.splitlines() if line.startswith("build "))
    assert "rc=124" in build and "cut off" in build, summary
    assert "result: FAILED: build" in summary
    assert secs < 45, secs  # 57 x 3 s of stages, less 55 x 3 s kept for the cuda stages: ~5 s of waiting
    pid = int(Path(f"{log}.pid").read_text())
    for _ in range(50):  # the build's `sleep` is gone (the group of its `timeout` was ended)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hanging build (pid {pid}) outlived the script")


def test_the_train_step_stage_runs_under_the_same_check(tmp_path, monkeypatch, capsys):
    import warnings

    import triton

    from bench import train_step

    seen = []

    def main(argv):
        seen.append(argv)
        warnings.warn_explicit("a config spills", UserWarning, filename=triton.__file__, lineno=1)
        return 0

    monkeypatch.setattr(train_step, "main", main)
    assert fc.main(["train-step", "--out", str(tmp_path), "--", "--config", "tiny", "--steps", "5"]) == 1
    assert seen == [["--config", "tiny", "--steps", "5"]]
    assert "FAILED: train-step: Triton warning: UserWarning: a config spills" in capsys.readouterr().err
