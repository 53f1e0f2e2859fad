"""What the compiled extension contains, read from its SASS (no GPU needed).

``cuobjdump`` disassembles the cubins of ``lora_kernels/_C*.so``:

- the sm_90a GEMMs (``LoraMainloop`` in the name) issue ``HGMMA`` (wgmma) and move
  tiles with ``UTMALDG`` (TMA load) and ``UTMASTG`` (TMA store);
- the sm_80 GEMMs (``tc::gemm_kernel``) issue ``HMMA`` (mma.sync), in the sm_80 cubin and in
  the sm_90a one (Hopper runs them for dropout and unaligned shapes);
- no kernel uses local memory or a stack (``cuobjdump -res-usage``: ``LOCAL:0``, ``STACK:0``),
  i.e. ptxas spilled nothing.

``cuobjdump`` is looked up on PATH, in the toolkit, in the ``nvidia-cuda-cuobjdump`` wheel
and in Triton's bundled copy. Without one, or without an extension that has the CUDA kernels
(``lora_kernels.cuda_ops`` imports), the file skips, unless CI requires the extension
(``LORA_KERNELS_REQUIRE`` contains ``extension``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REQUIRED


def _find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    for module in ("nvidia.cu13", "nvidia.cuda_cuobjdump", "triton.backends.nvidia"):
        try:
            spec = __import__(module, fromlist=["__path__"])
        except ImportError:
            continue
        for root in getattr(spec, "__path__", []):
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _library() -> tuple[str | None, str]:
    """``(the extension's file, "")`` where it has the CUDA kernels, else ``(None, why not)``."""
    try:
        import lora_kernels.cuda_ops  # noqa: F401  (ImportError: no _C, or a CPU-only one)
    except ImportError as exc:
        return None, f"the CUDA kernels are not built ({exc})"
    return sys.modules["lora_kernels._C"].__file__, ""


CUOBJDUMP, (LIBRARY, NO_LIBRARY) = _find_cuobjdump(), _library()
WHY_NOT = "cuobjdump not found (pip install nvidia-cuda-cuobjdump)" if CUOBJDUMP is None else NO_LIBRARY
if WHY_NOT and "extension" in REQUIRED:
    raise RuntimeError(f"LORA_KERNELS_REQUIRE=extension but the SASS cannot be read: {WHY_NOT}")
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "available")


def _run(*args: str) -> str:
    out = subprocess.run([CUOBJDUMP, *args, LIBRARY], capture_output=True, text=True, check=True)
    return out.stdout


@functools.lru_cache(maxsize=None)
def sass(arch: str) -> dict[str, str]:
    """{mangled kernel name: its SASS} of the cubin for ``arch`` ({} when the build has none)."""
    try:
        text = _run("-sass", "-arch", arch)
    except subprocess.CalledProcessError:
        return {}
    kernels, name, lines = {}, None, []
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            if name:
                kernels[name] = "\n".join(lines)
            name, lines = match.group(1), []
        elif name:
            lines.append(line)
    if name:
        kernels[name] = "\n".join(lines)
    return kernels


@functools.lru_cache(maxsize=None)
def resources(arch: str) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {"REG": .., "STACK": .., "LOCAL": .., ...}} for ``arch``."""
    try:
        text = _run("-res-usage", "-arch", arch)
    except subprocess.CalledProcessError:
        return {}
    usage, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            name = match.group(1)
        elif name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


def hopper_gemms(arch: str) -> dict[str, str]:
    return {n: s for n, s in sass(arch).items() if "LoraMainloop" in n}


def ampere_gemms(arch: str) -> dict[str, str]:
    return {n: s for n, s in sass(arch).items() if "2tc11gemm_kernel" in n}


def test_the_build_has_sm80_and_sm90a_cubins():
    assert ampere_gemms("sm_80"), "no sm_80 tensor-core GEMM in the extension"
    if not sass("sm_90a"):
        pytest.skip("built without the sm_90a target (LORA_KERNELS_CUDA_ARCHS without 9.0a)")
    # forward / backward x fp16 / bf16, one instantiation each
    assert len(hopper_gemms("sm_90a")) == 4, sorted(hopper_gemms("sm_90a"))


def test_hopper_gemms_use_wgmma_and_tma():
    kernels = hopper_gemms("sm_90a")
    if not kernels:
        pytest.skip("built without the sm_90a target")
    for name, code in kernels.items():
        for instruction in ("HGMMA", "UTMALDG", "UTMASTG"):
            assert instruction in code, f"{instruction} missing in {name[:120]}…"
        assert "HMMA" not in code.replace("HGMMA", ""), f"mma.sync in the sm_90a GEMM {name[:120]}…"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_ampere_gemms_use_mma_sync(arch):
    kernels = ampere_gemms(arch)
    if not sass(arch):
        pytest.skip(f"built without {arch}")
    # fp16 / bf16 x forward (bias or not) / backward (mask or not)
    assert len(kernels) == 8, sorted(kernels)
    for name, code in kernels.items():
        assert "HMMA" in code, f"HMMA missing in {name[:120]}…"
        assert "LDSM" in code, f"ldmatrix missing in {name[:120]}…"
        assert "LDGSTS" in code, f"cp.async missing in {name[:120]}…"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_no_kernel_spills(arch):
    usage = resources(arch)
    if not usage:
        pytest.skip(f"built without {arch}")
    assert len(usage) >= len(sass(arch)) > 0
    spilled = {n[:120]: u for n, u in usage.items() if u.get("LOCAL", 0) or u.get("STACK", 0)}
    assert not spilled, f"kernels with local memory / stack (register spills): {spilled}"


def _assert_mma_from_ldmatrix(arch, kernel, count, ldmatrix):
    """``count`` kernels named ``kernel``, each with HMMA, ``ldmatrix`` (an LDSM form) and 16-byte loads."""
    kernels = {n: s for n, s in sass(arch).items() if kernel in n}
    assert len(kernels) == count, sorted(kernels)
    for name, code in kernels.items():
        assert "HMMA" in code, f"HMMA missing in {name[:120]}…"
        assert "LDSM" in code and ldmatrix in code, f"{ldmatrix} missing in {name[:120]}…"
        assert re.search(r"LDG\.E\.128", code), f"no 16-byte global load in {name[:120]}…"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_thin_products_use_tensor_cores_and_16_byte_loads(arch):
    if not sass(arch):
        pytest.skip(f"built without {arch}")
    # fp16 / bf16 x 5 layouts (xa with and without mask, g, dB, dAᵀ) x 3 tile widths (r ≤ 16, 32, 64)
    _assert_mma_from_ldmatrix(arch, "skinny_tc_kernel", 30, "LDSM")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_pass_over_dy_uses_tensor_cores_and_16_byte_loads(arch):
    """The backward's one pass over dy (g and dB from the same tiles): mma.sync from ldmatrix fragments."""
    if not sass(arch):
        pytest.skip(f"built without {arch}")
    # fp16 / bf16 x 3 tile widths (r ≤ 16, 32, 64); ldmatrix with .trans too
    _assert_mma_from_ldmatrix(arch, "dy_pass_kernel", 6, "LDSM.16.MT88")
