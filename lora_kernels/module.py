"""``LoRALinear``, the drop-in module, and ``apply_lora`` to put it into any model."""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .functional import check_dropout, lora_linear, lora_scaling, merge_lora_, unmerge_lora_


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, computed by fused kernels.

    ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with ``scaling = alpha / r``
    (``alpha / sqrt(r)`` when ``use_rslora``).

    Parameter names follow nn.Linear for the base layer (``weight``, ``bias``,
    frozen) and PEFT's saved adapters for the factors: ``lora_A.weight`` is
    ``(r, in_features)`` and ``lora_B.weight`` is ``(out_features, r)``.
    ``lora_A`` starts Kaiming-uniform (PEFT's default) or Gaussian, ``lora_B``
    at zero, so a new layer computes exactly its base layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._configure(r, alpha, dropout, use_rslora, backend)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, init)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        backend: str = "auto",
        lora_dtype: Optional[torch.dtype] = None,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``, sharing (not copying) its weight and bias, which are frozen.

        The factors take ``lora_dtype`` (default: the base weight's dtype).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(r, alpha, dropout, use_rslora, backend)
        self._attach(linear.weight, linear.bias, init, lora_dtype)
        self.train(linear.training)
        return self

    def _configure(self, r, alpha, dropout, use_rslora, backend) -> None:
        self.scaling = lora_scaling(r, alpha, use_rslora)
        check_dropout(dropout)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.backend = backend
        self.merged = False
        self.register_load_state_dict_pre_hook(_merged_state_pre_hook)

    def get_extra_state(self) -> Tensor:
        """``merged``, saved beside the weight it describes (a 0-dim bool tensor, so safetensors can hold it)."""
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        self.merged = bool(state)

    def _attach(self, weight: nn.Parameter, bias: Optional[nn.Parameter], init: str, lora_dtype=None) -> None:
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        factory = dict(device=weight.device, dtype=lora_dtype or weight.dtype)
        self.lora_A = nn.Linear(in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, **factory)
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise the factors: ``A`` Kaiming-uniform or Gaussian (std ``1/r``), ``B`` zero."""
        if self.merged:
            raise RuntimeError("cannot re-initialise a merged LoRALinear; call unmerge() first")
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and (
                self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad
            ):
                raise RuntimeError(
                    "LoRALinear is merged: its adapter cannot be trained in this state; "
                    "call unmerge() before training (or eval() / torch.no_grad() for inference)"
                )
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def _refuse_sharded(self, what: str) -> None:
        if any(_is_dtensor(t) for t in (self.weight, self.lora_A.weight, self.lora_B.weight)):
            raise RuntimeError(
                f"LoRALinear.{what}() is not supported on sharded (FSDP2 / DTensor) parameters: gather a full "
                "state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                f"StateDictOptions(full_state_dict=True)), load it into an unsharded model and {what}() there"
            )

    def merge(self) -> None:
        """Fold ``scaling · B A`` into ``weight`` in place; forward then costs exactly the base GEMM."""
        self._refuse_sharded("merge")
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() first")
        merge_lora_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data, self.scaling, self.backend)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling · B A`` from ``weight`` again (exact to within one rounding per element)."""
        self._refuse_sharded("unmerge")
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged; nothing to unmerge")
        unmerge_lora_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data, self.scaling, self.backend)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
            f"use_rslora={self.use_rslora}, backend={self.backend!r}, merged={self.merged}"
        )


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _merged_state_pre_hook(module, state_dict, prefix, *args) -> None:
    # State dicts from before ``merged`` was recorded hold unmerged weights.
    if prefix + "weight" in state_dict and prefix + "_extra_state" not in state_dict:
        state_dict[prefix + "_extra_state"] = torch.tensor(False)
    # A merged weight holds scaling·B A: new factors without the weight they belong to would make it stale.
    if module.merged and prefix + "weight" not in state_dict and (
        prefix + "lora_A.weight" in state_dict or prefix + "lora_B.weight" in state_dict
    ):
        raise RuntimeError(
            f"cannot load lora_A/lora_B into the merged LoRALinear {prefix[:-1] or '(root)'!r} without its weight; "
            "call unmerge() first"
        )


def _matches(name: str, target: Union[str, Iterable[str]]) -> bool:
    # PEFT's convention: a string is a full regular-expression match on the module's
    # qualified name; a list matches a name equal to an entry or ending in ".entry".
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def apply_lora(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    backend: str = "auto",
    lora_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Swap the chosen ``nn.Linear`` modules of ``model`` for ``LoRALinear`` in place; freeze the rest.

    ``target_modules`` follows PEFT: a regular expression matched against each
    module's full name, or a list of names/suffixes (``["q_proj", "v_proj"]``).
    Every parameter except the new ``lora_A``/``lora_B`` ends with
    ``requires_grad=False``. Raises if nothing matched, or if a match is not an
    ``nn.Linear``. Returns ``model``.
    """
    lora_scaling(r, alpha, use_rslora)
    check_dropout(dropout)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    if not chosen:
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen if type(m) is not nn.Linear]
    if wrong:
        raise TypeError("LoRALinear replaces nn.Linear only; these targets are not: " + ", ".join(wrong))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(
            linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            init=init, backend=backend, lora_dtype=lora_dtype,
        ))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter factors of ``model`` (keys ending in ``lora_A.weight`` / ``lora_B.weight``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in f".{k}" or ".lora_B." in f".{k}"}
