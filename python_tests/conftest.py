"""Shared test setup.

Without a GPU, Triton's kernels run under its CPU interpreter: TRITON_INTERPRET
must be set before Triton is first imported, which is why it is set here, at
collection time. On a GPU machine the compiled kernels are tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests check results, not speed: one GEMM config per shape instead of autotuning.
    os.environ.setdefault("LORA_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

from lora_kernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def backend_param(name: str):
    """A pytest param for a backend, skipped (with the reason) where it cannot run on DEVICE."""
    why = backends.unavailable_reason(name, DEVICE)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason=why or "available"))


ALL_BACKENDS = [backend_param(name) for name in backends.BACKENDS]

# Backends that must run here (comma-separated), so that CI fails instead of skipping
# when, say, Triton stopped importing: LORA_KERNELS_REQUIRE=triton.
REQUIRED = [n for n in os.environ.get("LORA_KERNELS_REQUIRE", "").split(",") if n]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# Relative-error bounds against a float64 reference.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
