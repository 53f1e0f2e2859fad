"""The compiled CPU dropout mask (csrc/cpu/dropout.cpp) against the PyTorch Philox of reference.py.

``reference.dropout_keep_mask`` uses the compiled kernel on the CPU when the extension is built
(``reference.COMPILED_MASK``) and ``reference.keep_mask_torch`` otherwise; both must give the
same mask bit for bit, and every caller must see the same results whichever one runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_kernels import reference

requires_compiled = pytest.mark.skipif(
    not reference.COMPILED_MASK,
    reason="the extension lora_kernels._C (with torch.ops.lora_kernels.dropout_keep_mask) is not built",
)

SHAPES = [(1, 1), (1, 3), (2, 4), (3, 5), (7, 9), (4, 6), (65, 1000), (33, 1001)]
SEEDS = [0, 1, 12345, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 17, 2**63 - 1, -1]


def compiled(rows, cols, p, seed):
    return torch.ops.lora_kernels.dropout_keep_mask(rows, cols, p, torch.tensor(seed, dtype=torch.int64))


@requires_compiled
@pytest.mark.parametrize("p", [0.05, 0.5, 0.99])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_mask_matches_the_torch_philox(shape, p, seed):
    rows, cols = shape
    got = compiled(rows, cols, p, seed)
    assert got.dtype == torch.bool and got.shape == (rows, cols) and got.is_contiguous()
    assert torch.equal(got, reference.keep_mask_torch(rows, cols, p, seed))


@requires_compiled
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5 + 2**-25, 3 * 2**-25])  # the ends; round-half-to-even thresholds
def test_compiled_mask_edge_probabilities(p):
    assert torch.equal(compiled(9, 13, p, 77), reference.keep_mask_torch(9, 13, p, 77))


@requires_compiled
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_compiled_mask_empty(shape):
    got = compiled(*shape, 0.3, 5)
    assert got.shape == shape and got.dtype == torch.bool


@requires_compiled
def test_compiled_mask_is_the_same_on_any_number_of_threads():
    before = torch.get_num_threads()
    try:
        masks = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            masks.append(compiled(300, 1001, 0.3, 2**33 + 5))  # 300 rows: split across threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(m, masks[0]) for m in masks[1:])
    assert torch.equal(masks[0], reference.keep_mask_torch(300, 1001, 0.3, 2**33 + 5))


@requires_compiled
def test_compiled_mask_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match="p must be in"):
        compiled(2, 3, 1.5, 0)
    with pytest.raises(RuntimeError, match="rows and cols must be >= 0"):
        compiled(-1, 3, 0.5, 0)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        torch.ops.lora_kernels.dropout_keep_mask(2, 3, 0.5, torch.tensor(1.0))


@requires_compiled
def test_compiled_mask_opcheck():
    torch.library.opcheck(torch.ops.lora_kernels.dropout_keep_mask.default, (7, 9, 0.3, torch.tensor(2**40 + 1)))


@requires_compiled
def test_compiled_mask_under_torch_compile():
    def f(x, seed):
        return reference.dropout_scale(x, 0.25, seed)

    x, seed = torch.randn(5, 11), torch.tensor(2**35 + 9)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, seed)
    assert torch.equal(out, f(x, seed))
    assert torch.equal(out != 0, reference.keep_mask_torch(5, 11, 0.25, seed))


def _bits(t):
    return t.view({torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}[t.dtype])


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (65, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("p", [0.05, 0.5, 0.99])
def test_compiled_dropout_scale_matches_the_reference(dtype, shape, p):
    """x ⊙ D in one pass, bit for bit x.mul(keep).mul_(1/(1-p)), with infinities and NaNs among the inputs."""
    x = (torch.randn(*shape, dtype=torch.float64) * 100).to(dtype)
    x.view(-1)[::5] = float("inf")
    x.view(-1)[1::7] = float("nan")
    x.view(-1)[2::11] = -0.0
    seed = 2**40 + 21
    got = torch.ops.lora_kernels.dropout_scale(x, p, torch.tensor(seed))
    want = x.mul(reference.keep_mask_torch(*shape, p, seed)).mul_(1.0 / (1.0 - p))
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(_bits(got)[finite], _bits(want)[finite])


@requires_compiled
def test_compiled_dropout_scale_non_contiguous_and_differentiable_path():
    x = torch.randn(9, 14, dtype=torch.float64).t()  # (14, 9), strided
    seed = torch.tensor(77)
    got = torch.ops.lora_kernels.dropout_scale(x, 0.3, seed)
    assert torch.equal(got, x.mul(reference.keep_mask_torch(14, 9, 0.3, 77)).mul_(1 / 0.7))
    torch.library.opcheck(torch.ops.lora_kernels.dropout_scale.default, (x, 0.3, seed))
    # reference.dropout_scale: the compiled op without grad, the differentiable mask path with it; same values.
    x.requires_grad_()
    with torch.no_grad():
        assert torch.equal(reference.dropout_scale(x, 0.3, seed), got)
    assert torch.equal(reference.dropout_scale(x, 0.3, seed), got)
    assert torch.autograd.gradcheck(lambda t: reference.dropout_scale(t, 0.3, seed), (x,))
    with pytest.raises(RuntimeError, match="must be in \\[0, 1\\)"):
        torch.ops.lora_kernels.dropout_scale(x.detach(), 1.0, seed)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.lora_kernels.dropout_scale(x.detach().reshape(-1), 0.3, seed)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (65, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_compiled_dropout_scale_pair_is_two_dropout_scales(dtype, shape):
    """One draw of the mask for both tensors: each result has the bits of its own dropout_scale."""
    a = torch.randn(*shape, dtype=dtype)
    b = (torch.randn(*shape, dtype=torch.float64) * 100).to(dtype).t().contiguous().t()  # another layout
    b[::3, ::2] = float("inf")
    seed = torch.tensor(2**50 + 3)
    got_a, got_b = torch.ops.lora_kernels.dropout_scale_pair(a, b, 0.3, seed)
    for got, x in ((got_a, a), (got_b, b)):
        want = torch.ops.lora_kernels.dropout_scale(x, 0.3, seed)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(_bits(got)[~want.isnan()], _bits(want)[~want.isnan()])
    # (opcheck compares outputs without equal_nan: finite inputs there.)
    torch.library.opcheck(torch.ops.lora_kernels.dropout_scale_pair.default, (a, b.nan_to_num(), 0.3, seed))
    # The Python entry point agrees, compiled or not (the tensor-op path draws the mask once too).
    for compiled in (True, False):
        reference.COMPILED_MASK = compiled
        try:
            pa, pb = reference.dropout_scale_pair(a, b.clone(), 0.3, seed)
        finally:
            reference.COMPILED_MASK = True
        assert torch.equal(_bits(pa), _bits(got_a)) and torch.equal(got_b.isnan(), pb.isnan())
    with pytest.raises(RuntimeError, match="share a shape and a dtype"):
        torch.ops.lora_kernels.dropout_scale_pair(a, b[:, :1] if shape[1] > 1 else b[:0], 0.3, seed)


@pytest.fixture(params=[True, False], ids=["compiled", "torch"])
def mask_impl(request, monkeypatch):
    """Runs a test with the compiled mask, then with the PyTorch one (reference.COMPILED_MASK flipped)."""
    if request.param and not reference.COMPILED_MASK:
        pytest.skip("the extension lora_kernels._C is not built")
    monkeypatch.setattr(reference, "COMPILED_MASK", request.param)
    return request.param


@pytest.mark.parametrize("seed", [2**63 - 1, 2**64 + 7, -(2**63), torch.tensor(2**40 + 3)], ids=str)
def test_dropout_keep_mask_either_implementation(mask_impl, seed):
    """Ints beyond int64 count by their low 64 bits on both paths; a 0-dim tensor seed is read as an int."""
    got = reference.dropout_keep_mask(6, 7, 0.4, seed)
    assert got.shape == (6, 7) and got.dtype == torch.bool
    assert torch.equal(got, reference.keep_mask_torch(6, 7, 0.4, int(seed) % 2**64))


def test_reference_layer_is_the_same_with_either_mask(monkeypatch):
    """Forward and every gradient of the reference layer, bit for bit, with the compiled mask and without."""
    if not reference.COMPILED_MASK:
        pytest.skip("the extension lora_kernels._C is not built")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 65, generator=g, dtype=torch.float64)
    w, b = torch.randn(9, 65, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    A, B = torch.randn(4, 65, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    results = []
    for use_compiled in (True, False):
        monkeypatch.setattr(reference, "COMPILED_MASK", use_compiled)
        leaves = [t.clone().requires_grad_() for t in (x, w, b, A, B)]
        y = reference.lora_linear_reference(*leaves, 0.5, 0.3, 2**40 + 5)
        y.square().sum().backward()
        y2, xa = reference.lora_forward(x[0], w, b, A, B, 0.5, 0.3, 11)
        grads = reference.lora_backward(torch.ones_like(y2), x[0], w, A, B, xa, 0.5, 0.3, 11, True)
        results.append([y.detach(), *(t.grad for t in leaves), y2, xa, *grads])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_package_without_the_extension_uses_the_torch_mask():
    """A CPU-only install (no lora_kernels._C): the package imports and the mask is the same."""
    code = (
        "import sys; sys.modules['lora_kernels._C'] = None\n"  # makes `import lora_kernels._C` raise ImportError
        "import torch, lora_kernels\n"
        "from lora_kernels import reference\n"
        "assert not reference.COMPILED_MASK\n"
        "m = reference.dropout_keep_mask(7, 9, 0.3, 2**40 + 17)\n"
        "print(''.join('1' if v else '0' for v in m.flatten().tolist()))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = reference.keep_mask_torch(7, 9, 0.3, 2**40 + 17)
    assert out.stdout.strip() == "".join("1" if v else "0" for v in want.flatten().tolist())
