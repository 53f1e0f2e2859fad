"""Functional multi-LoRA: input checks, segmentation, the autograd Function and ``multi_lora_linear``.

Every check runs before any kernel, so a refused call changes nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..functional import (
    _FLOAT_DTYPES, _autocast_inputs, call_seed, check_activation, check_dropout,
)
from . import ops
from .reference import segments


def check_factors(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Shapes, dtypes and devices of ``W0 (N, K)``, ``A (n, R, K)``, ``B (n, N, R)``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    N, K = weight.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != K or lora_A.shape[1] == 0:
        raise ValueError(
            f"lora_A must have shape (adapters, r_max > 0, in_features={K}), got {tuple(lora_A.shape)}"
        )
    n, R = lora_A.shape[:2]
    if tuple(lora_B.shape) != (n, N, R):
        raise ValueError(
            f"lora_B must have shape (adapters={n}, out_features={N}, r_max={R}), got {tuple(lora_B.shape)}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")


def check_adapter_ids(adapter_ids: Tensor, x: Tensor, n: int, check_values: bool = True) -> None:
    """``adapter_ids``: int64, on ``x``'s device, of shape ``x.shape[:-1]`` or a leading part of it
    (broadcast over the rest), values in ``[-1, n)``.

    The value check costs one host synchronisation; it is skipped while a CUDA graph is being
    captured or under torch.compile (the kernels never read out of bounds: rows with an id outside
    ``[0, n)`` get no low-rank term).
    """
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be a tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype != torch.int64:
        raise TypeError(f"adapter_ids must be int64 (torch.long), got {adapter_ids.dtype}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}")
    lead = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) != lead[: adapter_ids.dim()] or (adapter_ids.dim() == 0 and lead):
        raise ValueError(
            f"adapter_ids must have shape {lead} (the leading dimensions of x) or a leading part of it, "
            f"got {tuple(adapter_ids.shape)}"
        )
    if check_values and adapter_ids.numel() and not _in_graph(adapter_ids):
        bad = (adapter_ids < -1) | (adapter_ids >= n)
        if bool(bad.any()):
            wrong = sorted(set(adapter_ids[bad].tolist()))[:8]
            raise ValueError(
                f"adapter_ids must be in [-1, {n}) (-1: the base model only); got {wrong}"
            )


def _in_graph(t: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _flat_ids(adapter_ids: Tensor, x: Tensor) -> Tensor:
    lead = x.shape[:-1]
    ids = adapter_ids.reshape(*adapter_ids.shape, *([1] * (len(lead) - adapter_ids.dim())))
    return ids.expand(lead).reshape(-1)


def _scaling_tensor(scaling: Union[Tensor, Sequence[float]], n: int, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(scaling, Tensor):
        scaling = torch.tensor([float(s) for s in scaling], dtype=dtype)
    if tuple(scaling.shape) != (n,) or not scaling.is_floating_point():
        raise ValueError(f"scaling must be a float tensor of shape (adapters={n},), got {tuple(scaling.shape)} "
                         f"{scaling.dtype}")
    return scaling.to(device=x.device, dtype=dtype)


class MultiLoRALinearFunction(torch.autograd.Function):
    """``(y, xa) = multi_lora_forward(...)`` with the backward of :mod:`lora_kernels.multi_lora.ops`."""

    # NOTE: the ctx-first form, as LoRALinearFunction: no per-call signature binding.
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed, backend):
        inputs = (x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed, backend)
        output = ops.forward(*inputs)
        ops.setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    backward = staticmethod(ops.backward)


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Union[Tensor, Sequence[float]],
    adapter_ids: Tensor,
    dropout_p: float = 0.0,
    backend: str = "auto",
    seed: Optional[int] = None,
    check_ids: bool = True,
) -> Tensor:
    """``y[m] = x[m] W0ᵀ + b + s_i · (dropout(x)[m] A_iᵀ) B_iᵀ`` with ``i = adapter_ids[m]`` (none for -1).

    ``lora_A`` is ``(n, r_max, in)``, ``lora_B`` ``(n, out, r_max)`` (adapters of smaller rank
    zero-padded), ``scaling`` ``(n,)``. ``adapter_ids`` (int64) has shape ``x.shape[:-1]``, or a
    leading part of it: ``(batch,)`` for ``x`` of shape ``(batch, seq, in)`` gives every token of a
    sequence its sequence's adapter. The dropout mask, the seed and ``backend`` are those of
    :func:`lora_kernels.lora_linear`. ``check_ids=False`` skips the value check of the ids (its
    one host synchronisation).
    """
    x, weight, bias, lora_A, lora_B = _autocast_inputs(x, weight, bias, lora_A, lora_B)
    check_factors(weight, lora_A, lora_B)
    check_activation(x, weight, bias)
    check_dropout(dropout_p)
    n = lora_A.shape[0]
    if not isinstance(scaling, Tensor) and not all(math.isfinite(float(v)) for v in scaling):
        raise ValueError(f"scaling must be finite, got {list(scaling)!r}")
    s = _scaling_tensor(scaling, n, x)
    check_adapter_ids(adapter_ids, x, n, check_ids)
    name = ops.resolve(backend, x.device)
    seed_t = call_seed(dropout_p, seed, x.device)
    ids = _flat_ids(adapter_ids, x)
    order, seg = segments(ids, n)
    lead = x.shape[:-1]
    y, _ = MultiLoRALinearFunction.apply(
        x.reshape(-1, x.shape[-1]), weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), s, ids, order, seg,
        float(dropout_p), seed_t, name,
    )
    # NOTE: _unsafe_view, as torch.matmul does: the result is not a view for autograd, so
    # in-place ops on it (and FSDP2's hooks) treat it as the fresh tensor it is.
    return torch.ops.aten._unsafe_view(y, (*lead, weight.shape[0]))
