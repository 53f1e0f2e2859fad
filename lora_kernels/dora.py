"""DoRA (weight-decomposed low-rank adaptation) on the fused LoRA kernels, with PEFT's semantics.

For the frozen ``W0`` (N×K), bias ``b``, factors ``A`` (r×K), ``B`` (N×r), scale ``s`` and the
trainable magnitude ``m`` (N), PEFT's DoRA layer computes (docs/design.md, "DoRA")::

    n = ‖W0 + s·B A‖ row-wise, detached (no gradient flows through it)
    c = m / n                                   (one factor per output feature)
    y = c ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b              no dropout, or eval
    y = (x − x_d) W0ᵀ + b + c ⊙ (x_d W0ᵀ + s·x_d Aᵀ Bᵀ)   dropout in training, x_d = dropout(x)

``x W0ᵀ + s·x Aᵀ Bᵀ`` is exactly the fused LoRA layer without bias
(:func:`lora_kernels.lora_linear`), so the forward is that one fused GEMM and the column scale,
and autograd gives ``dm = Σᵢ dyᵢ ⊙ zᵢ / n`` and runs the fused backward on ``c ⊙ dy``.

The row norms never form an N×K product (PEFT's forms ``B A`` and ``W0 + s·B A`` on every call):

    n² = ‖W0ᵢ‖² + 2s·Σₖ Bᵢₖ (W0 Aᵀ)ᵢₖ + s²·Σₖ (B G)ᵢₖ Bᵢₖ,     G = A Aᵀ (r×r)

``‖W0ᵢ‖²`` depends on the frozen weight only: :class:`WeightSquares` caches it per weight and
recomputes it when the weight changes (its version counter moves, e.g. by a merge). ``W0 Aᵀ``
is one thin pass over ``W0`` (N·K·r multiply-adds, the same as the LoRA shrink of N tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import check_dropout, lora_linear, merge_lora_, unmerge_lora_

# Rows of W0 upcast at a time when its squared row norms are computed (the only pass over W0 in
# a wider dtype): bounded memory, whatever the layer's size.
_ROW_CHUNK = 1024


def weight_row_squares(weight: Tensor) -> Tensor:
    """``‖W0ᵢ‖²`` in float32 (float64 for a float64 weight), a chunk of rows at a time."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach()
    return torch.cat([w[i:i + _ROW_CHUNK].to(acc).square().sum(1) for i in range(0, w.shape[0], _ROW_CHUNK)])


class WeightSquares:
    """``‖W0ᵢ‖²`` of one frozen weight, recomputed only when the weight (its storage, shape or
    version counter) has changed since the last call."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._value: Optional[Tensor] = None

    def __call__(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
        if key != self._key:
            self._value, self._key = weight_row_squares(weight), key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


@torch.no_grad()
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_squares: Optional[Tensor] = None) -> Tensor:
    """``‖W0 + s·B A‖`` per row (N,), from the low-rank structure, in float32 (float64 for
    float64 inputs), detached. ``weight_squares``: ``‖W0ᵢ‖²`` if already known."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    sq = weight_row_squares(weight) if weight_squares is None else weight_squares
    a, b = lora_A.detach(), lora_B.detach()
    # NOTE: W0 Aᵀ in the weight's dtype (fp32 accumulation inside the GEMM, one rounding of its
    # N×r result): the cross term is a small correction to ‖W0ᵢ‖², so that rounding moves the norm
    # by far less than PEFT's own computation in the model's dtype does.
    cross = torch.mm(weight.detach(), a.to(weight.dtype).t()).to(acc)
    a32, b32 = a.to(acc), b.to(acc)
    gram = a32 @ a32.t()
    sq_norm = sq + 2.0 * scaling * (b32 * cross).sum(1) + scaling * scaling * ((b32 @ gram) * b32).sum(1)
    # Rounding can take an exactly-zero row a hair below zero: its norm is 0, as PEFT's is.
    return sq_norm.clamp_min(0).sqrt()


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor,
    dropout_p: float = 0.0,
    backend: str = "auto",
    weight_squares: Optional[Tensor] = None,
) -> Tensor:
    """PEFT's DoRA layer on the fused kernels: see the module docstring for the formula.

    ``magnitude`` (N,) is PEFT's ``lora_magnitude_vector``; ``dropout_p`` applies in training only
    (pass 0 in eval, as :class:`lora_kernels.LoRALinear` does), drawn by ``torch.nn.functional.dropout``
    as PEFT's ``nn.Dropout`` draws it. ``weight_squares``: ``‖W0ᵢ‖²`` (:class:`WeightSquares`),
    computed here when not given. A row of norm 0 gives ``m / 0``, as in PEFT.
    """
    check_dropout(dropout_p)
    n = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != n:
        raise ValueError(f"magnitude must have shape ({n},) (one entry per output feature), got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, the weight on {weight.device}")
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_squares)
    c = (magnitude / norm.to(magnitude.dtype)).to(x.dtype)
    if dropout_p == 0.0:
        z = lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p=0.0, backend=backend)
        return z * c if bias is None else torch.addcmul(bias, z, c)  # one pass over y
    x_d = F.dropout(x, dropout_p, training=True)
    z = lora_linear(x_d, weight, None, lora_A, lora_B, scaling, dropout_p=0.0, backend=backend)
    return F.linear(x - x_d, weight, bias) + z * c


@torch.no_grad()
def dora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, magnitude: Tensor,
                backend: str = "auto") -> Tensor:
    """``W ← (m / n) ⊙ (W0 + s·B A)`` in place (PEFT's DoRA merge); returns ``n``, which
    :func:`dora_unmerge_` needs (the merged weight no longer determines it)."""
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    factor = (magnitude.to(norm.dtype) / norm).to(weight.dtype)
    merge_lora_(weight, lora_A, lora_B, scaling, backend)
    weight.mul_(factor[:, None])
    return norm


@torch.no_grad()
def dora_unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, magnitude: Tensor,
                  norm: Tensor, backend: str = "auto") -> None:
    """Undo :func:`dora_merge_`: ``W ← W / (m / n) − s·B A`` in place, with the ``n`` it returned."""
    factor = (magnitude.to(norm.dtype) / norm).to(weight.dtype)
    weight.div_(factor[:, None])
    unmerge_lora_(weight, lora_A, lora_B, scaling, backend)
