"""Property-based shapes: random sizes, ranks, strides and dropout against the fp64 reference."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import backends, reference  # noqa: E402
from conftest import DEVICE, EXTENDED_RUN, TOLERANCE, relative_error  # noqa: E402

KERNEL_BACKENDS = [b for b in ("triton", "cuda") if not backends.unavailable_reason(b, DEVICE)]


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend can run here")
# The same examples on every run (derandomize); the extended tier draws more of them.
@settings(max_examples=25 if EXTENDED_RUN else 8, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 80), K=st.integers(1, 70), N=st.integers(1, 70), r=st.integers(1, 20),
    p=st.sampled_from([0.0, 0.1, 0.5]), dtype=st.sampled_from([torch.float32, torch.float16]),
    transpose_x=st.booleans(), bias=st.booleans(), backend=st.sampled_from(KERNEL_BACKENDS or ["reference"]),
    seed=st.integers(0, 2**62),
)
def test_random_shapes_match_reference(M, K, N, r, p, dtype, transpose_x, bias, backend, seed):
    x = torch.randn(K, M, dtype=dtype, device=DEVICE).t() if transpose_x else torch.randn(M, K, dtype=dtype, device=DEVICE)
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_(True)
    B = torch.randn(N, r, dtype=dtype, device=DEVICE).requires_grad_(True)
    x.requires_grad_(True)
    y = lk.lora_linear(x, weight, b, A, B, 0.5, dropout_p=p, backend=backend, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y64 = reference.lora_linear_reference(x64, weight.double(), None if b is None else b.double(),
                                          A64, B64, 0.5, p, seed)
    y64.backward(dy.double())
    for name, out, ref in (("y", y, y64), ("dx", x.grad, x64.grad), ("dA", A.grad, A64.grad),
                           ("dB", B.grad, B64.grad)):
        assert relative_error(out, ref) <= TOLERANCE[dtype], name
