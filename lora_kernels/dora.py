"""DoRA (weight-decomposed low-rank adaptation) on the fused LoRA kernels, with PEFT's semantics.

For the frozen ``W0`` (N×K), bias ``b``, factors ``A`` (r×K), ``B`` (N×r), scale ``s`` and the
trainable magnitude ``m`` (N), PEFT's DoRA layer computes (docs/design.md, "DoRA")::

    n = ‖W0 + s·B A‖ row-wise, detached (no gradient flows through it)
    c = m / n                                   (one factor per output feature)
    y = base(x) + (c − 1) ⊙ x_d W0ᵀ + c ⊙ s·x_d Aᵀ Bᵀ      base(x) = x W0ᵀ + b, x_d = dropout(x)

The reference backend (the specification) computes exactly that, in PEFT's order and dtypes: at
initialisation (B = 0, m = ‖W0‖) ``c`` is exactly 1, the correction exactly 0 and ``y`` is the base
layer's output bit for bit. The kernel backends compute the same function in the fused form::

    y = c ⊙ z + b                                   no dropout, or eval
    y = (x − x_d) W0ᵀ + b + c ⊙ z(x_d)                dropout in training
    z = x W0ᵀ + s·x Aᵀ Bᵀ                            the fused LoRA layer without bias

so the forward is one fused GEMM and the column scale, and autograd gives ``dm = Σᵢ dyᵢ ⊙ zᵢ / n``
and runs the fused backward on ``c ⊙ dy``.

The row norms never form an N×K product (PEFT's forms ``B A`` and ``W0 + s·B A`` on every call)::

    n = w + δ / (w + √(w² + δ)),   w = ‖W0ᵢ‖,   δ = 2s·Σₖ Bᵢₖ (W0 Aᵀ)ᵢₖ + s²·Σₖ (B G)ᵢₖ Bᵢₖ,   G = A Aᵀ

(``n² = w² + δ``). ``w`` is PEFT's own norm of ``W0`` (:func:`weight_row_norms`) and ``δ`` is exactly
0 where ``B`` is 0, so there ``n`` is bit-equal to the norm PEFT's magnitude starts at. ``w``
depends on the frozen weight only: :class:`WeightNorms` caches it per weight and recomputes it when
the weight changes. ``W0 Aᵀ`` is one thin pass over ``W0`` (N·K·r multiply-adds, the same as the
LoRA shrink of N tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from .functional import _autocast_inputs, _checked_backend, check_dropout, lora_linear, merge_lora_, unmerge_lora_

# Rows of W0 converted at a time when its row norms are taken in another dtype than its own:
# bounded memory, whatever the layer's size (each row's norm is its own reduction: on the CPU
# the chunks give the values of one call).
_ROW_CHUNK = 1024


def weight_row_norms(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``‖W0ᵢ‖`` (N,) as PEFT computes it: ``torch.linalg.norm(W0.to(dtype), dim=1)``, in ``dtype``.

    ``dtype`` is the adapter's (``lora_A``'s; default: the weight's): PEFT casts the input, and so
    the weight, to it before taking the norm in its forward, and its magnitude starts at this norm
    in the weight's dtype (``peft/tuners/lora/dora.py``, ``get_weight_norm``).
    """
    dtype = weight.dtype if dtype is None else dtype
    w = weight.detach()
    if w.dtype == dtype:
        return torch.linalg.norm(w, dim=1)
    return torch.cat([torch.linalg.norm(w[i:i + _ROW_CHUNK].to(dtype), dim=1) for i in range(0, w.shape[0], _ROW_CHUNK)])


class WeightNorms:
    """:func:`weight_row_norms` of one frozen weight, cached: one vector of ``out_features``.

    Recomputed when the weight is not the one it was computed from: another storage (``.data =``
    replaced it: a ``.to()`` move, PEFT's DoRA merge), offset, shape, strides, dtype, device, an
    in-place write (the version counter moves: ``load_state_dict``, ``copy_`` under no_grad, an
    optimiser step), or another norm dtype. The storage is held by a weak reference: a freed one
    whose address comes back for a new weight is never taken for the old. A write through ``.data``
    moves no version counter: whoever writes so calls :meth:`clear` (the merges do).
    """

    def __init__(self) -> None:
        self.clear()

    def __call__(self, weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype = weight.dtype if dtype is None else dtype
        if torch.compiler.is_compiling():  # traced: computed in the graph, nothing kept
            return weight_row_norms(weight, dtype)
        storage = weight.untyped_storage()
        key = (storage._cdata, weight.data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.stride(),
               weight.dtype, weight.device, weight._version, dtype)
        if self._storage is None or self._storage.expired() or key != self._key:
            self._value, self._key, self._storage = weight_row_norms(weight, dtype), key, StorageWeakRef(storage)
        return self._value

    def clear(self) -> None:
        self._key = self._value = self._storage = None

    def __deepcopy__(self, memo) -> "WeightNorms":
        return WeightNorms()  # a copy's weight is another tensor

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


@torch.no_grad()
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_norm: Optional[Tensor] = None) -> Tensor:
    """``‖W0 + s·B A‖`` per row (N,), from the low-rank structure, in float32 (float64 for float64
    inputs), detached; bit-equal to PEFT's norm (:func:`weight_row_norms` in ``lora_A``'s dtype)
    where ``B`` is 0. ``weight_norm``: that ``‖W0ᵢ‖`` (:class:`WeightNorms`) if already known."""
    acc = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype) else torch.float32
    w = (weight_row_norms(weight, lora_A.dtype) if weight_norm is None else weight_norm).to(acc)
    a, b = lora_A.detach(), lora_B.detach()
    # NOTE: W0 Aᵀ in the weight's dtype (fp32 accumulation inside the GEMM, one rounding of its
    # N×r result): the cross term is a small correction to ‖W0ᵢ‖², so that rounding moves the norm
    # by far less than PEFT's own computation in the model's dtype does.
    cross = torch.mm(weight.detach(), a.to(weight.dtype).t()).to(acc)
    a32, b32 = a.to(acc), b.to(acc)
    gram = a32 @ a32.t()
    delta = 2.0 * scaling * (b32 * cross).sum(1) + scaling * scaling * ((b32 @ gram) * b32).sum(1)
    # n = √(w² + δ) = w + δ / (w + √(w² + δ)): exactly w where δ = 0, and no cancellation for a small δ.
    # Rounding can take an exactly-zero row a hair below zero (w² + δ < 0, n < 0): its norm is 0, as
    # PEFT's is; w = δ = 0 (a zero row) gives 0, not 0 / 0.
    den = w + (w * w + delta).clamp_min(0).sqrt()
    return torch.where(den > 0, w + delta / den, 0.0).clamp_min(0)


def _peft_form(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
               scaling: float, c: Tensor, dropout_p: float) -> Tensor:
    """PEFT's DoRA forward, operation for operation (``DoraLinearVariant.forward``,
    ``DoraLinearLayer.forward``): the base layer's output plus ``(c − 1) ⊙ x_d W0ᵀ + c ⊙ s·x_d Aᵀ Bᵀ``,
    with ``x`` cast to the adapter's dtype for the correction and ``y`` returned in the base output's."""
    y = F.linear(x, weight, bias)
    x = x.to(lora_A.dtype)
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p, training=True)
        z = F.linear(x, weight.to(x.dtype))
    else:
        z = y if bias is None else y - bias
    return (y + ((c - 1) * z + c * F.linear(F.linear(x, lora_A), lora_B) * scaling)).to(y.dtype)


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
    weight_norm: Optional[Tensor] = None,
) -> Tensor:
    """PEFT's DoRA layer: see the module docstring for the formula (the reference backend in PEFT's
    form, the kernel backends in the fused one).

    ``magnitude`` (N,) is PEFT's ``lora_magnitude_vector``; ``dropout_p`` applies in training only
    (pass 0 in eval, as :class:`lora_kernels.LoRALinear` does), drawn by ``torch.nn.functional.dropout``
    as PEFT's ``nn.Dropout`` draws it. ``weight_norm``: ``‖W0ᵢ‖`` (:class:`WeightNorms`, in
    ``lora_A``'s dtype), computed here when not given. A row of norm 0 gives ``m / 0``, as in PEFT.
    """
    check_dropout(dropout_p)
    n = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != n:
        raise ValueError(f"magnitude must have shape ({n},) (one entry per output feature), got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, the weight on {weight.device}")
    name = _checked_backend(*_autocast_inputs(x, weight, bias, lora_A, lora_B), scaling, dropout_p, backend)
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_norm)
    c = magnitude / norm.to(magnitude.dtype)  # PEFT's mag_norm_scale: its norm is in the adapter's dtype
    if name == "reference":
        return _peft_form(x, weight, bias, lora_A, lora_B, scaling, c, dropout_p)
    c = c.to(x.dtype)
    if dropout_p == 0.0:
        z = lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p=0.0, backend=name)
        return z * c if bias is None else torch.addcmul(bias, z, c)  # one pass over y
    x_d = F.dropout(x, dropout_p, training=True)
    z = lora_linear(x_d, weight, None, lora_A, lora_B, scaling, dropout_p=0.0, backend=name)
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
