"""Small helpers the launchers share, below the backend registry.

:mod:`lora_kernels.triton_ops` and :mod:`lora_kernels.cuda_ops` import these;
:mod:`lora_kernels.backends` (the dispatcher, which imports the launchers) re-exports
them. Nothing here imports another module of the package.
"""

from __future__ import annotations

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
