"""``LoRALinear``, the drop-in module, and ``apply_lora`` to put it into any model."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .dora import WeightNorms, dora_linear, dora_merge_, dora_unmerge_, dora_weight_norm
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

    ``use_dora=True``: DoRA as PEFT computes it (:mod:`lora_kernels.dora`), with the trainable
    ``lora_magnitude_vector`` (out_features,) starting at the row norms of the weight.
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
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self._configure(r, alpha, dropout, use_rslora, backend, use_dora)
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
        use_dora: bool = False,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``, sharing (not copying) its weight and bias, which are frozen.

        The factors (and DoRA's magnitude) take ``lora_dtype`` (default: the base weight's dtype). A
        bitsandbytes ``Linear4bit`` gives a :class:`lora_kernels.nf4.LoRALinear4bit` (the 4-bit kernels;
        merging refused; no DoRA).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        from .nf4.module import LoRALinear4bit, is_linear4bit

        if is_linear4bit(linear) and not issubclass(cls, LoRALinear4bit):  # a 4-bit base: QLoRA
            if use_dora:
                raise ValueError(_DORA_4BIT)
            return LoRALinear4bit.from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                              init=init, backend=backend, lora_dtype=lora_dtype)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(r, alpha, dropout, use_rslora, backend, use_dora)
        self._attach(linear.weight, linear.bias, init, lora_dtype)
        self.train(linear.training)
        return self

    def _configure(self, r, alpha, dropout, use_rslora, backend, use_dora=False) -> None:
        self.scaling = lora_scaling(r, alpha, use_rslora)
        check_dropout(dropout)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.use_dora = bool(use_dora)
        self._weight_norms = WeightNorms()  # DoRA: ‖W0ᵢ‖, recomputed when the weight changes
        self._merged_norm: Optional[Tensor] = None  # DoRA: the row norms a merge used, for unmerge
        self.backend = backend
        self.merged = False
        self.adapter_enabled = True  # see disable_adapters(); not saved
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
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **factory)) if self.use_dora else None
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
        if self.use_dora:  # m = ‖W0 + s·B A‖ = ‖W0‖ with B = 0, bit for bit: the layer starts as its base layer
            self.lora_magnitude_vector.copy_(
                dora_weight_norm(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling))

    def forward(self, x: Tensor) -> Tensor:
        if not self.adapter_enabled:
            if self.merged:
                raise RuntimeError("LoRALinear: the adapter is disabled but merged into the weight; unmerge() first")
            return nn.functional.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self._adapter_params()):
                raise RuntimeError(
                    "LoRALinear is merged: its adapter cannot be trained in this state; "
                    "call unmerge() before training (or eval() / torch.no_grad() for inference)"
                )
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        if self.use_dora:
            return dora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               self.lora_magnitude_vector, dropout_p=p, backend=self.backend,
                               weight_norm=self._weight_norms(self.weight, self.lora_A.weight.dtype))
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p=p, backend=self.backend,
        )

    def _adapter_params(self) -> list[Tensor]:
        return [self.lora_A.weight, self.lora_B.weight] + ([self.lora_magnitude_vector] if self.use_dora else [])

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
        if self.use_dora:  # W ← (m / n) ⊙ (W0 + s·B A); n is kept for unmerge
            self._weight_norms.clear()  # written through .data: no version counter moves
            self._merged_norm = dora_merge_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data,
                                            self.scaling, self.lora_magnitude_vector.data, self.backend)
        else:
            merge_lora_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data, self.scaling,
                        self.backend)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling · B A`` from ``weight`` again (exact to within one rounding per element)."""
        self._refuse_sharded("unmerge")
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged; nothing to unmerge")
        if self.use_dora:
            if self._merged_norm is None:
                raise RuntimeError(
                    "this DoRA LoRALinear was loaded merged: the row norms of its unmerged weight are not known, "
                    "so it cannot be unmerged (as in PEFT); load the unmerged weight instead")
            self._weight_norms.clear()
            dora_unmerge_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data, self.scaling,
                          self.lora_magnitude_vector.data, self._merged_norm, self.backend)
            self._merged_norm = None
        else:
            unmerge_lora_(self.weight.data, self.lora_A.weight.data, self.lora_B.weight.data, self.scaling,
                          self.backend)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
            f"use_rslora={self.use_rslora}, backend={self.backend!r}, merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
            + ("" if self.adapter_enabled else ", adapter disabled")
        )


_DORA_4BIT = ("use_dora=True on a bitsandbytes Linear4bit: DoRA's row norms need the 16-bit weight and the 4-bit "
              "kernels have no DoRA; use a 16-bit base, or PEFT (accelerate_peft leaves such layers to PEFT)")


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
    use_dora: bool = False,
) -> nn.Module:
    """Swap the chosen ``nn.Linear`` modules of ``model`` for ``LoRALinear`` in place; freeze the rest.
    A bitsandbytes ``Linear4bit`` becomes a :class:`~lora_kernels.nf4.LoRALinear4bit` (QLoRA).

    ``target_modules`` follows PEFT: a regular expression matched against each
    module's full name, or a list of names/suffixes (``["q_proj", "v_proj"]``).
    Every parameter except the new ``lora_A``/``lora_B`` ends with
    ``requires_grad=False``. Raises if nothing matched, if a match already has an
    adapter, or if a match is not an ``nn.Linear``, having modified nothing. Returns
    ``model``.

    On a transformers model, its ``save_pretrained`` also writes ``lora_kernels.json``
    (the layers' settings), so that ``from_pretrained`` + :func:`load_lora_pretrained`
    restores the adapter, and its ``disable_adapters``/``enable_adapters`` call
    :func:`disable_adapters`/:func:`enable_adapters` (these names belong to
    transformers' PEFT integration, which does not know ``LoRALinear``).
    """
    lora_scaling(r, alpha, use_rslora)
    check_dropout(dropout)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LoRALinear) for c in ("lora_A", "lora_B")}
    chosen = [(n, m) for n, m in model.named_modules() if n and n not in inside and _matches(n, target_modules)]
    if not chosen:
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}")
    again = [n for n, m in chosen if isinstance(m, LoRALinear)]
    if again:
        raise ValueError(
            "these layers already have an adapter (LoRALinear holds one): " + ", ".join(again)
            + "; for several named adapters per layer use PEFT and lora_kernels.accelerate_peft"
        )
    from .nf4.module import QuantWeight, is_linear4bit

    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen if type(m) is not nn.Linear and not is_linear4bit(m)]
    if wrong:
        raise TypeError("LoRALinear replaces nn.Linear (or bitsandbytes' Linear4bit) only; these targets are not: "
                        + ", ".join(wrong))
    if use_dora and any(is_linear4bit(m) for _, m in chosen):
        raise ValueError(_DORA_4BIT)
    for n, m in chosen:
        if is_linear4bit(m):
            try:
                QuantWeight.from_param(m.weight)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{n}: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(
            linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            init=init, backend=backend, lora_dtype=lora_dtype, use_dora=use_dora,
        ))
    _patch_transformers_methods(model)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter of ``model``: the factors (keys ending in ``lora_A.weight`` / ``lora_B.weight``)
    and DoRA's magnitudes (``lora_magnitude_vector``)."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_A." in f".{k}" or ".lora_B." in f".{k}" or k.split(".")[-1] == "lora_magnitude_vector"}


def _lora_layers(model: nn.Module) -> list[tuple[str, "LoRALinear"]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, "LoRALinear"]]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRALinear layer")
    return layers


def disable_adapters(model: nn.Module) -> None:
    """Every ``LoRALinear`` of ``model`` computes its base layer only, until :func:`enable_adapters`.

    Refused (nothing changed) while any layer is merged: its weight holds the adapter.
    """
    layers = _require_layers(model, "disable_adapters")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"disable_adapters: these layers are merged, unmerge() them first: {merged}")
    for _, m in layers:
        m.adapter_enabled = False


def enable_adapters(model: nn.Module) -> None:
    """Undo :func:`disable_adapters`."""
    for _, m in _require_layers(model, "enable_adapters"):
        m.adapter_enabled = True


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model):`` runs the base model (PEFT's ``disable_adapter()`` context)."""
    disable_adapters(model)
    try:
        yield model
    finally:
        enable_adapters(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every ``LoRALinear`` and put a plain ``nn.Linear`` (the merged weight, same tensor) in its place.

    The result holds no adapter: PEFT's ``merge_and_unload``. Returns ``model``.
    """
    layers = _require_layers(model, "merge_and_unload")
    for _, m in layers:
        m._refuse_sharded("merge")
    for name, m in layers:
        if not m.merged:
            m.merge()
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        linear.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    for attr in _TRANSFORMERS_METHODS:
        model.__dict__.pop(attr, None)
    return model


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print and return ``(trainable, total)`` parameter counts, as PEFT's method of the same name."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


# --------------------------------------------------------------------------- #
# transformers models prepared with apply_lora
# --------------------------------------------------------------------------- #

LORA_CONFIG_FILE = "lora_kernels.json"


def _layer_settings(m: "LoRALinear") -> dict:
    return dict(r=m.r, alpha=m.alpha, dropout=m.dropout, use_rslora=m.use_rslora, scaling=m.scaling,
                use_dora=m.use_dora)


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """transformers' ``save_pretrained`` (every tensor, adapters included), plus ``lora_kernels.json``."""
    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    layers = _lora_layers(model)
    if layers and kwargs.get("is_main_process", True):
        with open(os.path.join(save_directory, LORA_CONFIG_FILE), "w") as f:
            json.dump({"format": 1, "layers": {n: _layer_settings(m) for n, m in layers}}, f, indent=2)
    return out


def _refuse_peft_method(name: str, *args, **kwargs):
    raise RuntimeError(
        f"{name}() belongs to transformers' PEFT integration, which does not manage lora_kernels' LoRALinear "
        "layers (one adapter each). For several named adapters, build the model with PEFT and run it on "
        "lora_kernels with lora_kernels.accelerate_peft(model)"
    )


_TRANSFORMERS_METHODS = {
    "save_pretrained": _save_pretrained,
    "disable_adapters": disable_adapters,
    "enable_adapters": enable_adapters,
    "add_adapter": functools.partial(_refuse_peft_method, "add_adapter"),
    "load_adapter": functools.partial(_refuse_peft_method, "load_adapter"),
    "set_adapter": functools.partial(_refuse_peft_method, "set_adapter"),
}


def _patch_transformers_methods(model: nn.Module) -> None:
    # NOTE: instance attributes on this model only (functools.partial, so deepcopy/pickle follow
    # the model); a model without transformers' methods is left alone.
    for name, fn in _TRANSFORMERS_METHODS.items():
        if callable(getattr(type(model), name, None)):
            if isinstance(fn, functools.partial):
                setattr(model, name, fn)
            else:
                setattr(model, name, functools.partial(fn, model))


def _checkpoint_tensors(path, keys: set[str]) -> dict[str, Tensor]:
    """The tensors ``keys`` of a transformers checkpoint folder (one safetensors file or shards)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {weight_map[k] for k in keys if k in weight_map}
    else:
        files = {"model.safetensors"}
    out = {}
    for name in sorted(files):
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in keys & set(f.keys()):
                out[k] = f.get_tensor(k)
    return out


def load_lora_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Restore the ``LoRALinear`` layers of a model saved by ``save_pretrained`` after :func:`apply_lora`.

    ``model`` comes from ``from_pretrained(path)``, which loaded the base weights and
    reported the adapter tensors as unexpected: this wraps the same layers again,
    with the saved rank, alpha, dropout, rsLoRA and merged state, loads their
    factors and freezes everything else. Everything is checked before anything is
    modified. Returns ``model``.
    """
    config_file = os.path.join(path, LORA_CONFIG_FILE)
    if not os.path.exists(config_file):
        raise FileNotFoundError(
            f"load_lora_pretrained: {config_file} is missing: save the model with save_pretrained on a model "
            "prepared by lora_kernels.apply_lora (it writes that file)"
        )
    with open(config_file) as f:
        settings = json.load(f)["layers"]
    keys = {f"{n}.{k}" for n in settings
            for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "_extra_state")}
    tensors = _checkpoint_tensors(path, keys)
    plan, errors = [], []
    for name, cfg in settings.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            errors.append(f"{name}: no such module in the model")
            continue
        A, B = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if A is None or B is None:
            errors.append(f"{name}: lora_A/lora_B missing from the checkpoint")
            continue
        if type(module) is not nn.Linear:
            errors.append(f"{name}: is {type(module).__name__}, not the plain nn.Linear from_pretrained builds")
            continue
        r = cfg["r"]
        if tuple(A.shape) != (r, module.in_features) or tuple(B.shape) != (module.out_features, r):
            errors.append(f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the layer")
            continue
        mag = tensors.get(f"{name}.lora_magnitude_vector")
        if cfg.get("use_dora") and (mag is None or tuple(mag.shape) != (module.out_features,)):
            errors.append(f"{name}: a DoRA layer without its lora_magnitude_vector of shape ({module.out_features},)")
            continue
        plan.append((name, module, cfg, A, B, mag, bool(tensors.get(f"{name}._extra_state", torch.tensor(False)))))
    if errors:
        raise ValueError("load_lora_pretrained: nothing was loaded:\n  " + "\n  ".join(errors))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, cfg, A, B, mag, merged in plan:
        layer = LoRALinear.from_linear(module, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                                       use_rslora=cfg["use_rslora"], lora_dtype=A.dtype,
                                       use_dora=cfg.get("use_dora", False))
        layer.scaling = cfg["scaling"]
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
            if layer.use_dora:
                layer.lora_magnitude_vector.copy_(mag)
        layer.merged = merged  # a merged checkpoint's weight already holds scaling·B A
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    _patch_transformers_methods(model)
    return model
