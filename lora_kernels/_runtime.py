"""Small helpers the launchers share, below the backend registry.

:mod:`lora_kernels.triton_ops` and :mod:`lora_kernels.cuda_ops` import these;
:mod:`lora_kernels.backends` (the dispatcher, which imports the launchers) re-exports
them. Nothing here imports another module of the package.
"""

from __future__ import annotations

import functools
import os

import torch


def device_seed(seed, device: torch.device) -> torch.Tensor:
    """A launcher's ``seed`` (an int or a 0-dim int64 tensor) as the tensor on ``device`` that kernels read."""
    if not isinstance(seed, torch.Tensor):
        return torch.tensor(int(seed), dtype=torch.int64, device=device)
    return seed if seed.device == device else seed.to(device)


def triton_interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
