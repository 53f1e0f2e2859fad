"""Launchers of the hand-written CUDA kernels (the ``cuda`` backend).

The kernels live in ``csrc/`` and are compiled into the extension
``lora_kernels._C``; importing it registers the ops
``torch.ops.lora_kernels.cuda_lora_forward / cuda_lora_backward / cuda_lora_merge_``
(schemas in csrc/lora.cpp). The launchers below have the signatures of
:mod:`lora_kernels.reference`, so :mod:`lora_kernels.backends` can use them
interchangeably. How the kernels work: docs/cuda.md.

The kernels are chosen in C++ per call: on a compute capability 9.0 GPU the fp16/bf16
GEMMs run the sm_90a kernels (TMA, wgmma; CUTLASS) where the shapes allow, elsewhere
the sm_80 ones; ``LORA_KERNELS_CUDA_GEMM=auto|sm80|sm90`` overrides the choice.
In the backward, fp16/bf16 ``g`` and ``dB`` come from one pass over ``dy`` where the cost
model of ``plan_dy_pass`` (csrc/cuda/host_plan.h) says it moves fewer bytes than two thin
products; the choice depends only on the shapes and the SM count, never on the values.

An ``ImportError`` from this module means the CUDA kernels are not there: the
extension was not built, or was built with its CPU kernels only (no CUDA toolkit or
CUDA PyTorch at build time, or ``LORA_KERNELS_SKIP_CUDA=1``); the backend registry
turns it into a clear "unavailable" message.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import lora_kernels._C  # noqa: F401  (registers torch.ops.lora_kernels.cuda_*)

_ops = torch.ops.lora_kernels

if not hasattr(_ops, "cuda_lora_forward"):
    raise ImportError(
        "lora_kernels._C was built without its CUDA kernels (it holds the CPU dropout kernels only: "
        "there was no CUDA toolkit or no CUDA PyTorch at build time, or LORA_KERNELS_SKIP_CUDA was set)"
    )


# A seed on the CPU reaches the kernels by value (csrc/lora_kernels.h, make_dropout): no copy, no launch.
SEED_BY_VALUE = True

# NOTE: the kernels leave the seed unread (and unchecked) at dropout_p = 0: it stays where it is,
# no host-to-device copy per call.
_NO_SEED = torch.zeros((), dtype=torch.int64)


def _seed_arg(dropout_p: float, seed, device: torch.device) -> Tensor:
    """``seed`` as the ops take it: a 0-dim int64 tensor on ``device`` (read by the kernels) or on the
    CPU (its value passed to them: no copy, no launch); an int becomes the latter."""
    if dropout_p == 0.0:
        return _NO_SEED
    if not isinstance(seed, Tensor):
        return torch.tensor(int(seed), dtype=torch.int64)
    return seed if seed.device == device or seed.device.type == "cpu" else seed.to(device)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed,
) -> Tensor:
    """The whole layer for ``x`` of shape ``(..., K)``, differentiable, its autograd in C++
    (csrc/autograd.cpp): :class:`lora_kernels.functional.LoRALinearFunction` over
    :func:`lora_forward` and :func:`lora_backward` in one dispatcher call, with no Python in
    the backward. The eager path of ``lora_linear(..., backend="cuda")``."""
    return _ops.cuda_lora_linear(
        x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), _seed_arg(dropout_p, seed, x.device)
    )


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed,
) -> tuple[Tensor, Tensor]:
    """``(y, xa)`` for 2-D ``x``: ``xa = scaling · (x ⊙ D) Aᵀ``, ``y = x W0ᵀ + b + xa Bᵀ``."""
    return _ops.cuda_lora_forward(
        x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), _seed_arg(dropout_p, seed, x.device)
    )


def lora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed,
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``; ``dx`` has zero elements unless ``need_grad_x``."""
    return _ops.cuda_lora_backward(
        grad_out, x, weight, lora_A, lora_B, xa,
        float(scaling), float(dropout_p), _seed_arg(dropout_p, seed, x.device), bool(need_grad_x),
    )


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
    """``weight += scaling · lora_B @ lora_A`` in place, fp32 accumulation, one rounding.

    ``lora_A``/``lora_B`` may be in another float dtype than ``weight`` (fp32 masters
    for a bf16 weight, say): the kernel reads them in its fp32 (fp64 for an fp64
    weight) accumulator type, so they are never rounded to the weight's dtype.
    """
    _ops.cuda_lora_merge_(weight, lora_A, lora_B, float(scaling))
