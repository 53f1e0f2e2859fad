"""accelerate_peft under DeepSpeed ZeRO-2/3, FSDP1 and accelerate's device maps.

Each engine run trains a tiny PEFT Llama (LoRA on q/v/down, dropout 0) for a few steps twice in
the same processes: plain PEFT, then the same model accelerated (before or after the engine
wraps it). The fused path must be taken (every LoRA call counted, ``report.current()`` all
"fused"), the losses must equal plain PEFT's step by step, and the adapter saved with
``save_pretrained`` must reload. Multi-process runs: two CPU ranks over gloo, spawned once per
engine (the harness of test_distributed.py), rank 0 writes what it saw to a file.
"""

import functools
import importlib.util
import os
import time
import traceback

import pytest
import torch

from test_distributed import WORLD, _free_port

TIMEOUT_S = 300  # one pair of processes runs up to six trainings
STEPS = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed (pip install accelerate)")
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None
                                or importlib.util.find_spec("transformers") is None,
                                reason="peft and transformers are needed")


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=64))


def peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # B = 0 would hide a wrong A gradient in the first step
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch(rank):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(10 + rank))


class Counter:
    """Counts the fused calls ``accelerate_peft`` makes."""

    def __init__(self):
        from lora_kernels import peft_accel

        self.calls, self._real, self._mod = 0, peft_accel.lora_linear, peft_accel
        peft_accel.lora_linear = self._count

    def _count(self, *a, **k):
        self.calls += 1
        return self._real(*a, **k)

    def close(self):
        self._mod.lora_linear = self._real


# --------------------------------------------------------------------------- #
# DeepSpeed
# --------------------------------------------------------------------------- #


def ds_config(stage):
    # NOTE: two micro-steps per optimizer step: the backward re-gathers and the gradients accumulate
    # in ZeRO's partitioned buffers across them (where a ZeRO-3 leaf module failed).
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def _deepspeed_run(stage, rank, accel, out):
    """One training run under ``deepspeed.initialize``; ``accel``: None, "before" or "after"."""
    import importlib

    import deepspeed
    import lora_kernels as lk

    # NOTE: DeepSpeed's CPU accelerator JIT-compiles a shared-memory collective op (a C++ build of
    # a minute or more on two cores) on first use; gloo carries the same collectives.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    model = peft_model()
    report = lk.accelerate_peft(model, backend="reference") if accel == "before" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    if accel == "after":
        report = lk.accelerate_peft(model, backend="reference")
    counter = Counter()
    losses = []
    try:
        ids = batch(rank)
        for step in range(2 * STEPS):
            micro = ids[step % 2:step % 2 + 1]
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    finally:
        counter.close()
    result = _result(losses, counter, report)
    # The adapter: gather the LoRA factors (ZeRO-3 partitions them), save on rank 0.
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters(lora, enabled=stage == 3):
        result["adapter"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        if rank == 0:
            model.save_pretrained(out)
    return result


def _result(losses, counter, report):
    """A run's record: its losses, the fused calls counted, and what ran per layer (with a report)."""
    result = {"losses": losses, "calls": counter.calls, "micro_steps": len(losses)}
    if report is not None:
        result["current"] = report.current()
    return result


def _train(model, rank, report):
    """STEPS optimizer steps of the (FSDP-wrapped) ``model`` on this rank's batch: :func:`_result`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    counter = Counter()
    losses = []
    try:
        ids = batch(rank)
        for _ in range(STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        counter.close()
    return _result(losses, counter, report)


def _save_full_state(result, state, rank, out):
    """On rank 0: the LoRA factors of the full (unsharded) ``state`` into ``result["adapter"]``,
    and saved through an unsharded copy of the model."""
    if rank == 0:
        result["adapter"] = {k: v.clone() for k, v in state.items() if "lora_" in k}
        copy = peft_model()
        copy.load_state_dict(result["adapter"], strict=False)
        copy.save_pretrained(out)


# --------------------------------------------------------------------------- #
# FSDP1
# --------------------------------------------------------------------------- #


def _fsdp1_run(use_orig_params, rank, accel, out):
    """One training run under FSDP1 wrapped as the Trainer wraps a PEFT model (peft's
    ``fsdp_auto_wrap_policy``: each decoder layer a unit, each trainable LoRA factor a unit)."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

    import lora_kernels as lk

    model = peft_model()
    report = lk.accelerate_peft(model, backend="reference") if accel == "before" else None
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=use_orig_params,
                   device_id=torch.device("cpu"))
    if accel == "after":
        report = lk.accelerate_peft(wrapped, backend="reference")
    result = _train(wrapped, rank, report)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        state = wrapped.state_dict()
    # NOTE: saved from an unsharded copy, as for merging under FSDP (docs/integration.md): PEFT's
    # save_pretrained(state_dict=...) on the FSDP1-wrapped model wrote an empty adapter.
    _save_full_state(result, state, rank, out)
    return result


def _fsdp2_run(rank, accel, out):
    """FSDP2: each trainable LoRA factor, each decoder layer and the root sharded on their own
    (the units of peft's auto-wrap policy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import lora_kernels as lk

    model = peft_model()
    report = lk.accelerate_peft(model, backend="reference") if accel == "before" else None
    for name, module in model.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            fully_shard(module)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if accel == "after":
        report = lk.accelerate_peft(model, backend="reference")
    result = _train(model, rank, report)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _save_full_state(result, state, rank, out)
    return result


def _trainer_run(rank, accel, out):
    """HF ``Trainer`` on two CPU processes.

    NOTE: not under FSDP: accelerate (1.16) selects FSDP only for GPU-like distributed types (its
    ``AcceleratorState`` leaves ``MULTI_CPU`` out), so on CPUs the Trainer either refuses ``fsdp=``
    ("Using fsdp only works in distributed training") or, with ``use_cpu=True``, wraps the model in
    DDP. The FSDP1 runs above wrap the model as the Trainer would (peft's ``fsdp_auto_wrap_policy``).
    """
    from transformers import Trainer, TrainingArguments

    import lora_kernels as lk

    model = peft_model()
    report = lk.accelerate_peft(model, backend="reference") if accel else None
    data = [{"input_ids": ids, "labels": ids} for ids in batch(0).repeat(STEPS * WORLD, 1)]
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": d["input_ids"][torch.randperm(12, generator=g)]} for d in data]
    data = [dict(d, labels=d["input_ids"]) for d in data]
    args = TrainingArguments(output_dir=out + ".trainer", per_device_train_batch_size=1, max_steps=STEPS,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    counter = Counter()
    try:
        trainer.train()
    finally:
        counter.close()
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "calls": counter.calls,
              "micro_steps": STEPS,
              "wrapped": type(trainer.model_wrapped).__name__}
    if report is not None:
        result["current"] = report.current()
    result["adapter"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.save_model(out)
    return result


def _worker(rank, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {}
    try:
        # Per engine: plain PEFT, then accelerate_peft called before and/or after the engine wraps the
        # model. NOTE: several engines per pair of processes: starting them costs more than a run.
        for engine, (run, variants) in ENGINES[mode].items():
            for variant in (None, *variants):
                key = f"{engine}:{variant or 'peft'}"
                result[key] = run(rank, variant, f"{out_path}.{engine}.{variant}")
                result[key]["save_dir"] = f"{out_path}.{engine}.{variant}"
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    if rank == 0:
        torch.save(result, out_path + ".tmp")
        os.replace(out_path + ".tmp", out_path)
    dist.destroy_process_group()


ENGINES = {
    "deepspeed": {"zero3": (functools.partial(_deepspeed_run, 3), ("before", "after")),
                  "zero2": (functools.partial(_deepspeed_run, 2), ("after",))},
    "fsdp": {"fsdp1_orig": (functools.partial(_fsdp1_run, True), ("after",)),
             "fsdp1_flat": (functools.partial(_fsdp1_run, False), ("before",)),
             "fsdp2": (_fsdp2_run, ("after",))},
    "trainer": {"trainer": (_trainer_run, ("before",))},
}


def run_two_processes(mode, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, mode, str(out)), daemon=True) for rank in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(0.0, start + TIMEOUT_S - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if not out.exists():
        pytest.fail(f"{mode}: no result from rank 0 (exit codes {[p.exitcode for p in procs]}"
                    f"{', timed out after %d s' % TIMEOUT_S if alive else ''})")
    result = torch.load(out, weights_only=False)
    assert "error" not in result, result["error"]
    return result


def check_fused_run(result, engine, variant):
    peft, fused = result[f"{engine}:peft"], result[f"{engine}:{variant}"]
    n_layers = 2 * len(TARGETS)
    assert peft["calls"] == 0
    assert fused["calls"] == fused["micro_steps"] * n_layers, fused["calls"]
    assert len(fused["current"]) == n_layers and set(fused["current"].values()) == {"fused"}, fused["current"]
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(peft["losses"]), rtol=1e-5, atol=1e-6)
    for name, p in peft["adapter"].items():
        torch.testing.assert_close(fused["adapter"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert fused["losses"][-1] < fused["losses"][0]


def check_reload(run):
    from peft import PeftModel

    again = PeftModel.from_pretrained(base_model(), run["save_dir"])
    state = {n: p for n, p in again.named_parameters() if "lora_" in n}
    saved = {n.replace(".default", ""): p for n, p in run["adapter"].items()}
    assert len(state) == len(saved) == 4 * len(TARGETS)
    for name, p in state.items():
        torch.testing.assert_close(p, saved[name.replace(".default", "")], rtol=0, atol=0, msg=name)


_RUNS = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def get(mode):
        if mode not in _RUNS:
            _RUNS[mode] = run_two_processes(mode, tmp_path_factory.mktemp(mode))
        return _RUNS[mode]
    return get


@needs_gloo
@needs_deepspeed
@pytest.mark.extended  # (two processes each: the multi-process engines are the extended tier's)
@pytest.mark.parametrize("engine, variant", [("zero3", "before"), ("zero3", "after"), ("zero2", "after")])
def test_deepspeed_fused_equals_peft(runs, engine, variant):
    result = runs("deepspeed")
    check_fused_run(result, engine, variant)
    check_reload(result[f"{engine}:{variant}"])


# --------------------------------------------------------------------------- #
# accelerate's device maps (one process)
# --------------------------------------------------------------------------- #


def dispatched(tmp_path):
    """The PEFT model dispatched by accelerate: layer 1 (base weights and LoRA factors) offloaded to disk."""
    from accelerate import dispatch_model

    model = peft_model()
    inner = model.base_model.model
    device_map = {f"base_model.model.{n}": "cpu" for n, _ in inner.named_children() if n != "model"}
    device_map.update({f"base_model.model.model.{n}": "cpu" for n, _ in inner.model.named_children() if n != "layers"})
    device_map.update({"base_model.model.model.layers.0": "cpu", "base_model.model.model.layers.1": "disk"})
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))


def loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@needs_accelerate
def test_device_map_with_disk_offload_runs_fused(tmp_path):
    import lora_kernels as lk

    model = dispatched(tmp_path)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer.base_layer.weight.device.type == "meta" and layer.lora_A["default"].weight.device.type == "meta"
    wrapper = layer.forward
    ids = batch(0)
    logits, grads = loss_and_grads(model, ids)          # PEFT's forward under the same hooks
    report = lk.accelerate_peft(model, backend="reference")
    assert set(report.current().values()) == {"fused"}, report.current()
    assert layer.forward is wrapper                     # accelerate's hook on the PEFT layer itself is kept
    counter = Counter()
    try:
        fused_logits, fused_grads = loss_and_grads(model, ids)
    finally:
        counter.close()
    assert counter.calls == 2 * len(TARGETS)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-6)
    # NOTE: offloaded factors are rebuilt from the offload map at each call, so only layer 0's gradients
    # land on the model's parameters, with PEFT as without lora_kernels.
    assert set(fused_grads) == set(grads) and len(grads) == 2 * len(TARGETS)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fused_logits, peft_model()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    report.undo()
    assert layer.forward is wrapper and layer._old_forward.__func__ is type(layer).forward
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)


@needs_accelerate
def test_cpu_offload_hooks_run_fused(tmp_path):
    """``cpu_offload``: every module's weights held in a CPU map, moved in for each call."""
    from accelerate import cpu_offload
    import lora_kernels as lk

    ids = batch(0)
    expected = peft_model()(input_ids=ids).logits
    model = cpu_offload(peft_model(), execution_device="cpu")
    report = lk.accelerate_peft(model, backend="reference")
    assert set(report.current().values()) == {"fused"}, report.current()
    counter = Counter()
    try:
        logits = model(input_ids=ids).logits
    finally:
        counter.close()
    assert counter.calls == 2 * len(TARGETS)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Hooks the fused path does not know keep PEFT's forward
# --------------------------------------------------------------------------- #


def test_unrecognised_hooks_keep_peft_forward_and_are_named():
    import lora_kernels as lk

    model = peft_model()
    report = lk.accelerate_peft(model, backend="reference")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    seen = []

    def my_hook(module, args, output):
        seen.append(output.shape)

    handle = layer.base_layer.register_forward_hook(my_hook)
    ids = batch(0)
    counter = Counter()
    try:
        model(input_ids=ids)
        assert "my_hook" in report.current()[name] and "base_layer" in report.current()[name]
        assert counter.calls == 2 * len(TARGETS) - 1 and len(seen) == 1
        handle.remove()
        layer.lora_A["default"].forward = lambda x: torch.nn.functional.linear(x, layer.lora_A["default"].weight)
        assert "replaced forward" in report.current()[name] and "lora_A" in report.current()[name]
        del layer.lora_A["default"].forward
        assert report.current()[name] == "fused"
    finally:
        counter.close()


@needs_gloo
@needs_accelerate  # peft's fsdp_auto_wrap_policy imports it
@pytest.mark.extended
@pytest.mark.parametrize("engine, variant", [("fsdp1_orig", "after"), ("fsdp1_flat", "before")])
def test_fsdp1_fused_equals_peft(runs, engine, variant):
    """use_orig_params=True and False; before this, the fused call read the units' flat shards."""
    result = runs("fsdp")
    check_fused_run(result, engine, variant)
    check_reload(result[f"{engine}:{variant}"])


@needs_gloo
@needs_accelerate
@pytest.mark.extended
def test_fsdp2_fused_equals_peft(runs):
    """FSDP2's hooks on each LoRA factor: before this, PEFT's forward ran (unrecognised hooks)."""
    result = runs("fsdp")
    check_fused_run(result, "fsdp2", "after")
    check_reload(result["fsdp2:after"])


@needs_gloo
@needs_accelerate  # the Trainer needs it
@pytest.mark.extended
def test_trainer_two_processes_fused_equals_peft(runs):
    result = runs("trainer")
    assert result["trainer:before"]["wrapped"] == "DistributedDataParallel"
    check_fused_run(result, "trainer", "before")
    check_reload(result["trainer:before"])
