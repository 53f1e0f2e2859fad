"""torch.compile and CUDA graphs: opcheck on every op, fullgraph compilation equal to eager, graph capture."""

import pytest
import torch
from torch import nn

import torch._inductor.config  # noqa: F401  (fallback_random, patched below)

import lora_kernels as lk
from lora_kernels import functional, ops
from conftest import ALL_BACKENDS, DEVICE, ON_GPU, requires_gpu

COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"


def _op_args(backend, M=5, K=12, N=7, r=3, p=0.25, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(DEVICE)  # noqa: E731
    x, w, b, A, B = rand(M, K), rand(N, K), rand(N) if bias else None, rand(r, K), rand(N, r)
    seed = torch.tensor(1234, dtype=torch.int64)
    return x, w, b, A, B, 0.5, p, seed, backend


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_lora_forward(backend, p, bias):
    x, w, b, A, B, s, p, seed, name = _op_args(backend, p=p, bias=bias)
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(ops.lora_forward, (x, w, b, A, B, s, p, seed, name))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("need_grad_x", [True, False])
def test_opcheck_lora_backward(backend, need_grad_x):
    x, w, _, A, B, s, p, seed, name = _op_args(backend)
    xa = torch.randn(x.shape[0], A.shape[0], device=DEVICE)
    dy = torch.randn(x.shape[0], w.shape[0], device=DEVICE)
    torch.library.opcheck(ops.lora_backward, (dy, x, w, A, B, xa, s, p, seed, need_grad_x, name))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_lora_merge_(backend):
    _, w, _, A, B, s, _, _, name = _op_args(backend)
    torch.library.opcheck(ops.lora_merge_, (w, A, B, s, name))


class _Tiny(nn.Module):
    """Two LoRA layers around a nonlinearity, one without bias."""

    def __init__(self, dropout, backend):
        super().__init__()
        self.up = lk.LoRALinear(16, 24, r=4, alpha=8, dropout=dropout, backend=backend, device=DEVICE)
        self.down = lk.LoRALinear(24, 8, bias=False, r=2, alpha=4, dropout=dropout, backend=backend,
                                  device=DEVICE)
        for layer in (self.up, self.down):
            nn.init.normal_(layer.lora_B.weight)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _step(model, x):
    """Output, grad of x and grads of the trainable parameters after one backward."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.fixture
def inductor_fallback_random():
    """inductor draws random numbers with aten's generator while the test runs.

    NOTE: the config's own scoped patch, not monkeypatch: pytest >= 9.2 restores an attribute from
    the target's ``__dict__``, and torch's config modules keep their settings elsewhere, so its undo
    deleted the setting and every later torch.compile in the session failed."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fullgraph_compile_equals_eager(backend, dropout, monkeypatch, inductor_fallback_random):
    # NOTE: on a GPU, eager calls take their dropout seeds from the generator's state on the host and
    # compiled graphs draw them on the device (inductor with its own random numbers, unless
    # fallback_random): for one mask in both, eager draws as the graph does (LORA_KERNELS_HOST_SEEDS=0)
    # and inductor falls back to aten's randint.
    monkeypatch.setattr(functional, "HOST_SEEDS", False)
    torch._dynamo.reset()
    model = _Tiny(dropout, backend)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x = torch.randn(3, 5, 16, device=DEVICE)
    for _ in range(2):  # the second call reuses the graph: the seed must not be a baked-in constant
        state = torch.get_rng_state(), torch.cuda.get_rng_state() if ON_GPU else None
        eager = _step(model, x)
        torch.set_rng_state(state[0])
        if ON_GPU:
            torch.cuda.set_rng_state(state[1])
        comp = _step(compiled, x)
        for e, c in zip(eager, comp, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    if dropout:
        torch.manual_seed(0)
        first = compiled(x)
        second = compiled(x)
        assert not torch.equal(first, second), "compiled dropout repeated its mask: the seed is a constant"


def test_fullgraph_compile_in_eval_mode_merged():
    torch._dynamo.reset()
    model = _Tiny(0.1, "reference").eval()
    x = torch.randn(4, 16, device=DEVICE)
    with torch.no_grad():
        unmerged = model(x)
        for layer in (model.up, model.down):
            layer.merge()
        compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
        torch.testing.assert_close(compiled(x), unmerged, rtol=1e-4, atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reduce_overhead_compile_equals_eager(backend):
    """torch.compile(mode="reduce-overhead") (Inductor's CUDA graphs) of a training step equals eager."""
    torch._dynamo.reset()
    model = _Tiny(0.0, backend)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(3, 5, 16, device=DEVICE)
    for _ in range(3):  # recorded, then replayed
        eager = _step(model, x)
        comp = _step(compiled, x)
        for e, c in zip(eager, comp, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cuda_graph_captures_forward_and_backward(backend):
    """Capture forward+backward of LoRALinear once, replay it on new data (dropout off: exact check)."""
    layer = lk.LoRALinear(64, 48, r=8, alpha=16, backend=backend, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    static_x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(3):
            layer.zero_grad(set_to_none=False)
            layer(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=False)
    static_x.grad = torch.zeros_like(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.square().sum().backward()

    for _ in range(2):
        new_x = torch.randn_like(static_x)
        static_x.data.copy_(new_x)
        layer.lora_A.weight.grad.zero_()
        layer.lora_B.weight.grad.zero_()
        static_x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_x = new_x.clone().requires_grad_(True)
        A = layer.lora_A.weight.detach().clone().requires_grad_(True)
        B = layer.lora_B.weight.detach().clone().requires_grad_(True)
        ref_y = lk.lora_linear(ref_x, layer.weight, layer.bias, A, B, layer.scaling, backend="reference")
        ref_y.square().sum().backward()
        torch.testing.assert_close(static_y, ref_y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(static_x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=1e-4, atol=1e-4)


@requires_gpu
@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b.values[0] != "reference"])
def test_cuda_graph_replays_draw_fresh_dropout_masks(backend):
    """The seed is drawn on the GPU and read by the kernels, so each replay has a new mask."""
    layer = lk.LoRALinear(64, 48, r=8, alpha=16, dropout=0.5, backend=backend, device=DEVICE)
    nn.init.normal_(layer.lora_B.weight)
    static_x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.square().sum().backward()
    outputs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(static_y.clone())
    assert all(torch.isfinite(y).all() for y in outputs)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
