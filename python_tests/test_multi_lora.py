"""Several adapters in one batch: both backends against a float64 per-adapter loop, the dropout mask,
the registered ops, MultiLoRALinear (adapters added, removed, hot-swapped, merged) and its refusals."""

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import backends, reference
from lora_kernels.multi_lora import MultiLoRALinear, multi_lora_linear, multi_lora_reference, ops, segments
from conftest import DEVICE, ON_GPU, TOLERANCE, backend_param, relative_error, requires_gpu

BACKENDS = [backend_param("reference"), backend_param("triton")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_adapters(K, N, ranks, dtype, device=DEVICE):
    """Stacked, zero-padded factors for adapters of the given ranks (B not zero: the LoRA term counts)."""
    n, R = len(ranks), max(ranks)
    A = torch.zeros(n, R, K, dtype=dtype, device=device)
    B = torch.zeros(n, N, R, dtype=dtype, device=device)
    for i, r in enumerate(ranks):
        A[i, :r] = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
        B[i, :, :r] = torch.randn(N, r, device=device).to(dtype)
    scaling = torch.tensor([0.7 + 0.37 * i for i in range(n)])  # not exact in bf16 or fp16
    return A, B, scaling


def make_base(M, K, N, dtype, bias=True):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    return x, weight, b


def run(x, weight, bias, A, B, scaling, ids, p, seed, backend, grad_out):
    """Forward and backward through multi_lora_linear: (y, dx, dA, dB)."""
    x, A, B = (t.detach().requires_grad_(True) for t in (x, A, B))
    y = multi_lora_linear(x, weight, bias, A, B, scaling, ids, dropout_p=p, backend=backend, seed=seed)
    y.backward(grad_out)
    return y, x.grad, A.grad, B.grad


def reference_fp64(x, weight, bias, A, B, scaling, ranks, ids, p, seed, grad_out):
    """The per-adapter loop on unpadded factors, in float64: (y, dx, [dA_i], [dB_i])."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x64 = d(x).requires_grad_(True)
    As = [d(A[i, :r]).requires_grad_(True) for i, r in enumerate(ranks)]
    Bs = [d(B[i, :, :r]).requires_grad_(True) for i, r in enumerate(ranks)]
    y = multi_lora_reference(x64, d(weight), d(bias), As, Bs, scaling.tolist(), ids, p, seed)
    y.backward(grad_out.double())
    return y, x64.grad, [a.grad for a in As], [b.grad for b in Bs]


def assert_close(name, out, ref, dtype):
    assert out.dtype == dtype, f"{name} has dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def check_against_reference(got, ref, ranks, ids, dtype):
    y, dx, dA, dB = got
    y64, dx64, dA64, dB64 = ref
    assert_close("y", y, y64, dtype)
    assert_close("dx", dx, dx64, dtype)
    present = set(ids.reshape(-1).tolist())
    for i, r in enumerate(ranks):
        if i in present:
            assert_close(f"dA[{i}]", dA[i, :r], dA64[i], dtype)
            assert_close(f"dB[{i}]", dB[i, :, :r], dB64[i], dtype)
        else:  # an adapter without rows: exactly zero gradients
            assert not dA[i].any() and not dB[i].any(), f"adapter {i} has no rows but non-zero gradients"
        # the zero padding beyond rank r gets exactly zero gradients, so training keeps it zero
        assert not dA[i, r:].any() and not dB[i, :, r:].any(), f"adapter {i}: non-zero gradient in the padding"


# (name, tokens, in, out, ranks, p, ids as a function of (M, n)): awkward sizes, every layout.
LAYOUTS = {
    "interleaved": (37, 40, 33, [8, 3, 5, 1], 0.0, lambda M, n: torch.arange(M) % n),
    "some-empty-and-base-rows": (45, 24, 17, [4, 2, 6, 3, 5], 0.2,
                                 lambda M, n: torch.tensor([-1, 1, 4])[torch.randint(0, 3, (M,))]),
    "one-adapter": (33, 20, 40, [2, 7, 4], 0.1, lambda M, n: torch.full((M,), 1)),
    "base-only": (9, 16, 12, [3, 2], 0.0, lambda M, n: torch.full((M,), -1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_and_gradients_match_fp64_reference(backend, dtype, layout):
    M, K, N, ranks, p, make_ids = LAYOUTS[layout]
    x, weight, bias = make_base(M, K, N, dtype, bias=(M % 2 == 1))
    A, B, scaling = make_adapters(K, N, ranks, dtype)
    ids = make_ids(M, len(ranks)).to(DEVICE)
    grad_out = torch.randn(M, N, dtype=dtype, device=DEVICE)
    got = run(x, weight, bias, A, B, scaling, ids, p, 42, backend, grad_out)
    ref = reference_fp64(x, weight, bias, A, B, scaling, ranks, ids, p, 42, grad_out)
    check_against_reference(got, ref, ranks, ids, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_inputs_with_per_token_and_per_sequence_ids(backend):
    dtype, ranks = torch.float32, [4, 2, 3]
    _, weight, bias = make_base(1, 24, 20, dtype)
    A, B, scaling = make_adapters(24, 20, ranks, dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, device=DEVICE)
    grad_out = torch.randn(3, 5, 20, dtype=dtype, device=DEVICE)
    per_token = torch.randint(-1, 3, (3, 5), device=DEVICE)
    per_sequence = torch.tensor([2, -1, 0], device=DEVICE)
    for ids, full in ((per_token, per_token), (per_sequence, per_sequence[:, None].expand(3, 5))):
        got = run(x, weight, bias, A, B, scaling, ids, 0.15, 3, backend, grad_out)
        ref = reference_fp64(x, weight, bias, A, B, scaling, ranks, full, 0.15, 3, grad_out)
        check_against_reference(got, ref, ranks, full, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_equals_the_single_adapter_layer_for_the_same_seed(backend):
    """Every row on one adapter: the same y and gradients as lora_linear with that adapter and seed."""
    dtype, ranks, slot, seed = torch.float32, [3, 5, 2], 1, 2**40 + 17
    x, weight, bias = make_base(21, 30, 14, dtype)
    A, B, scaling = make_adapters(30, 14, ranks, dtype)
    ids = torch.full((21,), slot, device=DEVICE)
    grad_out = torch.randn(21, 14, dtype=dtype, device=DEVICE)
    y, dx, dA, dB = run(x, weight, bias, A, B, scaling, ids, 0.3, seed, backend, grad_out)
    x1, A1, B1 = (t.detach().clone().requires_grad_(True) for t in (x, A[slot, :5], B[slot, :, :5]))
    y1 = lk.lora_linear(x1, weight, bias, A1, B1, float(scaling[slot]), dropout_p=0.3, seed=seed, backend="reference")
    y1.backward(grad_out)
    for name, out, expected in (("y", y, y1), ("dx", dx, x1.grad), ("dA", dA[slot, :5], A1.grad),
                                ("dB", dB[slot, :, :5], B1.grad)):
        assert relative_error(out, expected) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_the_specified_one(backend):
    """With W0 = 0 and positive factors, dx = (g A_i) ⊙ D is zero exactly where the mask drops."""
    M, K, N, seed = 19, 13, 8, 99
    ids = (torch.arange(M) % 3).to(DEVICE)
    A = torch.rand(3, 2, K, device=DEVICE) + 0.1
    B = torch.rand(3, N, 2, device=DEVICE) + 0.1
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    y = multi_lora_linear(x, torch.zeros(N, K, device=DEVICE), None, A, B, [1.0, 2.0, 0.5], ids,
                          dropout_p=0.3, seed=seed, backend=backend)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, reference.dropout_keep_mask(M, K, 0.3, seed, device=DEVICE))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gemm", "base-gemm+epilogue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_gemm_both_ways(monkeypatch, fused, dtype):
    """The fused SGMV GEMM, and the base GEMM of the single-adapter layer followed by the epilogue kernel."""
    if backends.unavailable_reason("triton", DEVICE):
        pytest.skip(backends.unavailable_reason("triton", DEVICE))
    from lora_kernels.multi_lora import triton_ops

    monkeypatch.setattr(triton_ops, "FUSED_GEMM", fused)
    ranks = [4, 1, 3]
    x, weight, bias = make_base(40, 36, 34, dtype)
    A, B, scaling = make_adapters(36, 34, ranks, dtype)
    ids = torch.randint(-1, 3, (40,), device=DEVICE)
    grad_out = torch.randn(40, 34, dtype=dtype, device=DEVICE)
    got = run(x, weight, bias, A, B, scaling, ids, 0.25, 5, "triton", grad_out)
    ref = reference_fp64(x, weight, bias, A, B, scaling, ranks, ids, 0.25, 5, grad_out)
    check_against_reference(got, ref, ranks, ids, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    x, weight, bias = make_base(5, 6, 4, torch.float64)
    A, B, scaling = make_adapters(6, 4, [2, 1, 2], torch.float64)
    ids = torch.tensor([2, -1, 0, 2, 0], device=DEVICE)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, A, B)]
    fn = lambda x, w, b, A, B: multi_lora_linear(x, w, b, A, B, scaling.double(), ids,  # noqa: E731
                                                 dropout_p=0.25, seed=3, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def test_segments_sort_rows_by_adapter():
    ids = torch.tensor([2, -1, 0, 2, 3, 0, -1, 2])
    order, seg = segments(ids, 4)
    assert ids[order].tolist() == [-1, -1, 0, 0, 2, 2, 2, 3]
    assert order.tolist() == [1, 6, 2, 5, 0, 3, 7, 4]  # stable
    assert seg.tolist() == [2, 4, 4, 7, 8]  # adapter 1 has no rows: an empty segment


# --------------------------------------------------------------------------- #
# The registered ops
# --------------------------------------------------------------------------- #


def _op_args(backend, p):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    M, K, N, n, R = 7, 12, 9, 3, 2
    ids = torch.tensor([2, -1, 0, 0, 2, 2, -1], device=DEVICE)
    order, seg = segments(ids, n)
    seed = torch.tensor(1234, dtype=torch.int64)
    return (rand(M, K), rand(N, K), rand(N), rand(n, R, K), rand(n, N, R), torch.rand(n, generator=g).to(DEVICE),
            ids, order, seg, p, seed, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_multi_lora_forward(backend, p):
    args = _op_args(backend, p)
    for i in (0, 3, 4):
        args[i].requires_grad_(True)
    torch.library.opcheck(ops.multi_lora_forward, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_grad_x", [True, False])
def test_opcheck_multi_lora_backward(backend, need_grad_x):
    x, w, _, A, B, s, ids, order, seg, p, seed, name = _op_args(backend, 0.25)
    xa = torch.randn(x.shape[0], A.shape[1], device=DEVICE)
    dy = torch.randn(x.shape[0], w.shape[0], device=DEVICE)
    torch.library.opcheck(ops.multi_lora_backward, (dy, x, w, A, B, s, xa, ids, order, seg, p, seed, need_grad_x, name))


def test_fullgraph_compile_equals_eager():
    torch._dynamo.reset()
    base = nn.Linear(16, 12, device=DEVICE)
    layer = MultiLoRALinear.from_linear(base, {"a": (4, 8), "b": (2, 4)}, capacity=4, backend="reference")
    nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    x = torch.randn(2, 5, 16, device=DEVICE)
    ids = torch.tensor([1, -1], device=DEVICE)
    torch.testing.assert_close(compiled(x, ids), layer(x, ids))


# --------------------------------------------------------------------------- #
# MultiLoRALinear
# --------------------------------------------------------------------------- #


def make_layer(backend="auto", dtype=torch.float32, **kw):
    base = nn.Linear(20, 12, device=DEVICE, dtype=dtype)
    layer = MultiLoRALinear.from_linear(base, {"a": (4, 8), "b": (2, 2), "c": (6, 12)}, capacity=5,
                                        backend=backend, **kw)
    with torch.no_grad():
        for name, r in layer.ranks.items():
            layer.lora_B[layer.slot(name), :, :r].normal_()
    return layer


def module_reference(layer, x, names):
    """The layer's output by the float64 per-adapter loop, from its own slots."""
    adapters = sorted(layer.slots, key=layer.slots.get)
    slot_of = [layer.slots[a] for a in adapters]
    ids = torch.tensor([-1 if n is None else adapters.index(n) for n in names], device=DEVICE)
    A = [layer.lora_A[s, :layer.ranks[a]].double() for a, s in zip(adapters, slot_of)]
    B = [layer.lora_B[s, :, :layer.ranks[a]].double() for a, s in zip(adapters, slot_of)]
    s = [float(layer.scaling[i]) for i in slot_of]
    return multi_lora_reference(x.double(), layer.weight.double(), layer.bias.double(), A, B, s, ids)


def assert_matches_module_reference(layer, x, names):
    err = relative_error(layer(x, names), module_reference(layer, x, names))
    assert err <= TOLERANCE[torch.float32], f"relative error {err:.2e}"


def test_new_adapters_compute_the_base_layer_exactly():
    base = nn.Linear(20, 12, device=DEVICE)
    layer = MultiLoRALinear.from_linear(base, {"a": (4, 8), "b": (2, 2)}, backend="reference")
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert layer.capacity == 8 and layer.r_max == 4 and layer.scaling[:2].tolist() == [2.0, 1.0]
    x = torch.randn(6, 20, device=DEVICE)
    assert torch.equal(layer(x, ["a", "b", None, "a", "b", "b"]), base(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_remove_and_hot_swap_touch_only_their_slot(backend):
    layer = make_layer(backend)
    x = torch.randn(8, 20, device=DEVICE)
    names = ["a", "b", "c", None, "c", "a", "b", None]
    storage = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.scaling.data_ptr())
    before = layer(x, names)
    assert_matches_module_reference(layer, x, names)

    new_A, new_B = torch.randn(3, 20, device=DEVICE), torch.randn(12, 3, device=DEVICE)
    layer.swap_adapter("b", new_A, new_B, alpha=6.0)  # rank 2 -> 3
    assert layer.ranks["b"] == 3 and float(layer.scaling[layer.slot("b")]) == 2.0
    after = layer(x, names)
    assert_matches_module_reference(layer, x, names)
    changed = [n == "b" for n in names]
    assert torch.equal(after[[not c for c in changed]], before[[not c for c in changed]])
    assert not torch.allclose(after[changed], before[changed])

    layer.remove_adapter("a")
    slot = layer.add_adapter("d", r=5, alpha=5.0)
    assert slot == 0  # the freed slot is reused
    assert not layer.lora_B[slot].any()  # a new adapter starts at the base layer
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.scaling.data_ptr()) == storage
    names = ["d", "b", "c", None]
    assert_matches_module_reference(layer, x[:4], names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_moves_only_the_used_adapters_and_keeps_the_padding_zero(backend):
    layer = make_layer(backend, dropout=0.1)
    w0 = layer.weight.detach().clone()
    c_slot = layer.slot("c")
    c_before = (layer.lora_A[c_slot].detach().clone(), layer.lora_B[c_slot].detach().clone())
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.05, weight_decay=0.01)
    x, target = torch.randn(16, 20, device=DEVICE), torch.randn(16, 12, device=DEVICE)
    ids = layer.adapter_ids(["a", "b", None, "b"] * 4)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = (layer(x, ids) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight, w0)
    for name, r in layer.ranks.items():
        s = layer.slot(name)
        assert not layer.lora_A[s, r:].any() and not layer.lora_B[s, :, r:].any(), f"{name}: padding moved"
    # c had no rows: zero gradients; only AdamW's decoupled weight decay shrinks it.
    torch.testing.assert_close(layer.lora_A[c_slot], c_before[0] * (1 - 0.05 * 0.01) ** 4)
    torch.testing.assert_close(layer.lora_B[c_slot], c_before[1] * (1 - 0.05 * 0.01) ** 4)


def test_merge_serves_its_own_adapter_and_refuses_a_mixed_batch():
    layer = make_layer().eval()
    x = torch.randn(4, 20, device=DEVICE)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x, ["c"] * 4)
        layer.merge("c")
        torch.testing.assert_close(layer(x, ["c"] * 4), unmerged, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="merged into the weight.*mixes in other adapters"):
            layer(x, ["c", "a", "c", "c"])
        with pytest.raises(RuntimeError, match="mixes in"):
            layer(x, ["c", None, "c", "c"])
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.swap_adapter("c", torch.zeros(2, 20), torch.zeros(12, 2))
        layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    layer.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        layer.merge("a")
        layer(x, ["a"] * 4)


def _snapshot(layer):
    return ({k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)},
            dict(layer.slots), layer._occupied.clone())


def _unchanged(layer, snap):
    tensors, slots, occupied = snap
    state = layer.state_dict()
    return (all(torch.equal(state[k], v) for k, v in tensors.items()) and layer.slots == slots
            and torch.equal(layer._occupied, occupied))


@pytest.mark.parametrize("call, error, match", [
    (lambda l, x: l(x, torch.tensor([0, 5, 1, 0], device=DEVICE)), ValueError, r"in \[-1, 5\)"),
    (lambda l, x: l(x, torch.tensor([0, -2, 1, 0], device=DEVICE)), ValueError, r"got \[-2\]"),
    (lambda l, x: l(x, torch.tensor([0, 3, 1, 0], device=DEVICE)), ValueError, "empty slots"),
    (lambda l, x: l(x, torch.tensor([0, 1, 1, 0], dtype=torch.int32, device=DEVICE)), TypeError, "int64"),
    (lambda l, x: l(x, torch.tensor([0.0, 1, 1, 0], device=DEVICE)), TypeError, "int64"),
    (lambda l, x: l(x, torch.tensor([0, 1, 1], device=DEVICE)), ValueError, r"shape \(4,\)"),
    (lambda l, x: l(x, torch.zeros(4, 1, dtype=torch.long, device=DEVICE)), ValueError, "shape"),
    (lambda l, x: l(x, ["a", "nope", "a", "a"]), KeyError, "nope"),
    (lambda l, x: l.add_adapter("a", r=2), ValueError, "exists already"),
    (lambda l, x: l.add_adapter("e", r=7), ValueError, r"r_max=6"),
    (lambda l, x: l.add_adapter("e", r=2, lora_A=torch.zeros(2, 19), lora_B=torch.zeros(12, 2)), ValueError,
     "lora_A must be"),
    (lambda l, x: l.swap_adapter("a", torch.zeros(2, 20), torch.zeros(11, 2)), ValueError, "lora_B"),
    (lambda l, x: l.swap_adapter("zz", torch.zeros(2, 20), torch.zeros(12, 2)), KeyError, "zz"),
    (lambda l, x: l.remove_adapter("zz"), KeyError, "zz"),
    (lambda l, x: l.merge("zz"), KeyError, "zz"),
    (lambda l, x: l.unmerge(), RuntimeError, "nothing to unmerge"),
])
def test_refusals_are_clear_and_change_nothing(call, error, match):
    layer = make_layer("reference")
    x = torch.randn(4, 20, device=DEVICE)
    snap = _snapshot(layer)
    with pytest.raises(error, match=match):
        call(layer, x)
    assert _unchanged(layer, snap)


def test_full_capacity_is_refused():
    layer = MultiLoRALinear(8, 4, capacity=2, r_max=2)
    layer.add_adapter("a", 2)
    layer.add_adapter("b", 1)
    with pytest.raises(RuntimeError, match="all 2 adapter slots are in use"):
        layer.add_adapter("c", 1)
    with pytest.raises(ValueError, match="do not fit in capacity"):
        MultiLoRALinear.from_linear(nn.Linear(8, 4), {n: (1, 1) for n in "abc"}, capacity=2)


def test_functional_refusals():
    x, weight, bias = make_base(4, 6, 5, torch.float32)
    A, B, s = make_adapters(6, 5, [2, 2], torch.float32)
    ids = torch.tensor([0, 1, -1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(adapters=2"):
        multi_lora_linear(x, weight, bias, A, B[:1], s, ids)
    with pytest.raises(ValueError, match="scaling must be"):
        multi_lora_linear(x, weight, bias, A, B, s[:1], ids)
    with pytest.raises(ValueError, match=r"in \[-1, 2\)"):
        multi_lora_linear(x, weight, bias, A, B, s, ids + 1)
    with pytest.raises(lk.BackendUnavailableError, match="no multi-LoRA kernels"):
        multi_lora_linear(x, weight, bias, A, B, s, ids, backend="cuda")


def test_state_dict_round_trip_keeps_names_and_slots():
    layer = make_layer()
    layer.remove_adapter("b")
    other = MultiLoRALinear(20, 12, capacity=5, r_max=6, device=DEVICE)
    other.load_state_dict(layer.state_dict())
    assert other.slots == layer.slots and other.ranks == layer.ranks
    x = torch.randn(3, 20, device=DEVICE)
    assert torch.equal(other(x, ["a", "c", None]), layer(x, ["a", "c", None]))
    with pytest.raises(ValueError, match="empty slots"):
        other(x, torch.tensor([1, 0, 0], device=DEVICE))


@requires_gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_captures_forward_and_backward(backend):
    """Capture forward+backward of a mixed batch once; replay with new data, new ids and a hot-swapped adapter."""
    layer = MultiLoRALinear.from_linear(nn.Linear(64, 48, device=DEVICE), {"a": (8, 16), "b": (4, 4), "c": (2, 2)},
                                        capacity=4, backend=backend)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():  # keep the padding zero
        for name, r in layer.ranks.items():
            layer.lora_B[layer.slot(name), :, r:] = 0
    static_x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    static_ids = torch.randint(-1, 3, (32,), device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer.zero_grad(set_to_none=False)
            layer(static_x, static_ids).square().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=False)
    static_x.grad = torch.zeros_like(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x, static_ids)
        static_y.square().sum().backward()
    for step in range(3):
        if step == 2:
            layer.swap_adapter("b", torch.randn(3, 64, device=DEVICE), torch.randn(48, 3, device=DEVICE))
        static_x.data.copy_(torch.randn_like(static_x))
        static_ids.copy_(torch.randint(-1, 3, (32,), device=DEVICE))
        for t in (layer.lora_A.grad, layer.lora_B.grad, static_x.grad):
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        x = static_x.detach().clone().requires_grad_(True)
        A = layer.lora_A.detach().clone().requires_grad_(True)
        B = layer.lora_B.detach().clone().requires_grad_(True)
        y = multi_lora_linear(x, layer.weight, layer.bias, A, B, layer.scaling, static_ids, backend="reference")
        y.square().sum().backward()
        for got, ref in ((static_y, y), (static_x.grad, x.grad), (layer.lora_A.grad, A.grad),
                         (layer.lora_B.grad, B.grad)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_ids_outside_the_slots_get_the_base_output(backend):
    """With check_ids off (no host sync), the kernels still never read outside the factors."""
    layer = make_layer(backend)
    layer.check_ids = False
    x = torch.randn(6, 20, device=DEVICE)
    ids = torch.tensor([7, -3, 0, 4, 100, 2], device=DEVICE)  # slot 4 is empty; 7, 100, -3 do not exist
    y = layer(x, ids)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    odd = torch.tensor([True, True, False, True, True, False], device=DEVICE)
    assert relative_error(y[odd], base[odd].double()) <= TOLERANCE[torch.float32]
    assert_matches_module_reference(layer, x[~odd], ["a", "c"])
