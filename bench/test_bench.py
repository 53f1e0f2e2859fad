"""pytest-benchmark regression set: a few representative shapes per provider.

    pytest bench/test_bench.py --benchmark-autosave          # record a baseline (.benchmarks/)
    pytest bench/test_bench.py --benchmark-compare            # compare with the last saved run
    pytest bench -q --benchmark-disable                       # smoke: run each case once

On a GPU the shapes are Llama-3-8B projections; on the CPU tiny ones (the times
then mean nothing). Providers that cannot run here are skipped with the reason.
Benchmarks are grouped by mode and shape, so a comparison lists the providers
of one case side by side. The full suite with ratios and targets is bench/run.py.
"""

from __future__ import annotations

import pytest
import torch

from bench import providers as prov
from bench import shapes, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16

if ON_GPU:  # (name, tokens, in, out, r)
    SHAPES = [("q", 8192, 4096, 4096, 16), ("gate", 2048, 4096, 14336, 16), ("down", 512, 14336, 4096, 64)]
else:
    SHAPES = [("tiny", 64, 128, 96, 8)]
# (mode, dropout)
MODES = [("fwd", 0.0), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1), ("merge", 0.0)]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On the CPU, one torch thread: two threads on a busy machine make the times erratic."""
    if ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _case(shape, dropout: float) -> shapes.Case:
    name, tokens, k, n, r = shape
    return shapes.Case(shapes.Layer(name, k, n), tokens, r, dropout)


def _timed_fn(built: prov.Built, mode: str, case: shapes.Case, setup: prov.Setup):
    """The function pytest-benchmark calls: rotates inputs, synchronizes on a GPU."""
    m, k, n = case.tokens, case.layer.in_features, case.layer.out_features
    if mode == "merge":
        w0 = setup.weight.detach()
        sets = [w0.clone() for _ in range(timing.rotation_count(w0.numel() * w0.element_size(), DEVICE))]

        def run(i):
            with torch.no_grad():
                built.merge(sets[i])
    else:
        count = timing.rotation_count(2 * m * (k + n), DEVICE)
        xs = [torch.randn(m, k, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(count)]
        dys = [torch.randn(m, n, device=DEVICE, dtype=DTYPE) for _ in range(count)]
        wrt = built.trainable

        def run(i):
            y = built.forward(xs[i])
            if mode == "fwd+bwd":  # autograd.grad: nothing accumulates between rounds
                torch.autograd.grad(y, [xs[i], *wrt], dys[i])
        sets = xs
    rot = timing.Rotation(len(sets))

    def fn():
        run(rot.next())
        if ON_GPU:
            torch.cuda.synchronize()

    return fn


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}-M{s[1]}-r{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("mode,dropout", MODES, ids=[f"{m}-p{p:g}" for m, p in MODES])
@pytest.mark.parametrize("provider", prov.DEFAULT_PROVIDERS)
def test_latency(benchmark, provider, mode, dropout, shape):
    case = _case(shape, dropout)
    why = prov.unavailable_reason(provider, DEVICE) or prov.skip_reason(provider, mode, case)
    if why:
        pytest.skip(why)
    if provider == "compile":
        torch._dynamo.reset()  # else the recompile limit would turn later cases back to eager
    torch.manual_seed(0)
    setup = prov.make_setup(case, DEVICE, DTYPE)
    built = prov.build(provider, setup)
    fn = _timed_fn(built, mode, case, setup)
    fn()  # compile / autotune outside the measurement
    benchmark.group = f"{mode} p={dropout:g} {shape[0]} M={shape[1]} r={shape[4]}"
    benchmark.extra_info.update(provider=provider, device=str(DEVICE), dtype=str(DTYPE))
    benchmark(fn)
