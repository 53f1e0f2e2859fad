"""``LoRALinear4bit``: ``LoRALinear`` on a bitsandbytes ``Linear4bit`` base (QLoRA), made by
``LoRALinear.from_linear(linear4bit)``."""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from ..module import LoRALinear
from .functional import qlora_linear
from .reference import QuantWeight, require_bitsandbytes

MERGE_REFUSED = (
    "{what}() on a 4-bit base is refused: it would requantise W0 + s·B A to 4 bits, an error of up to half "
    "a quantisation step per element (far larger than a trained adapter's update), and unmerge() could not "
    "restore W0. Keep the adapter separate, or dequantise the base to a 16-bit nn.Linear first and merge there"
)


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (False without bitsandbytes imported:
    such a module cannot exist then, and nothing is imported to find out)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


class LoRALinear4bit(LoRALinear):
    """A frozen 4-bit ``Linear4bit`` (its ``Params4bit`` weight shared, not copied) plus a trainable
    low-rank update, computed by the 4-bit kernels (:func:`lora_kernels.nf4.qlora_linear`).

    As ``Linear4bit``, the input is cast to the base layer's ``compute_dtype`` (where set) and the
    output back to the input's dtype. ``merge``/``unmerge`` are refused (:data:`MERGE_REFUSED`).
    The state dict holds the packed weight and its quantisation statistics under bitsandbytes'
    keys (``weight.absmax``, ``weight.quant_map``, ...), beside ``lora_A.weight``/``lora_B.weight``.
    """

    @classmethod
    def from_linear(cls, linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", backend: str = "auto", lora_dtype: Optional[torch.dtype] = None):
        if not is_linear4bit(linear):
            raise TypeError(
                f"LoRALinear4bit.from_linear expects a bitsandbytes Linear4bit, got {type(linear).__name__}")
        QuantWeight.from_param(linear.weight)  # refuses what the kernels cannot read, before anything changes
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(r, alpha, dropout, use_rslora, backend)
        self.compute_dtype = linear.compute_dtype
        self._attach(linear.weight, linear.bias, init, lora_dtype)
        self.train(linear.training)
        return self

    def _attach(self, weight, bias, init, lora_dtype=None) -> None:
        out_features, in_features = weight.quant_state.shape
        self.in_features, self.out_features = in_features, out_features
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight, self.bias = weight, bias
        dtype = lora_dtype or self.compute_dtype or weight.quant_state.dtype
        self.lora_A = nn.Linear(in_features, self.r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.reset_lora_parameters(init)

    def forward(self, x: Tensor) -> Tensor:
        xc = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        if not self.adapter_enabled:
            bnb = require_bitsandbytes("LoRALinear4bit")
            bias = None if self.bias is None else self.bias.to(xc.dtype)
            return bnb.matmul_4bit(xc, self.weight.t(), bias=bias, quant_state=self.weight.quant_state).to(x.dtype)
        y = qlora_linear(xc, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                         dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return y.to(x.dtype)

    def _refuse_sharded(self, what: str) -> None:
        # NOTE: merge_and_unload asks every layer this before merging any: the refusal modifies nothing.
        raise RuntimeError("LoRALinear4bit: " + MERGE_REFUSED.format(what=what))

    def merge(self) -> None:
        self._refuse_sharded("merge")

    def unmerge(self) -> None:
        self._refuse_sharded("unmerge")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # As bitsandbytes' Linear4bit: the packed weight, then its quant_state's tensors under "weight.".
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", 4-bit {self.weight.quant_state.quant_type}"
