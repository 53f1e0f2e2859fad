"""What keeps the package working across the supported stacks and installs (docs/compatibility.md).

Custom-op annotations as real types (torch 2.4's infer_schema refused strings), a Triton that
raises at import (not only ImportError), autocast under torch.compile(fullgraph=True), the
reference Philox against a plain implementation and the published test vector, setup.py's
messages and fixed build directory, and the README, .ci/run and setup.py agreeing on the
install commands.
"""

import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import venv

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, ops, reference
from lora_kernels.multi_lora import ops as multi_ops
from conftest import DEVICE

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- #
# Custom ops and backends
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("op", [ops.lora_forward, ops.lora_backward, ops.lora_merge_,
                                multi_ops.multi_lora_forward, multi_ops.multi_lora_backward],
                         ids=lambda op: op._name)
def test_custom_op_annotations_are_types_not_strings(op):
    signature = inspect.signature(op._init_fn)
    annotations = [p.annotation for p in signature.parameters.values()] + [signature.return_annotation]
    strings = [a for a in annotations if isinstance(a, str)]
    assert not strings, f"{op._name}: string annotations {strings} (is `from __future__ import annotations` back?)"


@pytest.fixture
def triton_import_raises(monkeypatch):
    """Importing the Triton kernels raises RuntimeError, as Triton 3.2 does without a GPU driver."""
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name in ("lora_kernels.triton_ops", "lora_kernels.multi_lora.triton_ops"):
            raise RuntimeError("0 active drivers ([]). There should only be one.")
        return real(name, *args, **kwargs)

    backends._load.cache_clear()
    multi_ops._load.cache_clear()
    monkeypatch.setattr(importlib, "import_module", fake)
    yield
    monkeypatch.undo()
    backends._load.cache_clear()
    multi_ops._load.cache_clear()


def test_a_triton_that_raises_at_import_leaves_the_package_usable(triton_import_raises):
    why = backends._load("triton")[1]
    assert "RuntimeError" in why and "0 active drivers" in why
    assert "0 active drivers" in backends.unavailable_reason("triton", torch.device("cuda"))
    with pytest.raises(lk.BackendUnavailableError, match="0 active drivers"):
        backends.get("triton")
    with pytest.raises(lk.BackendUnavailableError, match="0 active drivers"):
        multi_ops._load("triton")
    x, w, A, B = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    expected = x @ w.t() + 0.5 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(lk.lora_linear(x, w, None, A, B, 0.5), expected)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast_bf16"])
def test_lora_linear_compiles_fullgraph_with_and_without_autocast(autocast):
    """_autocast_inputs traces on every supported torch (Dynamo refused is_autocast_available on 2.8–2.11)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    A, B = torch.randn(3, 12, generator=g), torch.randn(7, 3, generator=g)
    x, w, b, A, B = (t.to(DEVICE) for t in (x, w, b, A, B))

    def step(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            y = fn(leaves[0], w, b, leaves[1], leaves[2])
        y.float().square().sum().backward()
        return [y] + [t.grad for t in leaves]

    def fn(x, w, b, A, B):
        return lk.lora_linear(x, w, b, A, B, 0.5, 0.25, backend="reference", seed=11)

    torch._dynamo.reset()
    expected = step(fn)
    got = step(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    assert got[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# The reference Philox
# --------------------------------------------------------------------------- #

_M32 = 0xFFFFFFFF


def _plain_philox(seed: int, counter: torch.Tensor):
    """Philox-4x32-10 written out plainly (products split into 16-bit halves: no int64 overflow)."""

    def mulhilo(a, b):
        p0, p1 = a * (b & 0xFFFF), a * (b >> 16)
        return ((p0 >> 16) + p1) >> 16, (p0 + ((p1 & 0xFFFF) << 16)) & _M32

    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def test_philox_known_answer():
    """Random123's published vector for Philox-4x32-10: counter 0, key 0."""
    words = [int(w[0]) for w in reference.philox4x32(0, torch.zeros(1, dtype=torch.int64, device=DEVICE))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**40 + 17, 2**62 + 12345, 2**63 - 1])
def test_philox_matches_the_plain_implementation(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    counter = torch.cat([
        torch.arange(0, 3000), torch.randint(0, 2**63 - 1, (3000,), generator=g),
        torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1]),
    ]).to(DEVICE)
    for fast, plain in zip(reference.philox4x32(seed, counter), _plain_philox(seed, counter)):
        assert torch.equal(fast, plain)


def test_keep_mask_does_not_depend_on_the_chunking(monkeypatch):
    rows, cols, p, seed = 13, 37, 0.3, 2**41 + 3  # cols not a multiple of 4; counters cross chunk edges
    whole = reference.keep_mask_torch(rows, cols, p, seed)
    monkeypatch.setattr(reference, "_PHILOX_CHUNK", 7)
    assert torch.equal(reference.keep_mask_torch(rows, cols, p, seed), whole)
    counter = torch.arange(rows * 10).view(rows, 10)
    words = torch.stack(_plain_philox(seed, counter), dim=-1).view(rows, 40)[:, :cols]
    assert torch.equal(whole, (words >> 8) >= reference.dropout_threshold(p))


# --------------------------------------------------------------------------- #
# Install: setup.py, README, .ci/run
# --------------------------------------------------------------------------- #


def _setup_py(*args, env_extra=None, python=sys.executable, code=None):
    """Run setup.py (or ``code`` in the repository) in a child without a controlling terminal, so its
    one line goes to stderr."""
    env = {**os.environ, **(env_extra or {})}
    command = [python, "-c", code] if code else [python, "setup.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)


def test_setup_names_missing_build_requirements(tmp_path):
    """A fresh venv without setuptools/wheel/packaging: the message says what to install, not 'install torch'."""
    venv.create(tmp_path / "bare", with_pip=False)
    run = _setup_py("--name", python=str(tmp_path / "bare" / "bin" / "python"))
    assert run.returncode != 0
    assert "missing build requirement(s): setuptools, packaging, wheel" in run.stderr, run.stderr
    assert "install torch first" not in run.stderr


def _toolkit_and_cuda_torch() -> bool:
    run = _setup_py(code="import runpy, sys; sys.argv = ['setup.py', '--name']; "
                         "g = runpy.run_path('setup.py'); print('EXT', bool(g['ext_modules']))",
                    env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "0"})
    return "EXT True" in run.stdout


def test_setup_says_nothing_when_pip_only_asks_for_metadata():
    run = _setup_py("--name", env_extra={"LORA_KERNELS_FORCE_CUDA": "0"})
    assert run.returncode == 0 and "lora_kernels setup:" not in run.stderr, run.stderr


def test_setup_prints_one_line_on_the_extension():
    env = {"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "0", "LORA_KERNELS_CUDA_ARCHS": "8.0;9.0a"}
    # (build_ext --help: setup.py runs as for a build, and setuptools stops before compiling)
    run = _setup_py("build_ext", "--help", env_extra=env)
    lines = [l for l in run.stderr.splitlines() if l.startswith("lora_kernels setup:")]
    assert run.returncode == 0 and len(lines) == 1, run.stderr
    if _toolkit_and_cuda_torch():
        assert "building the CUDA extension lora_kernels._C for sm_80, sm_90a (+PTX compute_90)" in lines[0]
        assert "LORA_KERNELS_SKIP_CUDA=1" in lines[0]
    else:
        assert "not building the CUDA extension" in lines[0] and "LORA_KERNELS_FORCE_CUDA=1" in lines[0]
    skipped = _setup_py("build_ext", "--help", env_extra={**env, "LORA_KERNELS_SKIP_CUDA": "1"})
    assert [l for l in skipped.stderr.splitlines() if l.startswith("lora_kernels setup:")] == [
        "lora_kernels setup: not building the CUDA extension lora_kernels._C (LORA_KERNELS_SKIP_CUDA is set); "
        "the Triton and reference backends install as usual"]


def test_setup_build_directory_is_fixed_whatever_pip_sets():
    """pip's editable install sets build_temp to a fresh temporary directory; ours stays build/temp.*."""
    code = (
        "import runpy, sys, torch\n"
        "sys.argv = ['setup.py', '--name']\n"
        "g = runpy.run_path('setup.py')\n"
        "if not g['ext_modules']:\n"
        "    print('NO-EXT'); raise SystemExit(0)\n"
        "from setuptools.dist import Distribution\n"
        "cmd = g['cmdclass']['build_ext'](Distribution({'ext_modules': g['ext_modules']}))\n"
        "cmd.build_temp = '/tmp/some-pip-tmp.build-temp'\n"
        "cmd.finalize_options()\n"
        "print('TEMP', cmd.build_temp)\n"
        "print('WANT', g['build_dir'](torch))\n"
    )
    run = _setup_py(code=code, env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "0"})
    assert run.returncode == 0, run.stderr
    if "NO-EXT" in run.stdout:
        pytest.skip("no CUDA toolkit or no CUDA-enabled torch: the extension is not built here")
    temp = re.search(r"^TEMP (.*)$", run.stdout, re.M).group(1)
    assert temp == re.search(r"^WANT (.*)$", run.stdout, re.M).group(1)
    assert pathlib.Path(temp).parent == ROOT / "build" and f"torch{torch.__version__}".replace("+", "_") in temp


def _readme_commands() -> list[str]:
    return re.findall(r"^pip install torch==\S+ .*$", (ROOT / "README.md").read_text(), flags=re.M)


def test_readme_install_lines_name_the_build_requirements():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    hint = re.search(r'"pip install (setuptools[^"]*?) "', (ROOT / "setup.py").read_text()).group(1).split()
    for command in commands:
        first = command.split(" && ")[0].split()
        assert first[:3] == ["pip", "install", first[2]] and first[2].startswith("torch==")
        assert sorted(first[3:]) == sorted(hint), (first, hint)
        assert " && pip install --no-build-isolation -e " in command


def test_ci_runs_the_readme_test_command_literally():
    test_command = next(c for c in _readme_commands() if c.endswith("python -m pytest python_tests -q"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_bench_env_silences_the_cuda_home_notice():
    """A CPU benchmark run does not open with torch's 'No CUDA runtime is found, using CUDA_HOME' warning."""
    run = _setup_py(code="import bench.env, torch.utils.cpp_extension")
    assert run.returncode == 0, run.stderr
    assert "No CUDA runtime is found" not in run.stderr
