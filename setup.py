"""Build and install lora_kernels.

The pure-Python package (reference path and Triton kernels) always installs.
The extension ``lora_kernels._C`` (csrc/) is built with it:

- with the CUDA kernels (the "cuda" backend) and the CPU ones when a CUDA toolkit and a
  CUDA-enabled PyTorch of the same CUDA major version are present;
- otherwise with the CPU kernels only (the reference path's compiled dropout mask), by the
  plain C++ compiler. That build is optional: where it fails (no working C++ compiler), the
  package installs without ``_C`` and the reference path computes the same masks with PyTorch ops.

What is built, and why, is said in one line; while the extension compiles, its progress (the
architectures, the translation units, the time of each and the total) is written to the build's
output, which pip keeps in its log (``pip install -v``, ``pip install --log FILE``).

    pip install setuptools wheel packaging ninja pybind11 nvidia-cutlass==4.2.0.0   # build requirements
    pip install --no-build-isolation -e .

Compiled objects are kept in build/temp.<platform>-<python>-torch<version>/ (one directory per
Python and torch), so a reinstall with unchanged sources only relinks: seconds, not minutes.
The one line also goes to the terminal where there is one (pip shows the build's own output only
with ``pip install -v``).

Environment switches (see docs/cuda.md):

    LORA_KERNELS_FORCE_CUDA=1     a missing toolkit or CUDA PyTorch is an error, not a notice
    LORA_KERNELS_SKIP_CUDA=1      build the extension with its CPU kernels only (no CUDA kernels)
    LORA_KERNELS_CUDA_ARCHS       ";"-separated compute capabilities; default: the local GPU's
                                  (9.0 builds as 9.0a), without a GPU "8.0;9.0a"; PTX is
                                  embedded for the newest entry without an "a"/"f" suffix (or
                                  for entries written "X.Y+PTX")
    LORA_KERNELS_DEBUG=1          device debug build (-G, host -O0 -g)
    LORA_KERNELS_LINEINFO=1       -lineinfo (source lines in compute-sanitizer / Nsight reports)
    LORA_KERNELS_PTXAS_VERBOSE=1  ptxas register / spill report for every kernel
    MAX_JOBS                      parallel compile jobs (ninja); NVCC_THREADS: nvcc --threads
    LORA_KERNELS_CUTLASS_DIR      CUTLASS headers for the sm_90a kernels (also CUTLASS_PATH); default:
                                  the pinned nvidia-cutlass wheel
    CUDA_HOME / CUDA_PATH         the toolkit, when it should not be found from nvcc
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import sys
import time
from pathlib import Path

# --------------------------------------------------------------------------- #
# Build requirements
# --------------------------------------------------------------------------- #

BUILD_REQUIREMENTS_HINT = (
    "pip install setuptools wheel packaging ninja pybind11 nvidia-cutlass==4.2.0.0 "
    "(then pip install --no-build-isolation -e .)"
)


def missing_build_requirements() -> list[str]:
    """The Python packages this build needs that are not importable.

    ``packaging`` compares versions; ``wheel`` provides ``bdist_wheel``, which pip's editable
    install calls, for setuptools older than 70.1 (newer ones carry their own).
    """
    import importlib.util

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            return False

    missing = [name for name in ("setuptools", "packaging") if not importable(name)]
    if not importable("wheel") and not importable("setuptools.command.bdist_wheel"):
        missing.append("wheel")
    return missing


def check_build_requirements() -> None:
    missing = missing_build_requirements()
    if missing:
        raise SystemExit(
            f"lora_kernels setup: missing build requirement(s): {', '.join(missing)}. "
            f"With --no-build-isolation pip does not install them; run {BUILD_REQUIREMENTS_HINT}"
        )


check_build_requirements()

from setuptools import find_packages, setup  # noqa: E402  (after the check: it names what is missing)

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0a"  # without a GPU: Ampere and Ada (sm_80 SASS), Hopper (sm_90a), compute_80 PTX for newer


def default_archs(torch) -> tuple[str, str]:
    """``(LORA_KERNELS_CUDA_ARCHS, where it came from)``: the variable if set; else the local GPU's
    compute capability (9.0 as "9.0a", for the Hopper kernels); else :data:`DEFAULT_ARCHS`."""
    if os.environ.get("LORA_KERNELS_CUDA_ARCHS"):
        return os.environ["LORA_KERNELS_CUDA_ARCHS"], "LORA_KERNELS_CUDA_ARCHS"
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""), f"the local GPU, {torch.cuda.get_device_name()}"
    except Exception:  # noqa: BLE001  (a broken driver: build for the default list)
        pass
    return DEFAULT_ARCHS, "no GPU here: the default list"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


FORCE_CUDA = _env_flag("LORA_KERNELS_FORCE_CUDA")
SKIP_CUDA = _env_flag("LORA_KERNELS_SKIP_CUDA")


# The setup.py commands that build (pip's: editable_wheel, bdist_wheel; by hand: build_ext, ...).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}


def _notice(message: str) -> None:
    """One line for the person installing.

    NOTE: pip captures a build backend's stdout and stderr, keeps them in its log and shows them
    only when the build fails or with ``pip install -v``. The line therefore goes to stderr (the
    log) and, where stderr is not itself a terminal, also to the controlling terminal if there is
    one, which pip does not capture (so without ``-v`` a person still sees it).
    """
    if not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return  # pip also runs setup.py for metadata only: the line is said once, by the build
    line = f"lora_kernels setup: {message}\n"
    sys.stderr.write(line)
    sys.stderr.flush()
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line)
    except OSError:
        pass


def _progress(message: str) -> None:
    """A line of the build's progress, for pip's log (``pip install -v`` shows it as it happens)."""
    print(f"lora_kernels build: {message}", flush=True)



# --------------------------------------------------------------------------- #
# Locating the CUDA toolkit
# --------------------------------------------------------------------------- #


def _is_toolkit(path: str | os.PathLike | None) -> bool:
    """A CUDA toolkit root: nvcc, the runtime headers and the runtime library."""
    if not path:
        return False
    root = Path(path)
    return (
        (root / "bin" / "nvcc").is_file()
        and (root / "include" / "cuda_runtime.h").is_file()
        and (root / "lib64" / "libcudart.so").exists()
    )


def _version_key(path: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(path.rsplit("cuda-", 1)[-1])
    except InvalidVersion:
        return Version("0")


def find_cuda_home() -> tuple[str | None, str]:
    """``(toolkit root, "")`` or ``(None, why not)``.

    Order: $CUDA_HOME, $CUDA_PATH; then nvcc on PATH, following symlinks and,
    where nvcc is a wrapper script, the nvcc it executes; then the usual
    install locations. A candidate counts only with bin/nvcc,
    include/cuda_runtime.h and lib64/libcudart.so present.
    """
    rejected = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return str(Path(value).resolve()), ""
            rejected.append(f"${var}={value} is not a CUDA toolkit")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates = [real.parent.parent]
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: look for the nvcc it runs
            text = head.decode("utf-8", "replace")
            candidates += [Path(m).resolve().parent.parent for m in re.findall(r"(/[^\s'\"`;]*/bin/nvcc)\b", text)]
        for cand in candidates:
            if _is_toolkit(cand):
                return str(cand), ""
        rejected.append(f"nvcc on PATH ({nvcc}) does not lead to a toolkit")
    fallbacks = ["/usr/local/cuda"]
    fallbacks += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    fallbacks += ["/opt/cuda"]
    for cand in fallbacks:
        if _is_toolkit(cand):
            return str(Path(cand).resolve()), ""
    rejected.append("no toolkit under /usr/local/cuda, /usr/local/cuda-*, /opt/cuda")
    return None, "; ".join(rejected)


def toolkit_version(cuda_home: str):
    """The toolkit's CUDA version from include/cuda.h (CUDA_VERSION = 1000·major + 10·minor)."""
    from packaging.version import Version

    text = (Path(cuda_home) / "include" / "cuda.h").read_text(errors="replace")
    match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", text)
    if not match:
        return None
    number = int(match.group(1))
    return Version(f"{number // 1000}.{(number % 1000) // 10}")


# --------------------------------------------------------------------------- #
# Compiler flags
# --------------------------------------------------------------------------- #


def arch_flags(spec: str) -> list[str]:
    """"8.0;9.0a" -> -gencode flags for sm_80 and sm_90a, plus compute_80 PTX.

    Entries may be separated by ';', ',' or spaces; "X.Y+PTX" asks for PTX of that entry.
    The PTX is for the family target (compute_90 for "9.0a+PTX", not compute_90a), so newer GPUs
    can JIT it. Without "+PTX" it is that of the newest entry without an "a"/"f" suffix (of the
    newest entry where all have one).

    NOTE: PTX of an entry without a suffix costs nvcc no device front-end pass of its own: the
    pass that compiles compute_80 for sm_80 also gives the compute_80 PTX (nvcc --dryrun: 2 cicc
    runs for "8.0;9.0a", 3 with compute_90 PTX). Newer GPUs (10.x, 12.x) run the sm_80 kernels
    from it (the sm_90a CUTLASS kernels run on 9.0 alone; host_plan.h: choose_sm90_gemm).
    """
    entries = [e for e in re.split(r"[;,\s]+", spec.strip()) if e]
    if not entries:
        raise SystemExit("LORA_KERNELS_CUDA_ARCHS is empty")
    parsed = []
    for entry in entries:
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if not match:
            raise SystemExit(f"LORA_KERNELS_CUDA_ARCHS: cannot parse {entry!r} (expected e.g. '8.0;9.0a')")
        major, minor, suffix, ptx = match.groups()
        parsed.append((int(major) * 10 + int(minor), suffix.lower(), bool(ptx)))
    if not any(ptx for _, _, ptx in parsed):
        newest = max(parsed, key=lambda p: (not p[1], p[0]))
        parsed = [(n, s, (n, s) == newest[:2]) for n, s, _ in parsed]
    flags = []
    for num, suffix, ptx in parsed:
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return list(dict.fromkeys(flags))


# --------------------------------------------------------------------------- #
# Sources of the extension and CUTLASS (the sm_90a kernels)
# --------------------------------------------------------------------------- #


def find_cutlass_include() -> tuple[str | None, str]:
    """``(CUTLASS include dir, "")`` or ``(None, why not)``: the directory holding ``cutlass/`` and ``cute/``.

    Order: $LORA_KERNELS_CUTLASS_DIR, then $CUTLASS_PATH (a CUTLASS checkout or its include/ dir),
    then the headers the pinned ``nvidia-cutlass`` wheel ships (``cutlass_library/source/include``).
    """

    def include_of(root: Path) -> Path | None:
        for cand in (root, root / "include", root / "source" / "include"):
            if (cand / "cutlass" / "cutlass.h").is_file() and (cand / "cute" / "tensor.hpp").is_file():
                return cand
        return None

    tried = []
    for var in ("LORA_KERNELS_CUTLASS_DIR", "CUTLASS_PATH"):
        value = os.environ.get(var)
        if value:
            found = include_of(Path(value))
            if found:
                return str(found.resolve()), ""
            # An explicit choice that does not hold the headers is an error, not a reason to look elsewhere.
            return None, f"${var}={value} has no cutlass/cutlass.h and cute/tensor.hpp (nor under include/)"
    # NOTE: located, not imported: importing cutlass_library parses sys.argv (setup.py's own
    # arguments) and exits on some of them.
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.origin:
        tried.append("the nvidia-cutlass wheel is not installed (no cutlass_library package)")
    else:
        package = Path(spec.origin).resolve().parent
        found = include_of(package / "source")
        if found:
            return str(found), ""
        tried.append(f"cutlass_library at {package} ships no C++ headers")
    return None, "; ".join(tried)


def cpu_sources() -> list[str]:
    """The sources of the CPU-only extension, which the CUDA build compiles too: the module
    (csrc/module.cpp) and the CPU kernels (csrc/cpu/*.cpp: the reference path's dropout mask,
    schemas beside their kernels)."""
    return ["csrc/module.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))


def cuda_sources(archs: str) -> tuple[list[str], list[str], list[str]]:
    """``(sources, include dirs, extra nvcc flags)`` of the extension for the arch list ``archs``.

    The sm_90a kernels (csrc/cuda/sm90/, built on CUTLASS/CuTe) are compiled when the list has
    an sm_90a entry ("9.0a"); they need the CUTLASS headers (``pip install nvidia-cutlass==4.2.0.0``,
    or LORA_KERNELS_CUTLASS_DIR / CUTLASS_PATH), and their absence is then an error.
    """
    sources = cpu_sources() + ["csrc/lora.cpp", "csrc/autograd.cpp", "csrc/cuda/ops.cpp"]
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    include_dirs = [str(ROOT / "csrc")]
    flags: list[str] = []
    if not any(re.fullmatch(r"9\.0a(\+PTX)?", e, flags=re.IGNORECASE) for e in re.split(r"[;,\s]+", archs.strip())):
        return sources, include_dirs, flags
    cutlass_include, why = find_cutlass_include()
    if cutlass_include is None:
        raise SystemExit(
            "lora_kernels setup: the sm_90a kernels (LORA_KERNELS_CUDA_ARCHS contains 9.0a) need the CUTLASS "
            f"headers: {why}. Fix: pip install nvidia-cutlass==4.2.0.0, or set LORA_KERNELS_CUTLASS_DIR to a "
            "CUTLASS checkout, or build without Hopper kernels (LORA_KERNELS_CUDA_ARCHS=8.0)"
        )
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda" / "sm90").glob("*.cu"))
    include_dirs.append(cutlass_include)
    # NOTE: -DNDEBUG matters: an assert() in CUTLASS's mainloop is a function call, across which
    # ptxas serialises the wgmma pipeline (warning C7510). The -U flags undo PyTorch's
    # __CUDA_NO_HALF*__ defines, which CUTLASS's half/bfloat16 types do not expect.
    flags += [
        "-DLORA_KERNELS_SM90",
        "-DNDEBUG",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return sources, include_dirs, flags


def cxx_flags() -> list[str]:
    """Host compiler flags of both builds."""
    # NOTE: -fopenmp: at::parallel_for (csrc/cpu/) is a header template that runs serially without it.
    return (["-O0", "-g"] if _env_flag("LORA_KERNELS_DEBUG") else ["-O3"]) + ["-fopenmp"]


def _depends() -> list[str]:
    """The headers: a changed one rebuilds (ninja tracks the includes of each source)."""
    return sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.h*"), recursive=True))


def cpu_extensions(why_no_cuda: str) -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for the extension with its CPU kernels only, or empty ones
    (without PyTorch); the one line says which and names ``why_no_cuda``."""
    try:
        import torch
    except ImportError as exc:
        _notice(f"not building lora_kernels._C (PyTorch cannot be imported: {exc}; install torch first and "
                "build with --no-build-isolation); the Triton and reference backends install as usual")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        name="lora_kernels._C",
        sources=cpu_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
        depends=_depends(),
        # A failed build (no working C++ compiler) installs the package without _C (see fixed_build_dir).
        optional=True,
    )
    _notice(
        f"building lora_kernels._C with the CPU kernels only (no CUDA kernels: {why_no_cuda}) "
        f"in {build_dir(torch).relative_to(ROOT)}/; if it cannot be compiled the package installs without it"
    )
    return [ext], {"build_ext": fixed_build_dir(BuildExtension, build_dir(torch))}


def extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)``: the extension with the CUDA kernels where they can be built,
    else with the CPU kernels only (:func:`cpu_extensions`)."""
    if SKIP_CUDA:
        return cpu_extensions("LORA_KERNELS_SKIP_CUDA is set")

    def unavailable(why: str):
        if FORCE_CUDA:
            raise SystemExit(f"lora_kernels setup: LORA_KERNELS_FORCE_CUDA=1 but the CUDA extension cannot be built: {why}")
        return cpu_extensions(f"{why}; LORA_KERNELS_FORCE_CUDA=1 makes this an error")

    cuda_home, why = find_cuda_home()
    if cuda_home is None:
        return unavailable(f"no CUDA toolkit found: {why}")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError as exc:
        return unavailable(f"PyTorch cannot be imported ({exc}); install torch first and build with --no-build-isolation")
    from packaging.version import Version
    if torch.version.cuda is None:
        return unavailable(f"PyTorch {torch.__version__} is not a CUDA build")
    tk = toolkit_version(cuda_home)
    torch_cuda = Version(torch.version.cuda)
    if tk is None or tk.major != torch_cuda.major:
        return unavailable(f"the toolkit at {cuda_home} is CUDA {tk}, PyTorch was built with CUDA {torch_cuda}")

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs, archs_from = default_archs(torch)
    nvcc = ["-O3"] + arch_flags(archs)
    if _env_flag("LORA_KERNELS_DEBUG"):
        nvcc += ["-G", "-g"]
    elif _env_flag("LORA_KERNELS_LINEINFO"):
        nvcc += ["-lineinfo"]
    if _env_flag("LORA_KERNELS_PTXAS_VERBOSE"):
        nvcc += ["-Xptxas=-v"]
    if os.environ.get("NVCC_THREADS"):
        nvcc += ["--threads", os.environ["NVCC_THREADS"]]

    sources, include_dirs, source_flags = cuda_sources(archs)
    nvcc += source_flags
    # The CUDA ops' torch side (csrc/cuda/ops.cpp, host compiler) calls the sm_90a kernels where built.
    cxx = cxx_flags() + [f for f in source_flags if f == "-DLORA_KERNELS_SM90"]
    # The sm_90a kernels' CUTLASS headers are the include directory after csrc/ (cuda_sources).
    # NOTE: read before CUDAExtension, which appends torch's include directories to the list.
    cutlass = f", CUTLASS headers from {include_dirs[1]}" if len(include_dirs) > 1 else ""
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
        depends=_depends(),
    )
    _notice(
        f"building lora_kernels._C with the CUDA kernels for {describe_archs(nvcc)} ({archs_from}) with CUDA {tk} "
        f"({cuda_home}{cutlass}) in {build_dir(torch).relative_to(ROOT)}/ (unchanged objects are reused); "
        "LORA_KERNELS_SKIP_CUDA=1 builds the CPU kernels only, LORA_KERNELS_CUDA_ARCHS chooses the GPUs"
    )
    return [ext], {"build_ext": fixed_build_dir(BuildExtension, build_dir(torch))}


# --------------------------------------------------------------------------- #
# A fixed build directory and the build's one line
# --------------------------------------------------------------------------- #


def build_dir(torch) -> Path:
    """Where the compiled objects live: one directory per platform, Python and torch.

    NOTE: pip's editable install points build_temp at a fresh temporary directory, which made
    every reinstall recompile everything; ninja, given the same directory, rebuilds only what
    changed (sources, headers, flags), so a reinstall with nothing changed only relinks.
    """
    import sysconfig

    tag = f"{sysconfig.get_platform()}-cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
    return ROOT / "build" / f"temp.{re.sub(r'[^A-Za-z0-9._-]', '_', tag)}"


def fixed_build_dir(base, directory: Path):
    """``base`` (torch's BuildExtension) with its ``build_temp`` fixed to ``directory``, whatever
    pip set, and a failed build of optional extensions (the CPU-only ``_C``) skipped with one line."""

    class LoraBuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(directory)

        def build_extension(self, ext):
            # NOTE: torch's BuildExtension has replaced self.compiler.compile by its ninja build by now.
            self.compiler.compile = sm90_only_for_sm90a(self.compiler.compile)
            archs = describe_archs((getattr(ext, "extra_compile_args", None) or {}).get("nvcc", [])) or "host"
            logs = [Path(self.build_temp) / ".ninja_log", Path(self.build_temp) / SM90_SUBDIR / ".ninja_log"]
            before = {line for log in logs if log.is_file() for line in log.read_text(errors="replace").splitlines()}
            # ninja prints each command as it finishes, prefixed with the count done and the time so far.
            os.environ.setdefault("NINJA_STATUS", "[%f/%t done, %es] ")
            jobs = os.environ.get("MAX_JOBS")
            jobs = f"up to {jobs} at a time (MAX_JOBS)" if jobs else "as many at a time as ninja's default (MAX_JOBS unset)"
            sm90 = sum(Path(s).parent.name == "sm90" for s in ext.sources)
            archs += f"; the {sm90} in csrc/cuda/sm90/ for sm_90a alone" if sm90 else ""
            _progress(f"{ext.name}: {len(ext.sources)} translation units for {archs}, {jobs}, objects in {self.build_temp}")
            start = time.monotonic()
            try:
                super().build_extension(ext)
            finally:
                _report_units(logs, before, time.monotonic() - start)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                # NOTE: setuptools skips a failed optional extension only on CompileError & co.;
                # torch's build raises others (RuntimeError from ninja, CalledProcessError when it
                # probes a broken compiler, FileNotFoundError for none), which would abort the install.
                if not all(ext.optional for ext in self.extensions):
                    raise
                first = next((l for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
                _notice(f"compiling lora_kernels._C failed ({type(exc).__name__}: {first}); the package installs "
                        "without it (the reference path computes the same dropout masks with PyTorch ops)")
                self.warn(f"building the optional extension lora_kernels._C failed: {exc}")

    return LoraBuildExt


def sm90_only_for_sm90a(compile_):
    """``compile_`` (torch's ninja compile), with the sm_90a CUTLASS sources (csrc/cuda/sm90/)
    compiled for sm_90a alone.

    NOTE: their kernels exist only for sm_90a (wgmma, setmaxnreg); for sm_80 (and the PTX),
    CUTLASS compiles a trap stub, each after its own device front-end pass over CUTLASS's
    templates (nvcc --dryrun: 3 cicc, 3 ptxas, 5 gcc runs; for sm_90a alone 1, 1, 3): measured,
    73.6 s of CPU per unit became 53.6 s. The launchers call them on 9.0 devices only
    (host_plan.h). They are compiled by a second ninja run, with its own ninja file in
    ``SM90_SUBDIR`` of the build directory, side by side with the first.

    NOTE: side by side, not after: the CUTLASS unit is the build's longest (~60 s of CPU); started
    after the others it ran alone on an otherwise idle core (2 cores: 142 s of wall, ~110 s now).
    """

    def compile_in_two(sources, *args, extra_postargs=None, **kwargs):
        sm90 = [s for s in sources if Path(s).parent.name == "sm90" and s.endswith(".cu")]
        nvcc = extra_postargs.get("nvcc") if isinstance(extra_postargs, dict) else None
        if not sm90 or not nvcc:
            return compile_(sources, *args, extra_postargs=extra_postargs, **kwargs)
        rest = [s for s in sources if s not in sm90]
        only = [f for f in nvcc if not f.startswith("-gencode") or f.endswith("code=sm_90a")]
        sm90_kwargs = dict(kwargs, extra_postargs={**extra_postargs, "nvcc": only})
        if args or kwargs.get("output_dir") is None:  # (not how setuptools calls it: one run after the other)
            objects = compile_(rest, *args, extra_postargs=extra_postargs, **kwargs) if rest else []
            return objects + compile_(sm90, *args, **sm90_kwargs)
        sm90_kwargs["output_dir"] = os.path.join(kwargs["output_dir"], SM90_SUBDIR)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            sm90_objects = pool.submit(compile_, sm90, **sm90_kwargs)
            objects = compile_(rest, extra_postargs=extra_postargs, **kwargs) if rest else []
            return objects + sm90_objects.result()

    return compile_in_two


SM90_SUBDIR = "sm90a"  # the sm_90a units' ninja file and objects, inside the build directory


def _report_units(logs: list[Path], before: set, seconds: float) -> None:
    """The build's closing lines: each translation unit compiled this time, with its time (from
    ninja's logs), slowest first, and the total."""
    units = []
    for log in logs:
        if not log.is_file():
            continue
        for line in log.read_text(errors="replace").splitlines():
            fields = line.split("\t")
            if line in before or len(fields) != 5 or not fields[0].isdigit():
                continue
            units.append(((int(fields[1]) - int(fields[0])) / 1000, fields[3]))
    root = f"{logs[0].parent}{os.sep}"
    for secs, obj in sorted(units, reverse=True):
        _progress(f"  {secs:6.1f} s  {obj.removeprefix(root)}")
    _progress(f"{len(units)} translation unit(s) compiled (the others unchanged), {seconds:.0f} s in all")


def describe_archs(nvcc_flags: list[str]) -> str:
    """"sm_80, sm_90a (+PTX compute_80)" from the -gencode flags."""
    sass, ptx = [], []
    for flag in nvcc_flags:
        match = re.fullmatch(r"-gencode=arch=compute_\w+,code=(sm|compute)_(\w+)", flag)
        if match:
            (sass if match.group(1) == "sm" else ptx).append(f"{match.group(1)}_{match.group(2)}")
    return ", ".join(sass) + (f" (+PTX {', '.join(ptx)})" if ptx else "")


ext_modules, cmdclass = extensions()

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for LoRA linear layers",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.8"],
    extras_require={
        "triton": ["triton>=3.4"],
        "integration": ["peft", "transformers", "safetensors"],
        "analysis": ["safetensors", "matplotlib"],
        "bench": ["peft", "matplotlib", "tqdm"],
        # QLoRA: a bitsandbytes 4-bit base (lora_kernels.nf4); tested with bitsandbytes 0.50.
        "qlora": ["bitsandbytes>=0.50", "peft"],
        # Everything the test suite exercises (tests of optional packages skip without them): the
        # engines (DeepSpeed on its CPU accelerator, accelerate) and bitsandbytes' CPU build included.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "peft", "transformers", "safetensors",
                 "matplotlib", "accelerate", "deepspeed", "bitsandbytes>=0.50"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
