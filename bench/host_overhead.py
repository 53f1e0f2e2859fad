"""Host overhead per call of the Triton path, and the launches each forward and backward makes.

    python bench/host_overhead.py                 # on the CPU: Triton launches replaced by no-ops
    python bench/host_overhead.py --real          # on a GPU: real launches, CPU-side timer
    python bench/host_overhead.py --real --shape 512,4096,4096,16   # the issue's GPU-vs-host check

Without a GPU, every Triton kernel launch (``JITFunction.run`` / the interpreter's
``InterpretedFunction.run``, which every ``kernel[grid](...)`` and every autotuner
reaches) is replaced by a no-op that only counts it, so the time per call is the
package's own host path: module, checks, autograd, the registered op, the
launcher's argument building and the autotuner's dispatch; Triton's own launcher
(argument binding, cache lookup, driver call) is not in it. Torch kernels on the
path (a seed draw, a partial sum) are counted with a dispatch mode. The shapes are
tiny: the times are host time, not GPU time.

Without a GPU it also runs the layer's kernels as real ``JITFunction``s over a stand-in
driver (:func:`jit_on_cpu`), so that Triton's launch path (binding, specialization key,
cache lookup) is timed as on a GPU, through ``JITFunction.run`` and with the plans' direct
launches (lora_kernels/_triton_launch.py); only compiling and the C launcher are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():  # before Triton is imported: CPU tensors run under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that allocate or make views: no kernel runs.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "view", "reshape", "t", "transpose", "permute", "expand",
              "as_strided", "unsqueeze", "squeeze", "select", "slice", "_reshape_alias", "set_"}


def _launch_points() -> list[tuple[type, str]]:
    """``(class, method)`` pairs through which every Triton kernel launch passes.

    Compiled kernels launch through ``JITFunction.run``; interpreted ones through
    ``InterpretedFunction.run`` where it exists (its counterpart: the interpreter's own
    ``GridExecutor`` set-up, which a GPU never runs, is left out of the host time), else
    ``GridExecutor.__call__`` (3.4's ``InterpretedFunction`` has no ``run`` method, it builds
    a ``GridExecutor`` from ``kernel[grid]`` directly).
    """
    from triton.runtime.jit import JITFunction

    from lora_kernels._triton_launch import Direct

    points = [(JITFunction, "run"), (Direct, "__call__")]
    try:
        from triton.runtime.interpreter import GridExecutor, InterpretedFunction
    except ImportError:
        return points
    points.append((InterpretedFunction, "run") if "run" in InterpretedFunction.__dict__ else (GridExecutor, "__call__"))
    return points


class LaunchCounter(TorchDispatchMode):
    """Counts Triton kernel launches (by kernel name) and, with ``torch_ops``, torch kernels.

    ``suppress=True`` turns every Triton launch into a no-op (outputs stay unwritten).
    Triton launches are caught on the kernel classes themselves, so any ``@triton.jit``
    kernel counts, autotuned or not, whatever module launches it.
    """

    def __init__(self, suppress: bool = False, torch_ops: bool = True) -> None:
        super().__init__()
        self.suppress, self.torch_ops = suppress, torch_ops
        self.triton: list[str] = []
        self.torch: list[str] = []
        self._depth = 0  # inside a Triton launch (the interpreter runs torch ops of its own)
        self._saved: list[tuple[type, Callable]] = []

    def reset(self) -> None:
        self.triton, self.torch = [], []

    def __enter__(self):
        from lora_kernels._triton_launch import Direct

        counter = self
        for cls, method in _launch_points():
            self._saved.append((cls, method, cls.__dict__.get(method)))

            def run(fn_self, *args, _original=getattr(cls, method), _direct=cls is Direct, **kwargs):
                if kwargs.get("warmup"):  # a compile-only call, not a launch
                    return _original(fn_self, *args, **kwargs)
                fn = getattr(fn_self, "fn", None)
                name = getattr(fn_self, "__name__", None) or getattr(fn, "__name__", None) or "?"
                if _direct and not counter.suppress:  # counted only where it launches (else JITFunction.run does)
                    launched = _original(fn_self, *args, **kwargs)
                    if launched:
                        counter.triton.append(name)
                    return launched
                counter.triton.append(name)
                if counter.suppress:
                    return True if _direct else None
                counter._depth += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    counter._depth -= 1

            setattr(cls, method, run)
        if self.torch_ops:
            # NOTE: with a dispatch mode active, lora_kernels.ops takes the registered op (its tracing
            # path), which would hide the launcher's torch ops from the mode: keep the eager path.
            from lora_kernels import ops

            self._tracing = ops.tracing
            ops.tracing = lambda: torch.compiler.is_compiling()
            super().__enter__()
        return self

    def __exit__(self, *exc):
        if self.torch_ops:
            super().__exit__(*exc)
            from lora_kernels import ops

            ops.tracing = self._tracing
        for cls, method, original in reversed(self._saved):
            if original is None:
                delattr(cls, method)
            else:
                setattr(cls, method, original)
        self._saved = []
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._depth == 0 and func.overloadpacket.__name__ not in _NO_KERNEL and not func.is_view:
            self.torch.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(suppress: bool = False, torch_ops: bool = True) -> Iterator[LaunchCounter]:
    with LaunchCounter(suppress, torch_ops) as c:
        yield c


@contextlib.contextmanager
def jit_on_cpu() -> Iterator[list]:
    """The package's Triton kernels as real ``JITFunction``s over a stand-in sm_90 driver, on CPU
    tensors (:func:`lora_kernels._emulate.stand_in_triton`), with the interpreter's launch decisions.

    Triton's own launch path (the autotuner's dispatch, ``JITFunction.run``: binding, the
    specialization key, the cache lookup) and the package's direct launches run as on a GPU; only
    compiling (each kernel is a stand-in) and the driver's launch are left out: nothing executes.
    Yields the launcher calls, as ``(stand-in kernel, arguments)``. Needs ``TRITON_INTERPRET=1``
    (the package's CPU set-up) and a Triton with knobs (3.4+).
    """
    from lora_kernels import _emulate

    with _emulate.stand_in_triton(90, execute=False) as record:
        yield record.calls


def make_layer(M: int, K: int, N: int, r: int, dropout: float, device: torch.device, dtype: torch.dtype):
    from lora_kernels import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    layer = LoRALinear.from_linear(base, r=r, alpha=16.0, dropout=dropout, backend="triton").train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return layer, x, dy


def _clear(layer, x) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def launches_per_call(layer, x, dy, plan: Optional[str] = None) -> dict:
    """Triton launches and torch kernels of one steady-state forward and one backward."""
    from lora_kernels import triton_ops

    before, triton_ops.FORWARD_PLAN = triton_ops.FORWARD_PLAN, plan
    try:
        layer(x).backward(dy)  # warm: autotuning, caches
        _clear(layer, x)
        with counting() as c:
            y = layer(x)
            fwd = (list(c.triton), list(c.torch))
            c.reset()
            y.backward(dy)
            bwd = (list(c.triton), list(c.torch))
        _clear(layer, x)
    finally:
        triton_ops.FORWARD_PLAN = before
    return {"fwd_triton": fwd[0], "fwd_torch": fwd[1], "bwd_triton": bwd[0], "bwd_torch": bwd[1]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_times(layer, x, dy, reps: int, suppress: bool, plan: Optional[str] = None) -> dict:
    """Median (and 20th/80th percentile) host µs of one forward and one backward."""
    from lora_kernels import triton_ops

    before, triton_ops.FORWARD_PLAN = triton_ops.FORWARD_PLAN, plan
    fwd, bwd = [], []
    try:
        with counting(suppress=suppress, torch_ops=False):
            for i in range(reps + 5):
                _sync(x.device)
                t0 = time.perf_counter_ns()
                y = layer(x)
                t1 = time.perf_counter_ns()
                y.backward(dy)
                t2 = time.perf_counter_ns()
                _clear(layer, x)
                if i >= 5:
                    fwd.append((t1 - t0) / 1e3)
                    bwd.append((t2 - t1) / 1e3)
    finally:
        triton_ops.FORWARD_PLAN = before

    def stats(v):
        q = statistics.quantiles(v, n=5)
        return {"us": statistics.median(v), "p20": q[0], "p80": q[3]}

    return {"fwd": stats(fwd), "bwd": stats(bwd)}


def _module_times(module, x, dy, reps: int, params=()) -> dict:
    """The same timer around any module's forward and backward (it computes for real)."""
    fwd, bwd = [], []
    for i in range(reps + 5):
        _sync(x.device)
        t0 = time.perf_counter_ns()
        y = module(x)
        t1 = time.perf_counter_ns()
        y.backward(dy)
        t2 = time.perf_counter_ns()
        x.grad = None
        for p in params:
            p.grad = None
        if i >= 5:
            fwd.append((t1 - t0) / 1e3)
            bwd.append((t2 - t1) / 1e3)
    return {"fwd": {"us": statistics.median(fwd)}, "bwd": {"us": statistics.median(bwd)}}


def frozen_times(M: int, K: int, N: int, device, dtype, reps: int) -> dict:
    """The same timer around a frozen nn.Linear (on the CPU it computes its tiny GEMM)."""
    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return _module_times(lin, x, dy, reps)


def peft_times(M: int, K: int, N: int, r: int, dropout: float, device, dtype, reps: int) -> Optional[dict]:
    """The same timer around PEFT's whole ``lora.Linear`` (its real compute included); None without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class _Wrapper(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    config = LoraConfig(target_modules=["proj"], r=r, lora_alpha=16.0, lora_dropout=dropout)
    layer = get_peft_model(_Wrapper(base), config, autocast_adapter_dtype=False).base_model.model.proj.train()
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return _module_times(layer, x, dy, reps, [p for p in layer.parameters() if p.requires_grad])


@contextlib.contextmanager
def stubbed_cuda_ops() -> Iterator[None]:
    """CPU kernels for ``cuda_lora_forward`` / ``cuda_lora_backward`` that only allocate their outputs,
    so the cuda backend's host path runs on the CPU with its launches left out (as Triton's above)."""
    lib = torch.library.Library("lora_kernels", "IMPL")
    lib.impl("cuda_lora_forward",
             lambda x, w, b, A, B, s, p, seed: (x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], A.shape[0])),
             "CPU")
    lib.impl("cuda_lora_backward",
             lambda dy, x, w, A, B, xa, s, p, seed, need_x: (torch.empty_like(x) if need_x else x.new_empty(0),
                                                             torch.empty_like(A), torch.empty_like(B)),
             "CPU")
    try:
        yield
    finally:
        lib._destroy()


def cuda_function_times(M: int, K: int, N: int, r: int, reps: int) -> Optional[dict]:
    """Host µs of the cuda backend's layer below ``lora_linear``'s checks, its two ops stubbed
    (:func:`stubbed_cuda_ops`; CPU only): the Python ``LoRALinearFunction`` over them against
    ``cuda_ops.lora_linear``, the autograd in C++. None where the CUDA kernels are not built."""
    try:
        from lora_kernels import cuda_ops
    except ImportError:
        return None
    from lora_kernels.functional import LoRALinearFunction, call_seed

    torch.manual_seed(0)
    w = torch.randn(N, K)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    seed = call_seed(0.0, None, x.device)
    calls = {
        "python Function": lambda x: LoRALinearFunction.apply(x, w, None, A, B, 2.0, 0.0, seed, "cuda")[0],
        "C++ autograd": lambda x: cuda_ops.lora_linear(x, w, None, A, B, 2.0, 0.0, seed),
    }
    with stubbed_cuda_ops():
        return {name: _module_times(f, x, dy, reps, (A, B)) for name, f in calls.items()}


def gpu_times(layer, x, dy, steps: int = 10) -> dict:
    """GPU only: µs per call of the GPU's own work (the kernels and copies the profiler saw on the
    device, summed) and of the wall clock (CUDA events around ``steps`` back-to-back calls, which
    is the larger of GPU and host time), for a forward and for a forward+backward."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def fwd():
        layer(x)

    def fwd_bwd():
        layer(x).backward(dy)
        _clear(layer, x)

    out = {}
    for name, call in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for _ in range(3):  # warm: compile, tune, caches
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                call()
            torch.cuda.synchronize()
        device_us = sum(e.time_range.elapsed_us() for e in prof.events()  # kernels, copies; no GPU-side ranges
                        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            call()
        end.record()
        torch.cuda.synchronize()
        out[name] = {"gpu": device_us / steps, "wall": start.elapsed_time(end) * 1e3 / steps}
    return out


def _triton_launch_available() -> bool:
    from lora_kernels import _triton_launch, triton_ops

    return triton_ops.INTERPRET and _triton_launch._knobs is not None


def jit_launch_times(M: int, K: int, N: int, r: int, reps: int, repeats: int) -> dict:
    """CPU only: host µs of the layer (plan fused) with Triton's launch path run as on a GPU
    (:func:`jit_on_cpu`), its launches through ``JITFunction.run`` against direct
    (lora_kernels/_triton_launch.py); medians over ``repeats`` interleaved rounds of ``reps`` calls."""
    from lora_kernels import _triton_launch

    rows: dict = {}
    saved = _triton_launch.DIRECT
    try:
        with jit_on_cpu() as calls:
            for _ in range(repeats):
                for p_drop in (0.0, 0.1):
                    layer, x, dy = make_layer(M, K, N, r, p_drop, torch.device("cpu"), torch.float32)
                    for how, direct in (("JITFunction.run", False), ("direct", True)):
                        _triton_launch.DIRECT = direct
                        t = host_times(layer, x, dy, reps, suppress=False, plan="fused")
                        calls.clear()
                        rows.setdefault((p_drop, how), []).append(t)
    finally:
        _triton_launch.DIRECT = saved
    return {key: {"fwd": statistics.median(t["fwd"]["us"] for t in runs),
                  "bwd": statistics.median(t["bwd"]["us"] for t in runs),
                  "fwd_bwd": statistics.median(t["fwd"]["us"] + t["bwd"]["us"] for t in runs)}
            for key, runs in rows.items()}


def comparison(M: int, K: int, N: int, r: int, device, dtype, reps: int, repeats: int) -> dict:
    """Medians over ``repeats`` rounds (each a median of ``reps`` calls) of forward and forward+backward
    host µs: ours (plan "fused", launches as in :func:`host_times`), PEFT's layer, a frozen nn.Linear;
    on the CPU also ours at p=0 with Triton's launch path (:func:`jit_on_cpu`, direct launches)."""
    rows: dict = {"nn.Linear (frozen)": [], "PEFT lora.Linear": [], "lora_kernels p=0": [], "lora_kernels p=0.1": []}
    for _ in range(repeats):
        fr = frozen_times(M, K, N, device, dtype, reps)
        rows["nn.Linear (frozen)"].append(fr)
        pf = peft_times(M, K, N, r, 0.0, device, dtype, reps)
        if pf is not None:
            rows["PEFT lora.Linear"].append(pf)
        for p_drop in (0.0, 0.1):
            layer, x, dy = make_layer(M, K, N, r, p_drop, device, dtype)
            layer(x).backward(dy)  # warm
            _clear(layer, x)
            rows[f"lora_kernels p={p_drop:g}"].append(
                host_times(layer, x, dy, reps, suppress=not torch.cuda.is_available(), plan="fused"))
        if not torch.cuda.is_available() and _triton_launch_available():
            with jit_on_cpu() as calls:  # the same layer with Triton's launch path, as on a GPU
                layer, x, dy = make_layer(M, K, N, r, 0.0, device, dtype)
                layer(x).backward(dy)  # warm
                _clear(layer, x)
                rows.setdefault("ours p=0 + Triton launch", []).append(
                    host_times(layer, x, dy, reps, suppress=False, plan="fused"))
                calls.clear()
    out = {}
    for name, runs in rows.items():
        if runs:
            fwd = statistics.median(t["fwd"]["us"] for t in runs)
            total = statistics.median(t["fwd"]["us"] + t["bwd"]["us"] for t in runs)
            out[name] = {"fwd": fwd, "fwd_bwd": total}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/host_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,64,48,8", help="M,K,N,r (tiny: host time only)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--real", action="store_true", help="GPU only: time real launches (host time, CPU-side timer)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the comparison with PEFT and nn.Linear (median)")
    args = p.parse_args(argv)
    M, K, N, r = (int(v) for v in args.shape.split(","))
    gpu = torch.cuda.is_available()
    if args.real and not gpu:
        raise SystemExit("--real needs a GPU: under the CPU interpreter a launch runs the kernel in Python")
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_num_threads(1)
    how = "real launches" if args.real else "Triton launches replaced by no-ops"
    print(f"Host time per call, {device} ({how}); M={M} K={K} N={N} r={r} {dtype}; median of {args.reps} "
          f"[p20-p80] µs")
    fr = frozen_times(M, K, N, device, dtype, args.reps)
    print(f"  frozen nn.Linear: fwd {fr['fwd']['us']:.1f}  bwd {fr['bwd']['us']:.1f}"
          + ("" if gpu else "  (computes its tiny GEMM on the CPU)"))
    layer, x, dy = make_layer(M, K, N, r, 0.0, device, dtype)
    host_times(layer, x, dy, args.reps, suppress=not args.real)  # NOTE: a first round runs slow: not shown
    for p_drop in (0.0, 0.1):
        for plan in ("fused", "two_pass"):
            layer, x, dy = make_layer(M, K, N, r, p_drop, device, dtype)
            n = launches_per_call(layer, x, dy, plan)
            t = host_times(layer, x, dy, args.reps, suppress=not args.real, plan=plan)
            print(f"  {plan:8} p={p_drop:g}: fwd {t['fwd']['us']:6.1f} [{t['fwd']['p20']:.1f}-{t['fwd']['p80']:.1f}]"
                  f"  bwd {t['bwd']['us']:6.1f} [{t['bwd']['p20']:.1f}-{t['bwd']['p80']:.1f}]"
                  f"  launches fwd {len(n['fwd_triton'])} triton {n['fwd_torch'] or ''}"
                  f" bwd {len(n['bwd_triton'])} triton {n['bwd_torch'] or ''}")
            print(f"           fwd kernels: {', '.join(n['fwd_triton'])}; bwd kernels: {', '.join(n['bwd_triton'])}")
    if args.real:
        print("  GPU work against host time (plan chosen by the cost model; wall = CUDA events around "
              "back-to-back calls):")
        for p_drop in (0.0, 0.1):
            layer, x, dy = make_layer(M, K, N, r, p_drop, device, dtype)
            host = host_times(layer, x, dy, args.reps, suppress=False)
            dev = gpu_times(layer, x, dy)
            host_fb = host["fwd"]["us"] + host["bwd"]["us"]
            print(f"    p={p_drop:g}: fwd GPU {dev['fwd']['gpu']:7.1f} host {host['fwd']['us']:7.1f} "
                  f"wall {dev['fwd']['wall']:7.1f}; fwd+bwd GPU {dev['fwd_bwd']['gpu']:7.1f} host {host_fb:7.1f} "
                  f"wall {dev['fwd_bwd']['wall']:7.1f}: "
                  + ("GPU-bound (GPU >= host)" if dev["fwd_bwd"]["gpu"] >= host_fb else "host-bound (host > GPU)"))
    cuda_rows = None if gpu else cuda_function_times(M, K, N, r, args.reps)
    if cuda_rows:
        print("  the cuda backend below its checks, its two ops stubbed (allocation only), p=0:")
        for name, t in cuda_rows.items():
            print(f"    {name:16} fwd {t['fwd']['us']:6.1f}  bwd {t['bwd']['us']:6.1f}"
                  f"  fwd+bwd {t['fwd']['us'] + t['bwd']['us']:6.1f}")
    if not gpu and _triton_launch_available():
        print(f"  Triton's launch path run as on a GPU (JIT functions over a stand-in driver; compiling and the "
              f"driver's launch left out), plan fused, median of {args.repeats} rounds:")
        for (p_drop, how), t in jit_launch_times(M, K, N, r, args.reps, args.repeats).items():
            print(f"    p={p_drop:g} {how:16} fwd {t['fwd']:6.1f}  bwd {t['bwd']:6.1f}  fwd+bwd {t['fwd_bwd']:6.1f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"In one process, median of {args.repeats} rounds (each a median of {args.reps} calls); "
          f"load average {load:.2f} on {os.cpu_count()} CPUs:")
    table = comparison(M, K, N, r, device, dtype, args.reps, args.repeats)
    for name, t in table.items():
        print(f"  {name:20} fwd {t['fwd']:6.1f}  fwd+bwd {t['fwd_bwd']:6.1f}")
    ours, lin, peft = (table.get(k, {}).get("fwd_bwd") for k in ("lora_kernels p=0", "nn.Linear (frozen)",
                                                                 "PEFT lora.Linear"))
    if ours and lin:
        print(f"  ours / nn.Linear: {ours / lin:.2f}x (target <= 3)"
              + (f"; ours / PEFT: {ours / peft:.2f}x (target <= 1)" if peft else "; PEFT not installed"))
    with_launch = table.get("ours p=0 + Triton launch", {}).get("fwd_bwd")
    if with_launch and lin:
        print(f"  with Triton's launch path: / nn.Linear {with_launch / lin:.2f}x"
              + (f"; / PEFT {with_launch / peft:.2f}x" if peft else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
