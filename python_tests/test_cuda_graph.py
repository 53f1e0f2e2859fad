"""A whole training step (forward, backward, optimizer step) of a LoRALinear stack in a CUDA graph.

On a GPU: the step is captured once and replayed; parameters after the replays equal
eager training's, and with dropout every replay draws a fresh mask (the seed is drawn
on the device inside the graph). On the CPU: the host path of a training step makes no
host synchronisation (no ``.item()``, ``int(tensor)``, ``nonzero``, copies to the host),
which is what capture needs; Triton launches are counted there, not run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEVICE, backend_param, requires_gpu
from lora_kernels import LoRALinear, backends

# aten ops that wait for the device: reading a value on the host, data-dependent shapes, copies to the host.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "tolist", "_assert_async",
            "masked_select", "unique", "_unique2"}


def _stack(backend: str, dropout: float, device, dtype=torch.float32, width=64, r=8, depth=2):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        base = torch.nn.Linear(width, width, bias=True, device=device, dtype=dtype)
        layer = LoRALinear.from_linear(base, r=r, alpha=16.0, dropout=dropout, backend=backend)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0.0, 0.1)  # non-zero: the low-rank path computes
        layers += [layer, torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).train()


def _step(model, opt, x, target):
    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    opt.step()
    return loss


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# Each skips with its reason where it cannot run (conftest.backend_param).
GPU_BACKENDS = [backend_param("triton"), backend_param("cuda")]


@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_captured_training_step_equals_eager(backend):
    model = _stack(backend, 0.0, DEVICE)
    eager = copy.deepcopy(model)
    x = torch.randn(48, 64, device=DEVICE)
    target = torch.randn(48, 64, device=DEVICE)
    opt = torch.optim.SGD(_trainable(model), lr=0.05)
    opt_eager = torch.optim.SGD(_trainable(eager), lr=0.05)

    # Warm up on a side stream (kernel compilation, autotuning, allocator pools), as capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            _step(model, opt, x, target)
            opt_eager.zero_grad(set_to_none=True)
            _step(eager, opt_eager, x, target)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _step(model, opt, x, target)
    # Capture records the step without running it: the replays below are the 4th, 5th, ... steps.
    losses = []
    for _ in range(4):
        graph.replay()
        losses.append(static_loss.item())
        opt_eager.zero_grad(set_to_none=True)
        loss = _step(eager, opt_eager, x, target)
        assert static_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    torch.cuda.synchronize()
    for p, q in zip(_trainable(model), _trainable(eager)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # it trains


@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_each_replay_draws_a_fresh_dropout_mask(backend):
    p = 0.25
    layer = _stack(backend, p, DEVICE, depth=1)[0]
    x = torch.randn(256, 64, device=DEVICE)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append((y - base).clone())  # the low-rank term, s·(x ⊙ D) Aᵀ Bᵀ: depends on the mask
    torch.cuda.synchronize()
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    # Each is a real dropout term: the term without dropout is different from every one of them.
    layer.eval()
    with torch.no_grad():
        full = layer(x) - base
    assert all(not torch.allclose(o, full) for o in outs)


# --------------------------------------------------------------------------- #
# CPU: the host path of a training step never synchronises
# --------------------------------------------------------------------------- #

TRITON_WHY = backends.unavailable_reason("triton", DEVICE)


@pytest.mark.skipif(bool(TRITON_WHY), reason=TRITON_WHY or "available")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_host_path_has_no_sync(dropout):
    from bench import host_overhead

    model = _stack("triton", dropout, DEVICE, width=32, r=4)
    opt = torch.optim.SGD(_trainable(model), lr=0.05)
    x = torch.randn(8, 32, device=DEVICE)
    target = torch.randn(8, 32, device=DEVICE)
    _step(model, opt, x, target)  # warm: caches, autotuner
    opt.zero_grad(set_to_none=True)
    with host_overhead.counting(suppress=True) as c:
        _step(model, opt, x, target)
    syncs = [op for op in c.torch if op in SYNC_OPS]
    assert not syncs, f"host synchronisation on the training-step path: {syncs}"
    # The kernels were reached (and not run): per layer 1-2 forward launches and 2 backward.
    assert 2 * (1 + 2) <= len(c.triton) <= 2 * (2 + 2), c.triton


def test_sync_detection_sees_item():
    from bench import host_overhead

    with host_overhead.counting() as c:
        t = torch.ones(3).sum()
        float(t.item())
        int(t)
    assert [op for op in c.torch if op in SYNC_OPS] == ["_local_scalar_dense", "_local_scalar_dense"]
