"""DDP and FSDP2 on two CPU processes (gloo): LoRA gradients equal a single-process run; merge under FSDP2.

Each mode spawns two processes once (module-scoped fixture) on a free localhost
port, with a bounded wait; rank 0 writes what it saw to a file the tests read.
"""

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora_kernels as lk

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)

WORLD = 2
TIMEOUT_S = 120
BATCH = 8  # split evenly over the ranks


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 6))
    lk.apply_lora(model, r"[02]", r=4, alpha=8, backend="reference")
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    return model


def make_control():
    """The same network without LoRA: how this torch's FSDP2 reduces plain nn.Linear gradients."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 6))


def make_batch():
    return torch.randn(BATCH, 12, generator=torch.Generator().manual_seed(1))


def single_process():
    """Gradients of the LoRA factors and the merged weights, without any process group."""
    model = make_model()
    model(make_batch()).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for m in model.modules():
        if isinstance(m, lk.LoRALinear):
            m.merge()
    return grads, {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}


def _worker(rank, port, mode, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {}
    try:
        model = make_model()
        x = make_batch()[rank::WORLD]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
            wrapped(x).square().mean().backward()
            result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            for m in model.modules():  # plain tensors on every rank: merge is local and identical
                if isinstance(m, lk.LoRALinear):
                    m.merge()
            result["merged"] = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.fsdp import fully_shard

            for m in model.modules():
                if isinstance(m, lk.LoRALinear):
                    fully_shard(m)
            fully_shard(model)
            model(x).square().mean().backward()
            result["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
            control = make_control()
            for m in control:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(control)
            control(x).square().mean().backward()
            result["control"] = control[2].weight.grad.full_tensor()
            before = model[0].weight.full_tensor().clone()
            try:
                model[0].merge()
                result["merge"] = "merged"
            except Exception as exc:  # noqa: BLE001 - the refusal is what the test inspects
                result["merge"] = f"{type(exc).__name__}: {exc}"
            result["weight_unchanged"] = torch.equal(model[0].weight.full_tensor(), before)
            result["merged_flag"] = model[0].merged
            # The supported way to merge: gather a full state dict, merge in an unsharded copy.
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                plain = make_model()
                plain.load_state_dict(full)
                for m in plain.modules():
                    if isinstance(m, lk.LoRALinear):
                        m.merge()
                result["merged"] = {k: v.clone() for k, v in plain.state_dict().items() if k.endswith(".weight")}
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    if rank == 0:
        torch.save(result, out_path + ".tmp")
        os.replace(out_path + ".tmp", out_path)  # complete, or absent
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(mode, tmp_path):
    """Run ``_worker`` on two spawned processes; returns what rank 0 recorded.

    The result file is judged, not the exit codes: it is written once every
    collective has finished.  NOTE: gloo's teardown occasionally aborts a process
    after that point ("terminate called without an active exception"), which
    says nothing about the computation tested here.
    """
    out = tmp_path / f"{mode}.pt"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, mode, str(out)), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if not out.exists():
        codes = [p.exitcode for p in procs]
        pytest.fail(f"{mode}: no result from rank 0 (exit codes {codes}"
                    f"{', timed out after %d s' % TIMEOUT_S if alive else ''})")
    result = torch.load(out, weights_only=False)
    assert "error" not in result, result.get("error")
    return result


@pytest.fixture(scope="module")
def reference():
    return single_process()


_RUNS = {}


def _run(mode, tmp_path_factory):
    if mode not in _RUNS:  # one pair of processes per mode for the whole module
        _RUNS[mode] = run_two_processes(mode, tmp_path_factory.mktemp(mode))
    return _RUNS[mode]


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def distributed(request, tmp_path_factory):
    return request.param, _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _run("fsdp2", tmp_path_factory)


def _reduction_scale(result):
    """1 where gradients are averaged over ranks (DDP; FSDP2 on most torch versions).

    NOTE: FSDP2 over gloo on torch 2.8 sums the ranks' gradients instead of averaging them, for a
    plain nn.Linear as much as for LoRA. The control network run beside the LoRA model says which
    reduction this torch performs, and the LoRA gradients must follow it exactly.
    """
    if "control" not in result:
        return 1.0
    control = make_control()
    control(make_batch()).square().mean().backward()
    scale = (result["control"].norm() / control[2].weight.grad.norm()).item()
    assert abs(scale - 1.0) < 1e-5 or abs(scale - WORLD) < 1e-5, f"unexpected reduction of the control: x{scale}"
    return round(scale)


def test_lora_gradients_equal_single_process(distributed, reference):
    mode, result = distributed
    grads, _ = reference
    assert set(result["grads"]) == set(grads) == {"0.lora_A.weight", "0.lora_B.weight",
                                                  "2.lora_A.weight", "2.lora_B.weight"}
    scale = _reduction_scale(result)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad * scale, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")


def test_merged_weights_equal_single_process(distributed, reference):
    """DDP merges in place on every rank; FSDP2 through a gathered full state dict on rank 0."""
    mode, result = distributed
    _, merged = reference
    assert set(result["merged"]) == set(merged)
    for name, w in merged.items():
        torch.testing.assert_close(result["merged"][name], w, rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")


def test_merge_on_sharded_parameters_is_refused_and_changes_nothing(fsdp2):
    assert fsdp2["merge"] != "merged"
    assert fsdp2["weight_unchanged"] and not fsdp2["merged_flag"]


def test_merge_refusal_under_fsdp2_names_the_problem(fsdp2):
    assert "FSDP" in fsdp2["merge"] and "full_state_dict" in fsdp2["merge"], fsdp2["merge"]
