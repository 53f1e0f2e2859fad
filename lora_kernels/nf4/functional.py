"""Functional API of the 4-bit base: input checks, the autograd Function and ``qlora_linear``."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..functional import _FLOAT_DTYPES, _autocast_inputs, call_seed, check_dropout, flat_backward
from . import ops
from .reference import QuantWeight, check


class QLoRALinearFunction(torch.autograd.Function):
    """``(y, xa) = qlora_forward(x, W0 (4-bit), b, A, B, ...)`` with the backward of :mod:`lora_kernels.nf4.ops`.

    The inputs are those of the op ``lora_kernels::qlora_forward`` (``x`` may be ``(..., K)``)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features,
                weight_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        ctx.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])
        q = QuantWeight(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                        (out_features, x.shape[-1]), weight_dtype)
        y, xa = ops.forward(x2, q, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        ops.setup_context(ctx, (x2, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                                out_features, weight_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, backend),
                          (y, xa))
        ctx.mark_non_differentiable(xa)
        if x.dim() != 2:
            y = torch.ops.aten._unsafe_view(y, (*x.shape[:-1], out_features))
        return y, xa

    @staticmethod
    def backward(ctx, grad_out, grad_xa):
        return flat_backward(ops.backward, ctx, grad_out, grad_xa)


def as_quant_weight(weight) -> QuantWeight:
    """A :class:`QuantWeight` from itself or a ``bitsandbytes.nn.Params4bit``."""
    if isinstance(weight, QuantWeight):
        check(weight)
        return weight
    if hasattr(weight, "quant_state"):
        return QuantWeight.from_param(weight)
    raise TypeError(f"expected a bitsandbytes 4-bit weight (Params4bit) or a QuantWeight, got {type(weight).__name__}")


def check_inputs(x: Tensor, q: QuantWeight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, dropout_p: float) -> None:
    """Raise a clear error for anything the kernels cannot compute correctly (nothing is modified)."""
    N, K = q.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., in_features={K}), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but the 4-bit weight is on {q.device}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES or t.device != q.device:
            raise ValueError(f"{name} must be a 2-D float tensor on {q.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    r = lora_A.shape[0]
    if r == 0 or lora_A.shape[1] != K or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_A must be (r, {K}) and lora_B ({N}, r) with r > 0, got {tuple(lora_A.shape)} "
                         f"and {tuple(lora_B.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.device != q.device):
        raise ValueError(f"bias must have shape ({N},) on {q.device}, got {tuple(bias.shape)} on {bias.device}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    check_dropout(dropout_p)


def qlora_linear(
    x: Tensor,
    weight: Union[QuantWeight, Tensor],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
    seed: Optional[int] = None,
) -> Tensor:
    """:func:`lora_kernels.lora_linear` on a bitsandbytes 4-bit ``weight`` (``Linear4bit.weight``, a
    ``Params4bit``, or a :class:`QuantWeight`): ``y = x deq(W0)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Computed in ``x``'s dtype (the autocast dtype under ``torch.autocast``), as ``bnb.matmul_4bit``
    does: ``W0`` is dequantised to its stored dtype, then to ``x``'s; the bias and the factors are cast
    to ``x``'s dtype (differentiably). ``backend`` is ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    q = as_quant_weight(weight)
    x, bias, lora_A, lora_B = _autocast_inputs(x, bias, lora_A, lora_B)
    check_inputs(x, q, bias, lora_A, lora_B, scaling, dropout_p)
    name = ops.resolve(backend, x.device)
    seed_t = call_seed(dropout_p, seed, x.device)
    y, _ = QLoRALinearFunction.apply(
        x, *q.tensors, q.blocksize, q.blocksize2, q.shape[0], q.dtype,
        bias.to(x.dtype) if bias is not None else None, lora_A.to(x.dtype), lora_B.to(x.dtype),
        float(scaling), float(dropout_p), seed_t, name,
    )
    return y
