"""Backend registry and dispatch.

A backend is a set of three launchers with the signatures of the functions in
:mod:`lora_kernels.reference` (``lora_forward``, ``lora_backward``,
``lora_merge_``), all on 2-D inputs of one dtype; ``seed`` is an int or a 0-dim
int64 tensor (the kernels read a tensor seed on the device; backends with ``SEED_BY_VALUE`` also take
one held on the CPU, by value, for GPU tensors). A backend may also have
``lora_linear``, the whole differentiable layer in one call (see ``Backend.linear``). The registered ops in
:mod:`lora_kernels.ops` take the backend's name and call its launchers; this
module decides which names exist, which are usable for a tensor, and what
``"auto"`` means.

- ``reference``: plain PyTorch (:mod:`lora_kernels.reference`); any device.
- ``triton``: the Triton kernels (:mod:`lora_kernels.triton_ops`); CUDA tensors,
  or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported.
- ``cuda``: the hand-written CUDA kernels of the compiled extension
  ``lora_kernels._C``; CUDA tensors.

``auto`` picks, for CUDA tensors, the first usable backend of ``auto_order``
(the measured table ``AUTO_MEASURED_ORDER`` for the GPU's compute capability, else
``AUTO_ORDER_CUDA``), and for every other device the reference path.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._runtime import device_seed, triton_interpreted  # noqa: F401  (re-exported)

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER_CUDA = ("triton", "cuda", "reference")

# What "auto" tries first on a CUDA device, by compute capability ("9.0", "8.0", "8.9", ...):
# the faster of triton and cuda as MEASURED there (docs/cuda.md, "Choosing between triton and
# cuda", says how to fill it from bench/run.py's results.json). A capability without an entry
# uses AUTO_ORDER_CUDA.
# NOTE: empty on purpose: no GPU has run this version's kernels yet; no entry is a guess.
AUTO_MEASURED_ORDER: dict[str, tuple[str, ...]] = {}


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The backends "auto" tries, in order, on CUDA ``device`` (AUTO_MEASURED_ORDER, else AUTO_ORDER_CUDA)."""
    major, minor = torch.cuda.get_device_capability(device)
    return AUTO_MEASURED_ORDER.get(f"{major}.{minor}", AUTO_ORDER_CUDA)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run on this machine or device."""


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    merge_: Callable
    # The whole differentiable layer in one call, ``linear(x (..., K), weight, bias, lora_A, lora_B,
    # scaling, dropout_p, seed) -> y``, where the backend has its autograd below Python (cuda); the
    # eager path of lora_linear then skips the Python Function. None: LoRALinearFunction serves.
    linear: Optional[Callable] = None
    # Whether the launchers take a seed held on the CPU by value for GPU tensors (the module's
    # SEED_BY_VALUE): eager calls then draw it on the host, with no launch (functional.call_seed).
    seed_by_value: bool = False


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[Backend], str]:
    """Import a backend's launchers once; returns ``(backend, "")`` or ``(None, why not)``."""
    if name == "reference":
        module = importlib.import_module("lora_kernels.reference")
    elif name == "triton":
        try:
            module = importlib.import_module("lora_kernels.triton_ops")
        except Exception as exc:  # noqa: BLE001
            # NOTE: not only ImportError: a Triton without a usable driver can raise at import
            # (Triton 3.2 without a GPU: RuntimeError "0 active drivers"); the package must still load.
            return None, f"Triton could not be imported ({type(exc).__name__}: {exc})"
    elif name == "cuda":
        try:
            module = importlib.import_module("lora_kernels.cuda_ops")
        except ImportError as exc:
            return None, (
                f"the CUDA kernels are not built ({exc}); reinstall from source with a CUDA toolkit and a "
                "CUDA PyTorch present (see README; LORA_KERNELS_FORCE_CUDA=1 makes their absence a build error)"
            )
    else:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return Backend(name, module.lora_forward, module.lora_backward, module.lora_merge_,
                   getattr(module, "lora_linear", None), getattr(module, "SEED_BY_VALUE", False)), ""


def unavailable_reason(name: str, device: torch.device) -> str:
    """Empty string if backend ``name`` can run on ``device``, else why it cannot."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    if name == "reference":
        return ""
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return (
            f"the Triton backend needs CUDA tensors (got {device.type}); "
            "CPU tensors run under Triton's interpreter only with TRITON_INTERPRET=1 set before import"
        )
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors (got {device.type})"
    return _load(name)[1]


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name in BACKENDS if not unavailable_reason(name, device)]


@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device``; check that the chosen one can run."""
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        return next(n for n in auto_order(device) if not unavailable_reason(n, device))
    why = unavailable_reason(name, device)
    if why:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    return name


def get(name: str) -> Backend:
    """The launchers of a concrete backend (raises if it cannot be loaded)."""
    backend, why = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    return backend
