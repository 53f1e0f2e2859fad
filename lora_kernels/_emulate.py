"""An emulated GPU target on the CPU: every decision an sm_90 or sm_80 GPU takes, executed and checked.

Under Triton's interpreter alone the package takes the interpreter's branches: one config per
kernel, no pruning, no exclusion lookups, no TMA, no autotuner, no direct launches. Inside
:func:`emulate` (``"sm90"`` or ``"sm80"``) it takes the GPU's:

- **decisions** (:func:`lora_kernels._runtime.target`): the chip's capability, SM count and
  shared memory per block; hence the full config lists, pruning by shared memory, exclusion-table
  lookups for the chip's arch, TMA with host tensor descriptors (sm_90), GPU block sizes and grids
  (persistent grids of 132 or 108 programs), and the cost model's plans for that chip;
- **Triton's own launch path**: every kernel of the three families (single adapter, multi-adapter,
  4-bit base) becomes a real ``JITFunction`` over a stand-in driver for that target, so Triton's
  ``Autotuner.run`` prunes as on a GPU (positional and keyword arguments as it passes them) and
  benchmarks every surviving config through a deterministic stand-in; the binder, the
  specialization key, the compile-cache lookup, the compiled kernel's launcher and the package's
  direct launches (:mod:`lora_kernels._triton_launch`) all run for real;
- **execution**: where a launch would reach the driver, the kernel's body runs under the interpreter
  with the arguments the launcher was given, i.e. with the chosen config's constexprs: BLOCK sizes
  take their GPU values. ``num_stages`` and ``num_warps`` have no meaning there (recorded only).

What it cannot show (a GPU must): code generation (register allocation and spills, shared-memory
layout: the compile check covers those ahead of time), timing, races between programs (the
interpreter runs them one after another), and the TMA hardware (descriptors are read as strided
views, their bounds and zero fill emulated).
"""

from __future__ import annotations

import contextlib
import importlib
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import _runtime

# Modules whose @triton.jit kernels (module attributes named ``_*_kernel``) are launched from the host.
KERNEL_MODULES = ("lora_kernels.triton_ops", "lora_kernels.multi_lora.triton_ops", "lora_kernels.nf4.triton_ops")


@dataclass
class LaunchRecord:
    """One launch that reached the stand-in driver."""

    kernel: str
    grid: tuple
    constexprs: dict  # the kernel's compile-time arguments as launched (BLOCK sizes, variant flags)
    options: dict  # num_warps, num_stages and the other compile options of its compiled kernel
    benchmark: bool  # launched by the autotuner's benchmark of one config


@dataclass
class Emulation:
    """What happened inside :func:`emulate`: compiles, launches, benchmarks."""

    target: _runtime.Target
    execute: bool
    execute_benchmarks: bool
    compiled: list = field(default_factory=list)  # StandInKernel, one per compile (cache miss)
    launches: list = field(default_factory=list)  # LaunchRecord, in launch order
    calls: list = field(default_factory=list)  # (StandInKernel, the launcher's positional arguments)
    dispatched: list = field(default_factory=list)  # kernel names, per launch through JITFunction.run
    _benchmarking: bool = False

    def mark(self) -> tuple[int, int]:
        """A point in the record, for :meth:`since`."""
        return len(self.launches), len(self.dispatched)

    def since(self, mark: tuple[int, int]) -> tuple[list, list]:
        """``(launches, dispatched)`` after ``mark``: a launch not among those dispatched went directly
        to the compiled kernel's launcher (a cached plan's direct launch)."""
        return self.launches[mark[0]:], self.dispatched[mark[1]:]

    def launched(self, kernel: str, benchmark: Optional[bool] = False) -> list:
        """The launches of ``kernel`` (all, or only the autotuner's benchmarks / only the real ones)."""
        return [r for r in self.launches if r.kernel == kernel and (benchmark is None or r.benchmark == benchmark)]


_ACTIVE: Optional[Emulation] = None


class StandInKernel:
    """What a compiled kernel offers its callers (``run``, ``function``, ``packed_metadata``,
    ``launch_metadata``). ``run`` records the launch and, when executing, runs the kernel's body
    under Triton's interpreter with the launcher's arguments (the bound arguments, constexprs
    included, in the kernel's parameter order)."""

    def __init__(self, src, options: Optional[dict] = None, execute: bool = False, interpreted=None) -> None:
        jit = getattr(src, "fn", None)
        self.name = getattr(jit, "__name__", "?")
        self.src, self.function, self.packed_metadata = src, 0, None
        self.options = dict(options or {})
        self.execute, self.interpreted = execute, interpreted
        self.arg_names = list(getattr(jit, "arg_names", []))
        self.constexpr_names = {p.name for p in getattr(jit, "params", []) if getattr(p, "is_constexpr", False)}

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        grid, bound = tuple(args[:3]), args[9:]
        emulation = _ACTIVE
        if emulation is not None:
            emulation.calls.append((self, args))
            constexprs = {n: v for n, v in zip(self.arg_names, bound) if n in self.constexpr_names}
            emulation.launches.append(LaunchRecord(self.name, grid, constexprs, self.options, emulation._benchmarking))
        if self.execute and (emulation is None or emulation.execute_benchmarks or not emulation._benchmarking):
            self.interpreted[grid](*bound)


class StandInDriver:
    """The calls of Triton's active driver that binding, dispatch and autotuning make, for ``arch``."""

    device = 0  # the current device (a test may change it)

    def __init__(self, arch: int = 90) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        return stand_in_benchmark


def stand_in_benchmark(kernel_call, quantiles=None, **kwargs):
    """The autotuner's benchmark of one config: the config is launched once through Triton's launch
    path, with the autotuner's pre- and post-hooks (restore_value, reset_to_zero, the TMA block
    shapes), its body executed only with ``execute_benchmarks``; its "time" is a deterministic
    function of what was launched (kernel, constexprs, warps, stages): the choice among configs is
    reproducible and differs between kernels, so different configs end up running."""
    emulation = _ACTIVE
    first = len(emulation.launches) if emulation is not None else 0
    if emulation is not None:
        emulation._benchmarking = True
    try:
        kernel_call()
    finally:
        if emulation is not None:
            emulation._benchmarking = False
    launched = emulation.launches[first:] if emulation is not None else []
    key = repr([(r.kernel, sorted(r.constexprs.items(), key=str), sorted(r.options.items())) for r in launched])
    t = float(zlib.crc32(key.encode()) % 1000 + 1)
    return [t, t, t] if quantiles else t


def _kernels() -> list:
    """``(module, attribute name, interpreted kernel)`` of every host-launched kernel."""
    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") and attr.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "run"):
                found.append((module, attr, value))
    return found


def clear_caches() -> None:
    """Forget everything a launch decided (plans, autotuners and their choices), in every family."""
    from . import triton_ops
    from .multi_lora import triton_ops as multi
    from .nf4 import triton_ops as nf4

    triton_ops.clear_launch_caches()
    triton_ops._autotuned.cache_clear()
    multi._sgmv_gemm.cache_clear()
    nf4._autotuned.cache_clear()


@contextlib.contextmanager
def emulate(name: str, execute: bool = True, execute_benchmarks: bool = False) -> Iterator[Emulation]:
    """Take GPU ``name``'s decisions (``"sm90"``, ``"sm80"``) and run Triton's launch path over a
    stand-in driver for it (:func:`stand_in_triton`), executing each launch's kernel body under the
    interpreter (unless ``execute`` is False: then launches are recorded only, their outputs left
    unwritten). The autotuner's benchmark launches execute too with ``execute_benchmarks`` (each
    surviving config then really runs once per tuning key; slower).

    Needs ``TRITON_INTERPRET=1`` before Triton's import and a Triton with ``knobs`` (3.4+). Yields the
    :class:`Emulation` record. Not re-entrant; restores the driver, the kernels and every cache on exit.
    """
    with _runtime.emulated(name) as tgt:
        with stand_in_triton(tgt.arch, execute, execute_benchmarks) as record:
            record.target = tgt
            yield record


@contextlib.contextmanager
def stand_in_triton(arch: int = 90, execute: bool = False, execute_benchmarks: bool = False) -> Iterator[Emulation]:
    """Every host-launched kernel of the package as a real ``JITFunction`` over a stand-in driver for
    ``arch``, on CPU tensors, with the launch decisions of whatever target is current (the
    interpreter's, unless :func:`emulate` set one): Triton's autotuner dispatch, ``JITFunction.run``
    (binding, the specialization key, the cache lookup) and the package's direct launches run as on
    a GPU; compiling makes a :class:`StandInKernel`, whose launcher executes the kernel body under
    the interpreter when ``execute``, else only records the launch."""
    global _ACTIVE
    import triton.compiler
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if _ACTIVE is not None:
        raise RuntimeError("the stand-in Triton launch path is already active")
    kernels = _kernels()
    record = Emulation(_runtime.INTERPRETER, execute, execute_benchmarks)
    # NOTE: keyed by id(): hashing a JITFunction computes its cache key, which walks the helpers it
    # calls, and those are interpreted functions here.
    wrapped = {id(k): JITFunction(getattr(k, "fn", k)) for _, _, k in kernels}
    by_wrapper = {id(wrapped[id(k)]): k for _, _, k in kernels}

    def stand_in_compile(src, *args, options=None, **kwargs):
        kernel = StandInKernel(src, options, execute, by_wrapper.get(id(getattr(src, "fn", None))))
        record.compiled.append(kernel)
        return kernel

    saved_driver, saved_compile, saved_run = dict(driver.__dict__), triton.compiler.compile, JITFunction.run

    def counted_run(self, *args, **kwargs):
        record.dispatched.append(getattr(self, "__name__", "?"))
        return saved_run(self, *args, **kwargs)

    clear_caches()
    triton.compiler.compile = stand_in_compile
    JITFunction.run = counted_run
    driver.set_active(StandInDriver(arch))
    for module, attr, kernel in kernels:
        setattr(module, attr, wrapped[id(kernel)])
    _ACTIVE = record
    try:
        yield record
    finally:
        _ACTIVE = None
        for module, attr, kernel in kernels:
            setattr(module, attr, kernel)
        triton.compiler.compile = saved_compile
        JITFunction.run = saved_run
        driver.__dict__.clear()
        driver.__dict__.update(saved_driver)
        clear_caches()


_PROCESS: list = []  # the process-wide stand-in (for_this_process), kept open until exit


def for_this_process() -> Emulation:
    """The stand-in launch path of :func:`stand_in_triton` for the current emulated target, for the
    rest of the process (``LORA_KERNELS_EMULATE``: set before import, the package calls this)."""
    if not _PROCESS:
        tgt = _runtime.emulated_target()
        if tgt is None:
            raise RuntimeError("no emulated target is set (LORA_KERNELS_EMULATE=sm90|sm80)")
        context = stand_in_triton(tgt.arch, execute=True)
        record = context.__enter__()
        record.target = tgt
        _PROCESS.append((context, record))
    return _PROCESS[0][1]
