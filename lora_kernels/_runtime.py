"""Small helpers the launchers share, below the backend registry.

:mod:`lora_kernels.triton_ops` and :mod:`lora_kernels.cuda_ops` import these;
:mod:`lora_kernels.backends` (the dispatcher, which imports the launchers) re-exports
them. Nothing here imports another module of the package.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


def device_seed(seed, device: torch.device) -> torch.Tensor:
    """A launcher's ``seed`` (an int or a 0-dim int64 tensor) as the tensor on ``device`` that kernels read."""
    if not isinstance(seed, torch.Tensor):
        return torch.tensor(int(seed), dtype=torch.int64, device=device)
    return seed if seed.device == device else seed.to(device)


def triton_interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Target:
    """What the launchers' decisions depend on: every GPU-dependent choice (config lists, pruning,
    exclusion keys, TMA, grid sizes, the cost model's device) reads it from here, not from the device.

    ``capability`` is None where no GPU's decisions apply (Triton's CPU interpreter, unemulated):
    one small config per kernel, interpreter-sized blocks. ``interpreted``: the kernels execute under
    Triton's interpreter; an emulated target takes a GPU's decisions while they do.
    """

    name: str
    capability: Optional[tuple[int, int]]
    sms: int
    shared_memory_per_block: int  # bytes, the opt-in maximum of one block
    interpreted: bool = False
    emulated: bool = False

    @property
    def arch(self) -> Optional[int]:
        """The architecture whose compile-check results apply: 90 (Hopper and newer), 80, or None."""
        if self.capability is None:
            return None
        return 90 if self.capability[0] >= 9 else 80

    @property
    def gpu(self) -> bool:
        """Whether launches take a GPU's decisions (a CUDA device, or an emulated one)."""
        return self.capability is not None

    @property
    def tma(self) -> bool:
        """Whether the chip has the tensor memory accelerator (Hopper and newer)."""
        return self.capability is not None and self.capability[0] >= 9


# NOTE: read once, as Triton does (the variable must be set before Triton's import): target() is
# on every call's path.
_INTERPRETED = triton_interpreted()
# The Triton interpreter's own decisions: one config, small blocks, a few "SMs".
INTERPRETER = Target("interpreter", None, 4, 1 << 30, interpreted=True)
# The targets the CPU can take the decisions of (the H100 SXM's and the A100's numbers).
EMULATED_TARGETS = {
    "sm90": Target("sm90", (9, 0), 132, 232448, interpreted=True, emulated=True),
    "sm80": Target("sm80", (8, 0), 108, 166912, interpreted=True, emulated=True),
}
_emulated: Optional[Target] = None


@functools.lru_cache(maxsize=None)
def _cuda_target(device: torch.device) -> Target:
    props = torch.cuda.get_device_properties(device)
    return Target(f"sm{props.major}{props.minor}", (props.major, props.minor), props.multi_processor_count,
                  props.shared_memory_per_block_optin)


def target(device: torch.device) -> Target:
    """The decisions that launches for ``device`` take: the emulated target while one is set, the
    interpreter's under ``TRITON_INTERPRET=1`` or off CUDA, else the CUDA device's (queried once)."""
    if _emulated is not None:
        return _emulated
    if device.type != "cuda" or _INTERPRETED:
        return INTERPRETER
    return _cuda_target(device)


def emulated_target() -> Optional[Target]:
    """The emulated target while one is set (``LORA_KERNELS_EMULATE`` or :func:`set_emulated_target`)."""
    return _emulated


def set_emulated_target(name: Optional[str]) -> None:
    """Take ``name``'s decisions (``"sm90"`` or ``"sm80"``) on the CPU, or none (None).

    Only under Triton's interpreter: the kernels still run there (with the GPU's block sizes), so that
    every branch a GPU takes is executed and checked. :func:`lora_kernels._emulate.emulate` also
    runs Triton's own launch path (autotuner, binder, direct launches) over a stand-in driver."""
    global _emulated
    if name is None:
        _emulated = None
        return
    if name not in EMULATED_TARGETS:
        raise ValueError(f"unknown emulated target {name!r}; expected one of {sorted(EMULATED_TARGETS)}")
    if not triton_interpreted():
        raise RuntimeError("an emulated GPU target needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "Triton is imported (the kernels execute there, with the GPU's decisions)")
    _emulated = EMULATED_TARGETS[name]


@contextlib.contextmanager
def emulated(name: Optional[str]) -> Iterator[Optional[Target]]:
    """:func:`set_emulated_target` for the duration of a ``with`` block."""
    before = _emulated
    set_emulated_target(name)
    try:
        yield _emulated
    finally:
        globals()["_emulated"] = before


if os.environ.get("LORA_KERNELS_EMULATE"):
    set_emulated_target(os.environ["LORA_KERNELS_EMULATE"])


def on_input_device(launcher):
    """``launcher(t, ...)`` with ``t``'s CUDA device current while it runs.

    NOTE: Triton launches on the *current* device, not the tensors': a layer on cuda:1 called
    while cuda:0 is current (a model split over GPUs with ``device_map="auto"``) would otherwise
    launch its kernels on the wrong GPU. The check costs one device query per call; the guard is
    entered only when the devices differ.
    """

    @functools.wraps(launcher)
    def launch_on_device(t, *args, **kwargs):
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    return launch_on_device
