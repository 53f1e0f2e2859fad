"""Timers, rotating inputs and memory probes.

On a GPU, times are ``triton.testing.do_bench`` quantiles (CUDA events; L2
flushed before each repetition; ``grad_to_none`` resets gradients between
repetitions). On the CPU, ``time.perf_counter`` around each call, with the
same warm-up/repetition budgets in milliseconds and the same quantiles.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

QUANTILES = (0.5, 0.2, 0.8)  # median first
H100_L2_BYTES = 50 * 2**20


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or H100_L2_BYTES)


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 64) -> int:
    """How many input sets to cycle through so that together they exceed twice the L2 cache."""
    if device.type != "cuda":
        return 2
    return max(2, min(cap, math.ceil(2 * l2_bytes(device) / max(1, bytes_per_set))))


class Rotation:
    """Cycles through ``n`` indices: each call of a timed function takes the next input set."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def _reset_grads(tensors: Optional[Sequence[Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def bench_gpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
              grad_to_none: Optional[Sequence[Tensor]] = None) -> dict:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or ()), quantiles=list(QUANTILES)
    )
    return {"ms": median, "p20": p20, "p80": p80}


def bench_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
              grad_to_none: Optional[Sequence[Tensor]] = None, min_reps: int = 5, max_reps: int = 1000) -> dict:
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        _reset_grads(grad_to_none)
        fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)
    for _ in range(max(1, min(max_reps, int(warmup_ms / estimate_ms)))):
        _reset_grads(grad_to_none)
        fn()
    samples = []
    for _ in range(max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))):
        _reset_grads(grad_to_none)
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {"ms": statistics.median(samples), "p20": q[1], "p80": q[7], "reps": len(samples)}


def bench(device: torch.device, fn: Callable[[], object], warmup_ms: float, rep_ms: float,
          grad_to_none: Optional[Sequence[Tensor]] = None) -> dict:
    if device.type == "cuda":
        return bench_gpu(fn, warmup_ms, rep_ms, grad_to_none)
    return bench_cpu(fn, warmup_ms, rep_ms, grad_to_none)


def saved_activation_bytes(run: Callable[[], Tensor], params: Sequence[Tensor]) -> tuple[int, Tensor]:
    """Bytes of the distinct storages autograd saves for backward during ``run()``, parameters excluded.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor a
    Function (or a compiled graph) saves passes through the pack hook; views of
    one storage count once, at the storage's size. 0-dim tensors (a dropout
    seed, a scale) are not activations and are left out. Returns ``(bytes, output)``.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip and t.dim() > 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def peak_bytes(device: torch.device, step: Callable[[], None]) -> Optional[int]:
    """Growth of ``torch.cuda.max_memory_allocated`` over what was allocated before ``step()``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
