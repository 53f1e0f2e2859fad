"""What ``accelerate_peft`` needs to know about PEFT's 4-bit LoRA layers (``peft.tuners.lora.bnb.Linear4bit``).

:mod:`lora_kernels.peft_accel` asks these functions where a layer's base is a bitsandbytes
``Linear4bit``; the accelerated forward is then :func:`lora_kernels.nf4.qlora_linear`, computed in
the base layer's ``compute_dtype`` as bitsandbytes computes it. Merging is refused (:data:`MERGE_REFUSED`).
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor, nn

from .functional import qlora_linear
from .module import MERGE_REFUSED as _MERGE_REFUSED
from .module import is_linear4bit
from .reference import QuantWeight

MERGE_REFUSED = ("accelerate_peft: " + _MERGE_REFUSED + ". deaccelerate_peft(model) hands merging back to PEFT, "
                 "which dequantises, merges and requantises (with that error)")


def is_peft_linear4bit(layer: nn.Module) -> bool:
    """Whether ``layer`` is PEFT's 4-bit LoRA layer (False, importing nothing, where PEFT's bnb module
    is not loaded)."""
    cls = getattr(sys.modules.get("peft.tuners.lora.bnb"), "Linear4bit", None)
    return cls is not None and type(layer) is cls


def static_reason(layer: nn.Module, backend: str) -> Optional[str]:
    """Why this 4-bit layer is never accelerated, or None."""
    base = layer.base_layer
    if not is_linear4bit(base):
        return f"base layer is {type(base).__name__}, not bitsandbytes' Linear4bit"
    if backend == "cuda":
        return "the CUDA extension has no 4-bit kernels (backend 'auto' or 'triton' runs them)"
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        # NOTE: bitsandbytes repacks a CPU weight for inference (eval, no grad) and back when it saves
        # the layer: a state, not a property of the layer (call_reason sends such calls to PEFT).
        return None
    try:
        QuantWeight.from_param(base.weight)
    except (TypeError, ValueError) as exc:
        return f"4-bit weight: {exc}"
    return None


def weight_dtype(layer: nn.Module):
    """The dtype the base weight dequantises to (bitsandbytes' ``quant_state.dtype``)."""
    return layer.base_layer.weight.quant_state.dtype


def in_features(layer: nn.Module) -> int:
    return int(layer.base_layer.weight.quant_state.shape[1])


def call_reason(layer: nn.Module, x: Tensor) -> Optional[str]:
    """Why this call needs PEFT's forward (beyond the checks of the 16-bit layers), or None."""
    base = layer.base_layer
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return "the 4-bit weight was repacked by bitsandbytes for its CPU inference kernel"
    if base.compute_dtype is not None and x.dtype != base.compute_dtype:
        return f"input dtype {x.dtype} differs from the 4-bit layer's compute_dtype {base.compute_dtype}"
    return None


def forward(layer: nn.Module, adapter: str, x: Tensor, dropout_p: float, backend: str) -> Tensor:
    base = layer.base_layer
    return qlora_linear(x, base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                        layer.scaling[adapter], dropout_p=dropout_p, backend=backend)
