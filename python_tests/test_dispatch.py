"""Backend selection: auto, forcing a backend, and clear errors when one cannot run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from conftest import DEVICE, REQUIRED


@pytest.mark.parametrize("name", REQUIRED or ["reference"])
def test_required_backends_are_available(name):
    """CI names what must run (LORA_KERNELS_REQUIRE), so nothing it needs is silently skipped."""
    if name == "extension":  # the compiled extension must have been built with its CUDA kernels and must load
        import lora_kernels.cuda_ops  # noqa: F401  (ImportError for a CPU-only _C)
        return
    why = backends.unavailable_reason(name, DEVICE)
    assert not why, f"backend {name!r} is required here but unavailable: {why}"


def test_auto_picks_reference_on_cpu_and_a_kernel_backend_on_cuda():
    assert backends.resolve("auto", torch.device("cpu")) == "reference"
    if DEVICE.type == "cuda":
        assert backends.resolve("auto", DEVICE) in ("triton", "cuda")


def test_forcing_an_unavailable_backend_is_a_clear_error():
    x = torch.randn(2, 4)
    w, A, B = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(lk.BackendUnavailableError, match="'cuda' is unavailable"):
        lk.lora_linear(x, w, None, A, B, 1.0, backend="cuda")


def test_unknown_backend_is_refused():
    x, w, A, B = torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        lk.lora_linear(x, w, None, A, B, 1.0, backend="fast")


def test_available_backends_lists_reference_everywhere():
    assert "reference" in lk.available_backends("cpu")
    assert "cuda" not in lk.available_backends("cpu")


def test_cuda_backend_is_unavailable_with_a_cpu_only_extension():
    """An extension built with its CPU kernels only (no toolkit, a CPU torch, LORA_KERNELS_SKIP_CUDA=1):
    lora_kernels.cuda_ops refuses to import, and the cuda backend is unavailable with that reason."""
    code = (
        "import sys, types, torch\n"
        # an imported _C without the CUDA ops, as the CPU-only build is to cuda_ops
        "sys.modules['lora_kernels._C'] = types.ModuleType('lora_kernels._C')\n"
        "from lora_kernels import backends\n"
        "assert not hasattr(torch.ops.lora_kernels, 'cuda_lora_forward')\n"
        "print(backends.unavailable_reason('cuda', torch.device('cuda', 0)))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "lora_kernels._C was built without its CUDA kernels" in out.stdout, out.stdout


def test_launchers_do_not_import_the_dispatcher():
    """The launchers sit below the backend registry: their helpers come from lora_kernels._runtime."""
    import ast

    root = Path(lk.__file__).parent
    for name in ("triton_ops.py", "cuda_ops.py", "_runtime.py"):
        tree = ast.parse((root / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert "backends" not in imported, f"{name} imports the dispatcher back"
    assert backends.device_seed is lk._runtime.device_seed
