"""The cost model: launch formulas, device table, plan choice, and the table in docs/cost_model.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from lora_kernels import backends
from lora_kernels import cost_model as cm

BF16 = torch.bfloat16
DOC = Path(__file__).resolve().parent.parent / "docs" / "cost_model.md"


def _shape(M=8192, K=4096, N=4096, r=16, dropout=False, e=2):
    return cm.Shape(M, K, N, r, e, dropout)


def test_frozen_layer_is_one_gemm_each_way():
    s = _shape(M=7, K=65, N=33)
    (fwd,) = cm.forward_launches("frozen", s)
    assert fwd.flops == 2 * 7 * 65 * 33
    assert fwd.bytes == 2 * (7 * 65 + 33 * 65 + 7 * 33)  # x, W0, y
    (bwd,) = cm.backward_launches("frozen", s)
    assert bwd.flops == fwd.flops and bwd.bytes == 2 * (7 * 33 + 33 * 65 + 7 * 65)  # dy, W0, dx
    assert cm.backward_launches("frozen", s, need_grad_x=False) == []


def test_launch_counts_of_our_plans():
    s = _shape()
    assert len(cm.forward_launches("fused", s)) == 1
    assert len(cm.forward_launches("two_pass", s)) == 2
    assert len(cm.backward_launches("auto", s)) == 2  # dx GEMM + ordered reduction
    assert len(cm.backward_launches("auto", s, backward="g_pass")) == 3  # thin g pass, dx GEMM, reduction
    assert cm.backward_launches("auto", s, False, "g_pass") == cm.backward_launches("auto", s, False)
    assert len(cm.backward_launches("auto", s, need_grad_x=False)) == 2  # one pass over dy and x, reduction


def test_fused_forward_extra_work_is_the_redundant_xa():
    M, K, N, r = 1000, 300, 700, 16
    s = _shape(M, K, N, r)
    (fused,) = cm.forward_launches("fused", s)
    col_blocks = math.ceil(N / cm.DEFAULT_TILING.block_n)
    assert fused.flops == 2 * M * N * K + 2 * M * K * r * col_blocks + 2 * M * N * r
    (frozen,) = cm.forward_launches("frozen", s)
    assert fused.bytes - frozen.bytes == 2 * (K * r + N * r + M * r)  # A, B, and xa stored once
    thin, gemm = cm.forward_launches("two_pass", s)
    assert thin.bytes == 2 * (M * K + K * r + M * r)  # the second read of x
    assert fused.philox == 0 and thin.philox == 0
    sd = _shape(M, K, N, r, dropout=True)
    (fused_d,) = cm.forward_launches("fused", sd)
    thin_d, _ = cm.forward_launches("two_pass", sd)
    assert thin_d.philox == M * K / 4 and fused_d.philox == M * K / 4 * col_blocks


def test_backward_partials_scale_with_run_length():
    M, K, N, r = 8192, 4096, 4096, 16
    short = cm.Shape(M, K, N, r, 2, False, cm.Tiling(run_length=1))
    long = cm.Shape(M, K, N, r, 2, False, cm.Tiling(run_length=64))
    runs_short, runs_long = math.ceil(M / 128), 1
    red_s, red_l = cm.backward_launches("auto", short)[1], cm.backward_launches("auto", long)[1]
    assert red_s.bytes == 4 * runs_short * (N + K) * r + 2 * (N + K) * r
    assert red_l.bytes == 4 * runs_long * (N + K) * r + 2 * (N + K) * r


def test_launch_time_is_a_roofline_plus_a_gap():
    spec = cm.DeviceSpec("toy", tensor_flops=1e12, fp32_flops=1e11, fp64_flops=1e10, simt_ops=1e12,
                         bandwidth=1e9, sms=4, launch_s=1e-6)
    compute_bound = cm.Launch("c", flops=1e12, bytes=1.0)
    assert compute_bound.time(spec, BF16) == pytest.approx(1.0 + 1e-6)
    assert compute_bound.time(spec, torch.float32) == pytest.approx(10.0 + 1e-6)
    memory_bound = cm.Launch("m", flops=1.0, bytes=1e9)
    assert memory_bound.time(spec, BF16) == pytest.approx(1.0 + 1e-6)
    # 5 tiles on 4 SMs: two waves, 5/8 efficiency.
    assert cm.Launch("w", 1e12, 1.0, tiles=5).time(spec, BF16) == pytest.approx(8 / 5 + 1e-6)
    assert cm.Launch("p", 0.0, 1.0, philox=1e10).time(spec, BF16) == pytest.approx(cm.PHILOX_OPS * 1e-2 + 1e-6)


@pytest.mark.parametrize("name,cap,want", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "H100"),
    ("NVIDIA H100 PCIe", (9, 0), "H100 PCIe"),
    ("NVIDIA H200", (9, 0), "H200"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "A100"),
    ("Some future Ampere", (8, 6), "A100"),
    ("Unknown", (0, 0), "H100"),
])
def test_device_table(name, cap, want):
    assert cm.spec_for(name, cap) is cm.DEVICES[want]


def test_cpu_and_unknown_devices_get_h100_numbers():
    assert cm.device_spec(torch.device("cpu")) is cm.DEVICES["H100"]
    assert cm.device_spec(None) is cm.DEVICES["H100"]
    assert cm.device_spec("A100") is cm.DEVICES["A100"]


def test_choice_is_the_faster_forward_and_is_cached():
    cm._choose_cached.cache_clear()
    for M, K, N, r, p in [(512, 4096, 4096, 16, 0.0), (8192, 4096, 14336, 64, 0.0), (2048, 4096, 4096, 16, 0.1),
                          (1, 7, 65, 1, 0.0)]:
        plan = cm.choose_forward_plan(M, K, N, r, BF16, p, torch.device("cpu"))
        assert plan in cm.FORWARD_PLANS
        times = {pl: cm.predict(M, K, N, r, BF16, p, "fwd", pl).seconds for pl in cm.FORWARD_PLANS}
        assert times[plan] == min(times.values())
        assert cm.predict(M, K, N, r, BF16, p, "fwd", "auto").plan == plan
    cm.choose_forward_plan(512, 4096, 4096, 16, BF16, 0.0, torch.device("cpu"))
    assert cm._choose_cached.cache_info().hits >= 1


def test_choice_follows_the_tradeoff():
    # Redundant Philox in every column block: with dropout the fused forward loses.
    assert cm.choose_forward_plan(8192, 4096, 4096, 16, BF16, 0.1) == "two_pass"
    # The second read of x does not grow with N, the redundant xa work does (∝ N): wide layers split.
    assert cm.choose_forward_plan(8192, 4096, 14336, 64, BF16, 0.0) == "two_pass"
    # Small rank, small N, no dropout: one launch saves more than r/BLOCK_N of tensor work costs.
    assert cm.choose_forward_plan(512, 4096, 4096, 16, BF16, 0.0) == "fused"


def test_forced_forward_plan():
    with cm.forced_forward_plan("two_pass"):
        assert cm.choose_forward_plan(512, 4096, 4096, 16, BF16, 0.0) == "two_pass"
        with cm.forced_forward_plan("fused"):
            assert cm.choose_forward_plan(8192, 4096, 4096, 16, BF16, 0.1) == "fused"
        assert cm.choose_forward_plan(512, 4096, 4096, 16, BF16, 0.0) == "two_pass"
    assert cm.choose_forward_plan(512, 4096, 4096, 16, BF16, 0.0) == "fused"
    with pytest.raises(ValueError, match="forward plan"):
        with cm.forced_forward_plan("three_pass"):
            pass


@pytest.mark.parametrize("kwargs,match", [
    (dict(M=0), "M must be"), (dict(r=1.5), "r must be"), (dict(dropout_p=1.0), "dropout_p"),
    (dict(mode="bwd"), "mode"), (dict(plan="magic"), "plan"), (dict(backward="x"), "backward plan"),
])
def test_predict_refuses_bad_arguments(kwargs, match):
    args = dict(M=64, K=64, N=64, r=4, dtype=BF16, dropout_p=0.0, mode="fwd+bwd", plan="auto")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cm.predict(**args)


def test_predictions_rank_the_providers():
    """The frozen layer is the floor; ours beats both peers (the backward with its better dx launch);
    PEFT's extra elementwise passes cost it more than Unsloth's addmm_."""
    for K, N in cm.TABLE_LAYERS:
        for M in cm.TABLE_TOKENS:
            for r in cm.TABLE_RANKS:
                for p in cm.TABLE_DROPOUTS:
                    for mode in cm.MODES:
                        pr = {pl: cm.predict(M, K, N, r, BF16, p, mode, pl) for pl in cm.PLANS}
                        ours = min(cm.predict(M, K, N, r, BF16, p, mode, backward=b).ratio for b in cm.BACKWARD_PLANS)
                        assert pr["frozen"].ratio == 1.0
                        assert 1.0 < ours < pr["unsloth"].ratio < pr["peft"].ratio, (M, K, N, r, p, mode)


def test_unsloth_prediction_agrees_with_the_issue_measurement():
    """Issue #10 reports the cuBLAS + addmm_ baseline measured on an H100 at M=8192, K=N=4096, r=16:
    1.19× forward and 1.28× forward+backward."""
    assert cm.predict(8192, 4096, 4096, 16, BF16, 0.0, "fwd", "unsloth").ratio == pytest.approx(1.19, abs=0.04)
    assert cm.predict(8192, 4096, 4096, 16, BF16, 0.0, "fwd+bwd", "unsloth").ratio == pytest.approx(1.28, abs=0.04)


def test_host_cost_makes_small_steps_cpu_bound():
    gpu = cm.predict(64, 256, 256, 8, BF16, 0.0, "fwd+bwd", "peft")
    cpu = cm.predict(64, 256, 256, 8, BF16, 0.0, "fwd+bwd", "peft", host_s=1e-3)
    assert cpu.seconds == pytest.approx(gpu.launch_count * 1e-3)
    assert cpu.frozen_seconds == pytest.approx(2e-3)  # two GEMMs
    big = cm.predict(8192, 4096, 4096, 16, BF16, 0.0, "fwd", "frozen", host_s=10e-6)
    assert big.seconds > 10e-6  # GPU-bound: host cost hidden


def test_g_pass_backward_avoids_the_redundant_g_at_high_rank():
    fused = cm.predict(8192, 4096, 4096, 64, BF16, 0.0, "fwd+bwd", backward="fused")
    g_pass = cm.predict(8192, 4096, 4096, 64, BF16, 0.0, "fwd+bwd", backward="g_pass")
    assert g_pass.seconds < fused.seconds and g_pass.launch_count == fused.launch_count + 1
    assert cm.predict(8192, 4096, 4096, 64, BF16, 0.0, "fwd+bwd").seconds == g_pass.seconds  # auto picks it


def test_g_pass_launches():
    M, K, N, r = 1000, 300, 700, 16
    s = _shape(M, K, N, r)
    thin, dx, reduce = cm.backward_launches("auto", s, backward="g_pass")
    fused_dx, fused_reduce = cm.backward_launches("auto", s, backward="fused")
    splits = cm.g_pass_splits(M, N)
    assert splits == 4  # 32 row blocks and 132 SMs: 4 splits of N fill them (700 columns: at most 6)
    g_parts = 4 * splits * M * r  # fp32 partials of g, written here and read by the dx GEMM
    assert thin.flops == 2 * M * N * r and thin.bytes == 2 * (M * N + N * r) + g_parts  # dy read once
    col_blocks = math.ceil(K / cm.DEFAULT_TILING.block_n)
    # The dx GEMM no longer recomputes g per column block; it reads g's partials instead of B.
    assert fused_dx.flops - dx.flops == 2 * M * N * r * col_blocks
    assert dx.bytes - fused_dx.bytes == g_parts
    assert reduce == fused_reduce
    assert cm.g_pass_splits(8192, 4096) == 1 and cm.g_pass_splits(512, 64) == 1


def test_backward_choice_is_the_faster_and_is_cached():
    cm._choose_backward_cached.cache_clear()
    for M, K, N, r, p in [(8192, 4096, 4096, 64, 0.0), (8192, 4096, 4096, 16, 0.0), (512, 4096, 14336, 64, 0.1),
                          (8192, 4096, 14336, 16, 0.1), (1, 7, 65, 1, 0.0)]:
        plan = cm.choose_backward_plan(M, K, N, r, BF16, p, True)
        times = {b: cm.predict(M, K, N, r, BF16, p, "fwd+bwd", backward=b).seconds for b in cm.BACKWARD_PLANS}
        assert times[plan] == min(times.values()), (M, K, N, r, p)
        assert cm.choose_backward_plan(M, K, N, r, BF16, p, False) == "fused"  # no dx GEMM to relieve
    # r/BLOCK_N of the dx GEMM redone per column block at r = 64; a read of dy is cheaper.
    assert cm.choose_backward_plan(8192, 4096, 4096, 64, BF16, 0.0) == "g_pass"
    # At r = 16 and N = 4096 the third launch and the read of dy cost more than 6 % of redundant MMA.
    assert cm.choose_backward_plan(8192, 4096, 4096, 16, BF16, 0.0) == "fused"
    cm.choose_backward_plan(8192, 4096, 4096, 64, BF16, 0.0)
    assert cm._choose_backward_cached.cache_info().hits >= 1


def test_doc_table_is_the_generated_one():
    text = DOC.read_text()
    m = re.search(re.escape(cm.TABLE_BEGIN) + r"\n(.*?)\n" + re.escape(cm.TABLE_END), text, re.S)
    assert m, f"{DOC} lacks the generated table markers"
    assert m.group(1).strip() == cm.table().strip(), (
        "docs/cost_model.md's table is stale: regenerate it with `python -m lora_kernels.cost_model --table`")


def test_cli(capsys):
    assert cm.main(["--launches", "512,4096,4096,16,0.1"]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "two_pass" in out and "µs" in out and "x⊙D (native_dropout)" in out
    assert cm.main(["--table", "--device", "A100"]) == 0
    assert "A100" in capsys.readouterr().out


# --------------------------------------------------------------------------- #
# The Triton path makes the launches the model counts
# --------------------------------------------------------------------------- #

TRITON_WHY = backends.unavailable_reason("triton", DEVICE)


@pytest.mark.skipif(bool(TRITON_WHY), reason=TRITON_WHY or "available")
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("plan", ["fused", "two_pass"])
def test_triton_launches_match_the_model(plan, p):
    """Steady state: 1 launch per forward (fused) or 2 (two_pass), 2 per backward, as the model has
    them; the only torch kernel is the dropout seed draw (no zero gradient for xa: ops.setup_context
    does not materialise it)."""
    from bench import host_overhead

    M, K, N, r = 7, 65, 33, 4
    layer, x, dy = host_overhead.make_layer(M, K, N, r, p, DEVICE, torch.float32)
    n = host_overhead.launches_per_call(layer, x, dy, plan)
    s = cm.Shape(M, K, N, r, 4, p > 0)
    assert len(n["fwd_triton"]) == len(cm.forward_launches(plan, s)) == {"fused": 1, "two_pass": 2}[plan], n
    assert len(n["bwd_triton"]) == len(cm.backward_launches(plan, s)) == 2, n
    assert n["fwd_torch"] == (["randint"] if p else []), n  # functional.draw_seed, on the device
    assert n["bwd_torch"] == [], n


@pytest.mark.skipif(bool(TRITON_WHY), reason=TRITON_WHY or "available")
def test_launch_counter_counts_and_suppresses_any_triton_kernel():
    import triton
    import triton.language as tl

    from bench import host_overhead

    @triton.jit
    def _fill(ptr, value, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offs, value, mask=offs < n)

    out = torch.zeros(40, device=DEVICE)
    with host_overhead.counting() as c:
        _fill[(3,)](out, 2.0, 40, BLOCK=16)
        out.add_(1.0)
    assert c.triton == ["_fill"] and c.torch == ["add_"] and bool((out == 3.0).all())
    with host_overhead.counting(suppress=True) as c:
        _fill[(3,)](out, 5.0, 40, BLOCK=16)
    assert c.triton == ["_fill"] and bool((out == 3.0).all())  # not run
    _fill[(3,)](out, 7.0, 40, BLOCK=16)  # the class is restored
    assert bool((out == 7.0).all())


def test_the_models_rank_limits_are_the_kernels():
    """The model picks among the plans that can run: its rank limits are the launchers'."""
    triton_ops = pytest.importorskip("lora_kernels.triton_ops")
    assert (cm.FUSED_MAX_RANK, cm.RANK_CHUNK) == (triton_ops.FUSED_MAX_RANK, triton_ops.RANK_CHUNK)
    for M, K, N in [(8192, 4096, 4096), (512, 4096, 14336), (7, 65, 33)]:
        for r in (8, 64, 65, 128, 256):
            for p in (0.0, 0.1):
                fwd = cm.choose_forward_plan(M, K, N, r, BF16, p)
                assert fwd == triton_ops.forward_plan(M, K, N, r, BF16, p, None), (M, K, N, r, p)
                assert r <= cm.FUSED_MAX_RANK or fwd == "two_pass"
                for need_dx in (True, False):
                    bwd = cm.choose_backward_plan(M, K, N, r, BF16, p, need_dx)
                    assert bwd == triton_ops.backward_plan(M, K, N, r, BF16, p, need_dx, None), (M, K, N, r, p)
                    assert r <= cm.RANK_CHUNK or bwd == "g_pass"


@pytest.mark.skipif(bool(TRITON_WHY), reason=TRITON_WHY or "available")
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no-dx"])
def test_triton_launches_match_the_model_above_the_rank_chunk(need_dx):
    """r = 72 (two rank chunks): the model's launches are the ones that run, with or without dx
    (the g pass, the backward kernel, the reduction)."""
    from bench import host_overhead

    M, K, N, r, p = 7, 40, 33, 72, 0.1
    layer, x, dy = host_overhead.make_layer(M, K, N, r, p, DEVICE, torch.float32)
    x.requires_grad_(need_dx)
    n = host_overhead.launches_per_call(layer, x, dy)
    s = cm.Shape(M, K, N, r, 4, True)
    plan = cm.choose_forward_plan(M, K, N, r, torch.float32, p)
    backward = cm.choose_backward_plan(M, K, N, r, torch.float32, p, need_dx)
    assert (plan, backward) == ("two_pass", "g_pass")
    assert len(n["fwd_triton"]) == len(cm.forward_launches(plan, s)) == 2, n
    assert len(n["bwd_triton"]) == len(cm.backward_launches(plan, s, need_dx, backward)) == 3, n
