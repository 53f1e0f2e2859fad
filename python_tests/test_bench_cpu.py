"""The CPU run of ``python bench/run.py`` (bench/cpu_tables.py): saved bytes counted exactly and as on a
GPU, the Triton path really run, host overhead beside PEFT's and nn.Linear's, the cost model's H100
predictions in a table of their own, and no prediction in a cell of a CPU time."""

import json
import re

import pytest
import torch

from conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="the CPU run of the benchmark (a GPU runs the timed suite)")
pytest.importorskip("peft")

from bench import cpu_tables, report, run, shapes  # noqa: E402
from lora_kernels import backends, cost_model  # noqa: E402

M, K, N, R = 24, 40, 32, 4


@pytest.fixture(autouse=True)
def _threads():
    """run.main sets one torch thread for its CPU run: give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _case(p: float) -> shapes.Case:
    return shapes.Case(shapes.Layer("t", K, N), M, R, p)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_per_layer_are_the_analytic_count(p):
    """Ours keeps x and x·Aᵀ (the mask is regenerated); PEFT also keeps, with dropout, the dropped x and
    the mask (a bool, as on a GPU), while at p = 0 its dropped x is x itself."""
    bf16 = 2
    ours = cpu_tables.layer_saved_bytes("triton", _case(p))
    peft = cpu_tables.layer_saved_bytes("peft", _case(p))
    reference = cpu_tables.layer_saved_bytes("reference", _case(p))
    base = cpu_tables.layer_saved_bytes("base", _case(p))
    bound = (M * K + M * R) * bf16
    assert cpu_tables.bound_bytes(_case(p), torch.bfloat16) == bound
    assert ours["saved_bytes"] == reference["saved_bytes"] == bound
    assert ours["launches"] >= 1  # the package's Triton path ran (its launches stubbed)
    # with dropout PEFT keeps the dropped x (M·K·2) and a bool mask (M·K) where it kept x
    assert peft["saved_bytes"] == bound + (M * K if p else 0)
    assert ours["saved_bytes"] <= peft["saved_bytes"]
    assert base["saved_bytes"] == 0  # frozen W0: dx = dy W0 needs only the parameter


def test_dropout_is_counted_as_on_a_gpu():
    """On the CPU, ATen's dropout saves its mask in x's dtype; counted as on a GPU it is a bool mask."""
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    layer = torch.nn.Dropout(0.5).train()
    cpu, _ = cpu_tables.timing.saved_activation_bytes(lambda: layer(x), [])
    gpu, _ = cpu_tables.count_saved(lambda: layer(x), [], stub=False)
    assert (cpu, gpu) == (M * K * 2, M * K)


@pytest.mark.skipif(bool(backends.unavailable_reason("triton", torch.device("cpu"))), reason="no Triton interpreter")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_interpreter_check_runs_the_kernels_and_the_stubbed_count_is_theirs(p):
    check = cpu_tables.interpreter_check(shapes.Case(shapes.Layer("c", 64, 48), 32, 8, p))
    assert check["saved_real"] == check["saved_stubbed"] == (32 * 64 + 32 * 8) * 2
    if p == 0:  # with dropout the masks differ from the formula's: finiteness only (run.check_provider)
        assert 0 < check["rel_err"] <= check["tolerance"]
    else:
        assert check["rel_err"] == 0.0


def test_saved_bytes_per_llama_step():
    step = cpu_tables.saved_per_step("tiny", dropouts=(0.0, 0.1), r=4)
    by_p = {row["dropout"]: {k: v["saved_bytes"] for k, v in row["providers"].items()} for row in step["rows"]}
    for p, b in by_p.items():
        assert b["frozen"] < b["lora_kernels"] == b["peft_accel"] <= b["peft"], p
    assert by_p[0.1]["lora_kernels"] == by_p[0.0]["lora_kernels"]  # no mask kept
    assert by_p[0.1]["peft"] > by_p[0.0]["peft"]
    assert all(row["providers"]["lora_kernels"]["launches"] >= 7 * 2 for row in step["rows"])  # each of 2 × 7 layers


def test_host_tables_measure_ours_beside_peft_and_nn_linear():
    call = cpu_tables.host_per_call(reps=20, repeats=1)
    assert {"nn.Linear (frozen)", "PEFT lora.Linear", "lora_kernels p=0", "lora_kernels p=0.1"} <= set(call["rows"])
    assert all(0 < t["fwd"] < t["fwd_bwd"] for t in call["rows"].values())
    step = cpu_tables.host_per_step(steps=2, warmup=1)
    assert set(step["rows"]) == set(cpu_tables.STEP_PROVIDERS) and all(v > 0 for v in step["rows"].values())
    assert step["launches"] > 0  # ours ran its Triton path, every launch stubbed
    text = report.host_call_table(call).text() + report.host_step_table(step).text()
    assert "launches stubbed" in text and "µs" in text


def test_predictions_are_an_h100_table_of_their_own():
    pred = cpu_tables.predictions()
    table = report.predicted_table(pred)
    assert "predictions for an H100 SXM (not measured)" in table.title
    row = next(r for r in pred["rows"] if r["mode"] == "fwd+bwd")
    want = cost_model.predict(row["tokens"], row["in"], row["out"], row["r"], torch.bfloat16, row["dropout"],
                              "fwd+bwd", "peft", cost_model.DEVICES["H100"]).ratio
    assert row["ratios"]["peft"] == want and row["in"] == 4096  # Llama-3-8B's shapes, not the CPU's


def test_cpu_run_writes_labelled_tables_and_no_prediction_beside_a_cpu_time(tmp_path, capsys):
    rc = run.main(["--layers", "k", "--tokens", "16", "--ranks", "4", "--host-reps", "10", "--host-repeats", "1",
                   "--step-steps", "1", "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    for label in ("[check]", "[saved] activation memory saved for backward per layer",
                  "[saved] activation memory saved for backward per training step", "[host] host time per call",
                  "[host] host time per training step", "[predicted] the cost model's predictions for an H100"):
        assert label in out
    assert "[fwd]" not in out and "Timing:" not in out  # CPU timings only when asked for
    doc = json.loads((tmp_path / "results.json").read_text())
    layer = doc["cpu"]["saved_layer"]["rows"]
    assert [r["providers"]["triton"]["status"] for r in layer] == ["ok", "ok"]  # p = 0 and 0.1
    assert doc["results"] == [] and not (tmp_path / "results.png").exists()
    assert "[predicted]" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="--cpu-timings"):
        run.make_config(run.parse_args(["--modes", "fwd", "--device", "cpu"]))


def test_cpu_timings_show_their_spread_and_no_prediction(tmp_path, capsys):
    config = run.make_config(run.parse_args(["--cpu-timings", "--layers", "k", "--tokens", "16", "--ranks", "4",
                                             "--dropout", "0", "--modes", "fwd", "--providers", "eager,reference",
                                             "--warmup", "1", "--reps", "2", "--device", "cpu"]))
    results = run.run_suite(config, progress_enabled=False)
    assert {r["provider"] for r in results} == {"base", "eager", "reference"}
    assert not any("predicted_ratio" in r for r in results)
    text = "\n".join(t.text() for t in report.tables(results, [], config["providers"], False))
    assert "median ms [p20-p80]" in text and re.search(r"\d\.\d{4} \[\d\.\d{4}-\d\.\d{4}\]", text)
    assert not re.search(r"\d\.\d{3} \(\d\.\d{3}\)", text)  # no "1.394 (3.334)": prediction beside a CPU time
