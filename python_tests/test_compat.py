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


def _setup_py(*args, env_extra=None, python=sys.executable, code=None, cwd=ROOT):
    """Run setup.py (or ``code`` in the repository) in a child without a controlling terminal, so its
    one line goes to stderr."""
    env = {**os.environ, **(env_extra or {})}
    command = [python, "-c", code] if code else [python, "setup.py", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)


def _setup_lines(run) -> list[str]:
    return [l for l in run.stderr.splitlines() if l.startswith("lora_kernels setup:")]


def test_setup_names_missing_build_requirements(tmp_path):
    """A fresh venv without setuptools/wheel/packaging: the message says what to install, not 'install torch'."""
    venv.create(tmp_path / "bare", with_pip=False)
    run = _setup_py("--name", python=str(tmp_path / "bare" / "bin" / "python"))
    assert run.returncode != 0
    assert "missing build requirement(s): setuptools, packaging, wheel" in run.stderr, run.stderr
    assert "install torch first" not in run.stderr


def _toolkit_and_cuda_torch() -> bool:
    run = _setup_py(code="import runpy, sys; sys.argv = ['setup.py', '--name']; "
                         "g = runpy.run_path('setup.py'); "
                         "print('CUDA', any(s.endswith('.cu') for e in g['ext_modules'] for s in e.sources))",
                    env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "0"})
    return "CUDA True" in run.stdout


def test_setup_says_nothing_when_pip_only_asks_for_metadata():
    run = _setup_py("--name", env_extra={"LORA_KERNELS_FORCE_CUDA": "0"})
    assert run.returncode == 0 and "lora_kernels setup:" not in run.stderr, run.stderr


def test_setup_prints_one_line_on_the_extension():
    env = {"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "0", "LORA_KERNELS_CUDA_ARCHS": "8.0;9.0a"}
    # (build_ext --help: setup.py runs as for a build, and setuptools stops before compiling)
    run = _setup_py("build_ext", "--help", env_extra=env)
    lines = _setup_lines(run)
    assert run.returncode == 0 and len(lines) == 1, run.stderr
    if _toolkit_and_cuda_torch():
        assert "building lora_kernels._C with the CUDA kernels for sm_80, sm_90a (+PTX compute_80)" in lines[0]
        assert "LORA_KERNELS_SKIP_CUDA=1" in lines[0]
    else:
        assert "building lora_kernels._C with the CPU kernels only (no CUDA kernels: " in lines[0]
        assert "LORA_KERNELS_FORCE_CUDA=1" in lines[0]
    skipped = _setup_lines(_setup_py("build_ext", "--help", env_extra={**env, "LORA_KERNELS_SKIP_CUDA": "1"}))
    assert len(skipped) == 1 and skipped[0].startswith(
        "lora_kernels setup: building lora_kernels._C with the CPU kernels only "
        "(no CUDA kernels: LORA_KERNELS_SKIP_CUDA is set) in build/temp."), skipped
    assert skipped[0].endswith("if it cannot be compiled the package installs without it"), skipped


def test_setup_builds_the_cpu_kernels_alone_without_cuda():
    """Without the CUDA build, _C is an optional C++ extension of the CPU sources, which the CUDA build
    compiles too; without PyTorch nothing is built (one line), unless LORA_KERNELS_FORCE_CUDA=1."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['setup.py', '--name']\n"
        "g = runpy.run_path('setup.py')\n"
        "(ext,) = g['ext_modules']\n"
        "print('EXT', ext.name, ext.optional, ' '.join(ext.sources))\n"
        "print('CPU', ' '.join(g['cpu_sources']()))\n"
        "print('CUDA', ' '.join(g['cuda_sources']('8.0')[0]))\n"
        "print('TEMP', type(g['cmdclass']['build_ext']).__name__)\n"
    )
    run = _setup_py(code=code, env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "1"})
    assert run.returncode == 0, run.stderr
    ext = re.search(r"^EXT (\S+) (\S+) (.*)$", run.stdout, re.M).groups()
    cpu = re.search(r"^CPU (.*)$", run.stdout, re.M).group(1).split()
    cuda = re.search(r"^CUDA (.*)$", run.stdout, re.M).group(1).split()
    assert ext[:2] == ("lora_kernels._C", "True") and ext[2].split() == cpu
    assert "csrc/module.cpp" in cpu and "csrc/cpu/dropout.cpp" in cpu
    assert not [s for s in cpu if s.endswith(".cu") or s == "csrc/lora.cpp"], cpu
    assert set(cpu) < set(cuda) and "csrc/lora.cpp" in cuda

    no_torch = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'build_ext', '--help']; " \
               "g = runpy.run_path('setup.py'); print('EXT', g['ext_modules'])"
    run = _setup_py(code=no_torch, env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "1"})
    assert run.returncode == 0 and "EXT []" in run.stdout, run.stderr
    (line,) = _setup_lines(run)
    assert line.startswith("lora_kernels setup: not building lora_kernels._C (PyTorch cannot be imported"), line
    forced = _setup_py(code=no_torch, env_extra={"LORA_KERNELS_FORCE_CUDA": "1", "LORA_KERNELS_SKIP_CUDA": "0"})
    assert forced.returncode != 0 and "EXT" not in forced.stdout
    assert "LORA_KERNELS_FORCE_CUDA=1 but the CUDA extension cannot be built" in forced.stderr, forced.stderr


@pytest.mark.extended  # (compiles the CPU extension: ~20 s)
def test_setup_cpu_only_build_compiles_and_a_failed_one_still_installs(tmp_path):
    """In a copy of the sources: with a C++ compiler that fails, build_ext skips the optional _C with one
    line and succeeds; with the real one, the CPU-only _C compiles and gives the reference path its
    compiled dropout mask, while the cuda backend says why it is unavailable."""
    import shutil

    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "lora_kernels", tmp_path / "lora_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    env = {"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "1", "MAX_JOBS": "1"}
    failed = _setup_py("build_ext", "--inplace", env_extra={**env, "CXX": shutil.which("false")}, cwd=tmp_path)
    assert failed.returncode == 0, failed.stderr
    assert any(l.startswith("lora_kernels setup: compiling lora_kernels._C failed (") for l in _setup_lines(failed)), \
        failed.stderr
    assert not list((tmp_path / "lora_kernels").glob("_C*.so"))

    built = _setup_py("build_ext", "--inplace", env_extra=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert len(list((tmp_path / "lora_kernels").glob("_C*.so"))) == 1, built.stderr
    check = (
        "import torch, lora_kernels\n"
        "from lora_kernels import backends, reference\n"
        "print('FILE', lora_kernels._C.__file__)\n"
        "print('COMPILED', reference.COMPILED_MASK)\n"
        "print('CUDA', backends.unavailable_reason('cuda', torch.device('cuda', 0)))\n"
    )
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"FILE {tmp_path}" in run.stdout and "COMPILED True" in run.stdout, run.stdout
    assert "lora_kernels._C was built without its CUDA kernels" in run.stdout, run.stdout


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


def _without_constraints(words: list[str]) -> list[str]:
    """A pip command's words without its ``-c constraints.txt``."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "-c":
            skip = True
        else:
            out.append(word)
    return out


def test_readme_install_lines_name_the_build_requirements():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    hint = re.search(r'"pip install (setuptools[^"]*?) "', (ROOT / "setup.py").read_text()).group(1).split()
    for command in commands:
        first = _without_constraints(command.split(" && ")[0].split())
        assert first[:3] == ["pip", "install", first[2]] and first[2].startswith("torch==")
        assert sorted(first[3:]) == sorted(hint), (first, hint)
        assert " && pip install --no-build-isolation -c constraints.txt -e " in command


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_readme_commands_install_the_pinned_stack():
    """Both pip installs of both README commands take constraints.txt; every package the [test] and
    [bench] extras and the build name is pinned there, and the commands' own pins agree with it."""
    pins = _constraints()
    for command in _readme_commands():
        installs = [part for part in command.split(" && ") if part.startswith("pip install ")]
        assert len(installs) == 2 and all(" -c constraints.txt" in part for part in installs), command
        for name, version in re.findall(r"(?<![\w-])([A-Za-z][\w.-]*)==(\S+)", command):
            if name != "torch":  # torch (and so Triton and the CUDA libraries) is pinned by the command
                assert pins.get(name.lower()) == version, (name, version, pins.get(name.lower()))
    setup = (ROOT / "setup.py").read_text()
    for extra in ("test", "bench"):
        listed = re.search(rf'"{extra}": \[([^\]]*)\]', setup).group(1)
        for name in re.findall(r'"([A-Za-z][\w.-]*)', listed):
            assert re.sub(r"[-_.]+", "-", name).lower() in pins, f"[{extra}] needs {name}, unpinned in constraints.txt"
    for name in ("setuptools", "wheel", "packaging", "ninja", "pybind11", "numpy"):
        assert name in pins, name
    assert "torch" not in pins and "triton" not in pins  # per compat row: the command's torch decides


def test_ci_runs_the_readme_test_command_literally():
    test_command = next(c for c in _readme_commands() if c.endswith("python -m pytest python_tests -q -n 2"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    # ... in a fresh venv of its own, created and entered before it, and with its status checked
    # (under `set -e` a failed install in the && list would not stop the script).
    at = ci.index(test_command)
    before, after = "\n".join(ci[:at]), "\n".join(ci[at + 1:at + 5])
    assert re.search(r"-m venv ", before) and re.search(r"source \S+/bin/activate", before)
    assert "status=$?" in after and "fail " in after


def test_bench_env_silences_the_cuda_home_notice():
    """A CPU benchmark run does not open with torch's 'No CUDA runtime is found, using CUDA_HOME' warning."""
    run = _setup_py(code="import bench.env, torch.utils.cpp_extension")
    assert run.returncode == 0, run.stderr
    assert "No CUDA runtime is found" not in run.stderr


def test_setup_builds_for_the_local_gpu_and_the_sm90_units_for_sm90a_alone(tmp_path):
    """The default architectures are the local GPU's (9.0 as 9.0a) or, without one, the documented list;
    the sm_90a CUTLASS units are compiled apart, for sm_90a alone; the build's closing lines give each
    unit compiled this time (ninja's log) with its time."""
    log = tmp_path / ".ninja_log"
    log.write_text("# ninja log v7\n0\t5000\t1\t/b/csrc/old.o\taa\n")
    code = (
        "import os, runpy, sys, types\n"
        "sys.argv = ['setup.py', '--name']\n"
        "g = runpy.run_path('setup.py')\n"
        "def fake_torch(cap):\n"
        "    cuda = types.SimpleNamespace(is_available=lambda: cap is not None,\n"
        "                                 get_device_capability=lambda: cap, get_device_name=lambda: 'GPU')\n"
        "    return types.SimpleNamespace(cuda=cuda)\n"
        "os.environ.pop('LORA_KERNELS_CUDA_ARCHS', None)\n"
        "for cap in [(9, 0), (8, 6), (12, 0), None]:\n"
        "    print('ARCHS', cap, g['default_archs'](fake_torch(cap))[0])\n"
        "os.environ['LORA_KERNELS_CUDA_ARCHS'] = '8.0'\n"
        "print('ARCHS env', g['default_archs'](fake_torch((9, 0)))[0])\n"
        "calls = []\n"
        "def compile_(sources, output_dir=None, extra_postargs=None, **kw):\n"
        "    calls.append((sources, output_dir, extra_postargs.get('nvcc')))\n"
        "    return [s + '.o' for s in sources]\n"
        "split = g['sm90_only_for_sm90a'](compile_)\n"
        "nvcc = ['-O3'] + g['arch_flags']('8.0;9.0a') + ['-DX']\n"
        "objs = split(['csrc/a.cpp', 'csrc/cuda/forward.cu', '/r/csrc/cuda/sm90/gemm_sm90.cu'],\n"
        "             output_dir='o', extra_postargs={'cxx': [], 'nvcc': nvcc})\n"
        "print('OBJS', len(objs))\n"
        "for sources, out, flags in sorted(calls):\n"
        "    print('CALL', ','.join(sources), out, ' '.join(flags))\n"
        "calls.clear(); split(['csrc/a.cpp'], output_dir='o', extra_postargs={'cxx': []})\n"
        "print('CPU', calls)\n"
        f"log = __import__('pathlib').Path({str(log)!r})\n"
        "before = set(log.read_text().splitlines())\n"
        "with log.open('a') as f:\n"
        "    f.write('0\\t81500\\t2\\t/b/csrc/cuda/sm90/gemm_sm90.o\\tbb\\n1\\t2400\\t3\\t/b/csrc/lora.o\\tcc\\n')\n"
        "g['_report_units']([log, log.parent / 'none' / '.ninja_log'], before, 83.2)\n"
    )
    run = _setup_py(code=code, env_extra={"LORA_KERNELS_FORCE_CUDA": "0", "LORA_KERNELS_SKIP_CUDA": "1"})
    assert run.returncode == 0, run.stderr
    archs = dict(re.findall(r"^ARCHS (.*) (\S+)$", run.stdout, re.M))
    assert archs == {"(9, 0)": "9.0a", "(8, 6)": "8.6", "(12, 0)": "12.0", "None": "8.0;9.0a", "env": "8.0"}, archs
    assert "OBJS 3" in run.stdout
    # (the two ninja runs side by side: the sm_90a one in a subdirectory of the build directory)
    calls = re.findall(r"^CALL (\S+) (\S+) (.*)$", run.stdout, re.M)
    assert sorted(calls) == [
        ("/r/csrc/cuda/sm90/gemm_sm90.cu", os.path.join("o", "sm90a"), "-O3 -gencode=arch=compute_90a,code=sm_90a -DX"),
        ("csrc/a.cpp,csrc/cuda/forward.cu", "o", "-O3 -gencode=arch=compute_80,code=sm_80 "
                                            "-gencode=arch=compute_80,code=compute_80 -gencode=arch=compute_90a,code=sm_90a -DX"),
    ], calls
    assert "CPU [(['csrc/a.cpp'], 'o', None)]" in run.stdout
    report = [l for l in run.stdout.splitlines() if l.startswith("lora_kernels build:")]
    assert [l.split()[2:] for l in report] == [["81.5", "s", "/b/csrc/cuda/sm90/gemm_sm90.o"],
                                              ["2.4", "s", "/b/csrc/lora.o"],
                                              ["2", "translation", "unit(s)", "compiled", "(the", "others",
                                               "unchanged),", "83", "s", "in", "all"]], report
