"""PEFT interoperability: run PEFT's LoRA layers on lora_kernels, and read and write PEFT adapters.

- :func:`from_peft` swaps, in place, each LoRA ``Linear`` of a PEFT model for a
  :class:`~lora_kernels.LoRALinear` that shares the very same parameter tensors
  (base weight and bias, ``lora_A``/``lora_B`` of the active adapter). Optimizers
  built before the swap keep working, and the swapped layers present PEFT's
  state-dict layout (``base_layer.weight``, ``lora_A.<adapter>.weight``), so
  ``peft_model.state_dict()`` and ``load_state_dict`` of full checkpoints see
  exactly the keys they saw before. PEFT's own ``save_pretrained`` finds adapter
  weights by visiting its tuner layers, which are gone after the swap, and would
  write an empty adapter: so ``from_peft`` replaces the model's ``save_pretrained``
  (on that instance) by :func:`save_peft_adapter` (same files, same keys), which
  refuses the options it does not implement. :func:`to_peft` puts the original
  PEFT layers back (also the way to ``merge_and_unload``, add adapters, and use
  the rest of PEFT's API). :func:`lora_kernels.accelerate_peft` keeps the model
  PEFT's in the first place and is the recommended path.
- :func:`save_peft_adapter` writes ``adapter_model.safetensors`` and
  ``adapter_config.json`` for a model made with :func:`~lora_kernels.apply_lora`,
  which ``peft.PeftModel.from_pretrained`` loads.
- :func:`load_peft_adapter` loads such a directory (written by PEFT or by
  :func:`save_peft_adapter`) into a model, wrapping plain ``nn.Linear`` targets
  as needed.

Only plain LoRA on ``nn.Linear`` is supported. Anything else (DoRA and the other
LoRA variants, Embedding/Conv targets, several adapters, ``lora_bias``,
``fan_in_fan_out``, quantised base layers, ...) is refused with an error naming
the feature, before anything is modified.

``safetensors`` is needed to write and read adapters; ``peft`` only for
:func:`from_peft` / :func:`to_peft`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections import Counter
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .functional import lora_scaling
from .module import LoRALinear, _lora_layers

__all__ = ["from_peft", "to_peft", "save_peft_adapter", "load_peft_adapter", "UnsupportedPeftFeature"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."


class UnsupportedPeftFeature(ValueError):
    """A PEFT model or adapter uses a feature that lora_kernels does not implement."""


def _peft():
    try:
        import peft  # noqa: F401
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:  # pragma: no cover - exercised only without peft
        raise ImportError("from_peft/to_peft need the 'peft' package: pip install peft") from exc
    return lora_layer, BaseTunerLayer


# --------------------------------------------------------------------------- #
# PEFT model -> LoRALinear
# --------------------------------------------------------------------------- #


def _refusal(layer: nn.Module, lora_layer) -> Optional[str]:
    """Why a PEFT tuner layer cannot become a LoRALinear, or None if it can."""
    if not isinstance(layer, lora_layer.LoraLayer):
        return f"not a LoRA layer ({type(layer).__name__}): only LoRA is supported"
    if type(layer) is not lora_layer.Linear:
        return f"non-Linear LoRA target ({type(layer).__name__}): only nn.Linear targets are supported"
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear (quantised or wrapped layers are not supported)"
    adapters = list(layer.active_adapters)
    if len(adapters) != 1:
        return f"multiple active adapters {adapters}: activate exactly one"
    if len(layer.lora_A) != 1:
        return (f"multiple adapters loaded {sorted(layer.lora_A.keys())}: delete the inactive ones "
                "(peft_model.delete_adapter) first")
    (name,) = adapters
    if name not in layer.lora_A:
        return f"active adapter {name!r} has no LoRA weights on this layer"
    dora = bool(layer.use_dora.get(name, False))
    if dora != (name in layer.lora_magnitude_vector):
        return "DoRA (use_dora) without its magnitude vector, or a magnitude vector without use_dora"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return f"LoRA variant {type(variant).__name__}"
    if layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
        return "lora_bias=True"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    if layer.merged:
        return f"merged adapters {layer.merged_adapters}: unmerge() first"
    if layer.disable_adapters:
        return "adapters disabled (disable_adapter context or disable_adapters=True)"
    if layer.lora_A[name].bias is not None:
        return "lora_A with a bias"
    dropout = layer.lora_dropout[name]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(dropout).__name__}"
    return None


def _peft_layout_hooks(layer: LoRALinear, adapter: str) -> None:
    """Make ``layer``'s state dict read and load with PEFT's key names.

    ``weight``/``bias`` ↔ ``base_layer.weight``/``base_layer.bias`` and
    ``lora_A.weight`` ↔ ``lora_A.<adapter>.weight`` (same for ``lora_B``);
    ``_extra_state`` is left out, as PEFT has none; so a merged layer refuses to
    give a state dict rather than write a merged weight that reads as unmerged.
    """
    renames = {
        "weight": "base_layer.weight",
        "bias": "base_layer.bias",
        "lora_A.weight": f"lora_A.{adapter}.weight",
        "lora_B.weight": f"lora_B.{adapter}.weight",
    }
    if layer.use_dora:
        renames["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter}.weight"

    def to_peft_keys(module, state_dict, prefix, local_metadata):
        if module.merged:  # PEFT's layout has no place for the flag, and a merged weight needs it
            raise RuntimeError(
                f"{prefix[:-1] or 'layer'}: a merged layer converted by from_peft has no PEFT state-dict layout "
                "that records the merge; unmerge() before state_dict()/saving"
            )
        # This module's keys are the last ones written: pop and re-append them in order.
        own = [k for k in list(state_dict) if k.startswith(prefix) and k[len(prefix):] in (*renames, "_extra_state")]
        for key in own:
            value = state_dict.pop(key)
            local = key[len(prefix):]
            if local != "_extra_state":
                state_dict[prefix + renames[local]] = value

    def from_peft_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for ours, theirs in renames.items():
            if prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        extra = prefix + "_extra_state"
        if type(module).get_extra_state is not nn.Module.get_extra_state and extra not in state_dict:
            state_dict[extra] = module.get_extra_state()

    layer.register_state_dict_post_hook(to_peft_keys)
    layer.register_load_state_dict_pre_hook(from_peft_keys)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def from_peft(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every LoRA ``Linear`` of ``peft_model`` for a ``LoRALinear`` in place; returns ``peft_model``.

    The new layers share the PEFT layers' parameters (no copies) and take their
    rank, scaling and dropout probability; ``requires_grad`` flags are kept.
    State-dict keys keep PEFT's layout, so ``save_pretrained`` writes the same
    file as before. Raises :class:`UnsupportedPeftFeature` naming every layer
    that cannot be converted and why, having modified nothing; raises
    ``ValueError`` if the model has no LoRA layer.
    """
    lora_layer, BaseTunerLayer = _peft()
    tuners = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not tuners:
        raise ValueError("from_peft found no PEFT tuner layer in the model")
    problems = [f"{n}: {why}" for n, m in tuners if (why := _refusal(m, lora_layer))]
    if problems:
        raise UnsupportedPeftFeature(
            "from_peft cannot convert these PEFT layers (nothing was changed):\n  " + "\n  ".join(problems)
        )
    for name, layer in tuners:
        (adapter,) = layer.active_adapters
        base, A, B = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
        dropout = layer.lora_dropout[adapter]
        flags = [p.requires_grad for p in (base.weight, base.bias) if p is not None]
        devices = [base.weight.device] if base.weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # from_linear's throw-away init must not move the RNG
            new = LoRALinear.from_linear(
                base, r=layer.r[adapter], alpha=layer.lora_alpha[adapter],
                dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                use_rslora=layer.use_rslora.get(adapter, False), backend=backend, lora_dtype=A.weight.dtype,
                use_dora=bool(layer.use_dora.get(adapter, False)),
            )
        for p, flag in zip((base.weight, base.bias), flags):
            p.requires_grad_(flag)
        new.lora_A, new.lora_B = A, B
        if new.use_dora:  # PEFT's magnitude Parameter itself, shared as the factors are
            new.lora_magnitude_vector = layer.lora_magnitude_vector[adapter].weight
        new.scaling = layer.scaling[adapter]  # honours set_scale / alpha_pattern
        new.train(layer.training)
        _peft_layout_hooks(new, adapter)
        object.__setattr__(new, "_peft_layer", layer)  # kept for to_peft, not registered as a submodule
        _swap(peft_model, name, new)
    if _is_peft_model(peft_model):
        # PEFT's save_pretrained would write an adapter with no tensor: this instance saves through ours.
        peft_model.save_pretrained = functools.partial(_save_converted, peft_model)
    return peft_model


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and hasattr(model, "get_base_model")


def _save_converted(model: nn.Module, save_directory, safe_serialization: bool = True,
                    selected_adapters=None, is_main_process: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a PEFT model converted by :func:`from_peft`: :func:`save_peft_adapter`."""
    unsupported = sorted(k for k, v in kwargs.items() if v not in (None, "auto"))
    if not safe_serialization:
        unsupported.append("safe_serialization=False")
    if selected_adapters not in (None, list(model.peft_config)):
        unsupported.append(f"selected_adapters={selected_adapters!r}")
    if unsupported:
        raise UnsupportedPeftFeature(
            f"save_pretrained after from_peft supports none of {unsupported} (it writes the active adapter with "
            "save_peft_adapter); call lora_kernels.peft_interop.to_peft(model) first for PEFT's own save_pretrained"
        )
    if is_main_process:
        save_peft_adapter(model, save_directory)


def to_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`from_peft`: put the original PEFT layers (same parameters) back; returns ``model``."""
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and hasattr(m, "_peft_layer")]
    merged = [n for n, m in swapped if m.merged]
    if merged:
        raise RuntimeError(f"to_peft: these layers are merged, unmerge() them first: {merged}")
    for name, layer in swapped:
        peft_layer = layer._peft_layer
        peft_layer.train(layer.training)
        _swap(model, name, peft_layer)
    model.__dict__.pop("save_pretrained", None)
    return model


# --------------------------------------------------------------------------- #
# Adapters on disk
# --------------------------------------------------------------------------- #


def _default_targets(model: nn.Module, names: list[str]) -> Union[list[str], str]:
    """Leaf names (``["q_proj", "v_proj"]``) when they pick out exactly ``names``, else an exact regex."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    picked = {n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in leaves)}
    if picked == set(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def save_peft_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    base_model_name_or_path: Optional[str] = None,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
) -> None:
    """Write the LoRA layers of ``model`` as a PEFT adapter directory at ``path``.

    Writes ``adapter_model.safetensors`` (keys ``base_model.model.<name>.lora_A.weight``
    and ``...lora_B.weight``, in the factors' dtype, and for DoRA layers
    ``...lora_magnitude_vector``, as PEFT writes it) and ``adapter_config.json``
    (``peft_type`` LORA; ranks and alphas that differ between layers go into
    ``rank_pattern``/``alpha_pattern``). ``target_modules`` defaults to the layers'
    leaf names when those select exactly the LoRA layers, else to a regular
    expression of their full names. Merged layers are saved too: their factors
    are unchanged by merging.

    ``model`` may also be a PEFT model converted by :func:`from_peft`: then its
    own ``LoraConfig`` is written (``base_model_name_or_path`` overridden if
    given), and the files match what ``save_pretrained`` wrote before the swap.
    """
    from safetensors.torch import save_file

    peft_config = None
    if _is_peft_model(model):
        if len(model.peft_config) != 1:
            raise UnsupportedPeftFeature(
                f"save_peft_adapter: the PEFT model holds several adapters {sorted(model.peft_config)}"
            )
        (peft_config,) = model.peft_config.values()
        model = model.get_base_model()
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRALinear layer")
    for attr, what in (("use_rslora", "use_rslora"), ("dropout", "dropout"), ("use_dora", "use_dora")):
        values = {getattr(m, attr) for _, m in layers}
        if len(values) > 1:
            raise UnsupportedPeftFeature(
                f"save_peft_adapter: layers differ in {what} ({sorted(values)}); a PEFT LoraConfig has one value"
            )
    odd = [n for n, m in layers if abs(m.scaling - lora_scaling(m.r, m.alpha, m.use_rslora)) > 1e-12 * abs(m.scaling)]
    if odd:
        raise UnsupportedPeftFeature(f"save_peft_adapter: scaling is not alpha/r (or alpha/sqrt(r)) on {odd}")
    r = Counter(m.r for _, m in layers).most_common(1)[0][0]
    alpha = Counter(m.alpha for _, m in layers).most_common(1)[0][0]
    names = [n for n, _ in layers]
    if target_modules is None:
        target_modules = _default_targets(model, names)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": layers[0][1].dropout,
        "use_rslora": layers[0][1].use_rslora,
        "target_modules": target_modules,
        "rank_pattern": {re.escape(n): m.r for n, m in layers if m.r != r},
        "alpha_pattern": {re.escape(n): m.alpha for n, m in layers if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": layers[0][1].use_dora,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, m in layers:
        for part in ("lora_A", "lora_B"):
            tensors[f"{KEY_PREFIX}{name}.{part}.weight"] = getattr(m, part).weight.detach().cpu().contiguous()
        if m.use_dora:
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if peft_config is not None:  # as PeftModel.save_pretrained writes it
        peft_config = copy.deepcopy(peft_config)
        peft_config.inference_mode = True
        if base_model_name_or_path is not None:
            peft_config.base_model_name_or_path = base_model_name_or_path
        auto_mapping = None
        if peft_config.task_type is None:
            auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
        peft_config.save_pretrained(path, auto_mapping_dict=auto_mapping)
        return
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _pattern(name: str, patterns: dict, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module name ending in it.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_adapter(path) -> tuple[dict, dict[str, Tensor]]:
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    else:
        tensors = torch.load(os.path.join(path, ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    return config, tensors


def _config_refusals(config: dict) -> list[str]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only LORA)")
    for key in ("lora_bias", "fan_in_fan_out"):
        if config.get(key):
            problems.append(f"{key}=True")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained base biases)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r}")
    return problems


def load_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``; returns ``model``.

    Each adapter module must be, in ``model``, either a ``LoRALinear`` of the same
    rank and scaling (its factors are overwritten), or a plain ``nn.Linear``,
    which is wrapped with :meth:`LoRALinear.from_linear` using the adapter's rank,
    alpha, dropout and rsLoRA setting (and then, as :func:`apply_lora` does, every
    other parameter of the model is frozen). With ``strict``, a ``LoRALinear`` of
    the model that the adapter does not cover is an error. Everything is checked
    before anything is modified.
    """
    given = model
    if _is_peft_model(model):
        model = model.get_base_model()
    config, tensors = _read_adapter(path)
    problems = _config_refusals(config)
    if problems:
        raise UnsupportedPeftFeature(f"load_peft_adapter: unsupported adapter features: {', '.join(problems)}")
    dora = bool(config.get("use_dora", False))
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key) or \
            re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?", key)
        if m is None or (m.group(2) == "lora_magnitude_vector" and not dora):
            raise UnsupportedPeftFeature(
                f"load_peft_adapter: unexpected tensor {key!r} (only lora_A/lora_B weights, and "
                "lora_magnitude_vector with use_dora=True)")
        factors.setdefault(m.group(1), {})[m.group(2)] = value

    plan, errors = [], []
    for name, pair in factors.items():
        mag = pair.pop("lora_magnitude_vector", None)
        if set(pair) != {"lora_A", "lora_B"} or (dora and mag is None):
            errors.append(f"{name}: has only {sorted(pair) + (['lora_magnitude_vector'] if mag is not None else [])}")
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            errors.append(f"{name}: no such module in the model")
            continue
        r = _pattern(name, config.get("rank_pattern"), config["r"])
        alpha = _pattern(name, config.get("alpha_pattern"), config["lora_alpha"])
        rslora = bool(config.get("use_rslora", False))
        A, B = pair["lora_A"], pair["lora_B"]
        if isinstance(module, LoRALinear):
            out_f, in_f = module.out_features, module.in_features
            if module.merged:
                errors.append(f"{name}: is merged; unmerge() before loading")
            elif module.use_dora != dora:
                errors.append(f"{name}: layer has use_dora={module.use_dora}; the adapter use_dora={dora}")
            elif module.r != r or abs(module.scaling - lora_scaling(r, alpha, rslora)) > 1e-12 * abs(module.scaling):
                errors.append(f"{name}: layer has r={module.r}, scaling={module.scaling}; adapter has r={r}, "
                              f"scaling={lora_scaling(r, alpha, rslora)}")
        elif type(module) is nn.Linear:
            out_f, in_f = module.out_features, module.in_features
        else:
            errors.append(f"{name}: is {type(module).__name__}, not nn.Linear or LoRALinear")
            continue
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            errors.append(f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                          f"r={r}, in={in_f}, out={out_f}")
            continue
        if mag is not None and tuple(mag.shape) != (out_f,):
            errors.append(f"{name}: lora_magnitude_vector {tuple(mag.shape)} does not fit out={out_f}")
            continue
        plan.append((name, module, r, alpha, rslora, A, B, mag))
    if strict:
        uncovered = [n for n, _ in _lora_layers(model) if n not in factors]
        if uncovered:
            errors.append(f"LoRA layers without weights in the adapter (strict=True): {uncovered}")
    if errors:
        raise ValueError("load_peft_adapter: nothing was loaded:\n  " + "\n  ".join(errors))

    wrapped = False
    for name, module, r, alpha, rslora, A, B, mag in plan:
        if not isinstance(module, LoRALinear):
            module = LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                                            use_rslora=rslora, lora_dtype=A.dtype, use_dora=dora)
            _swap(model, name, module)
            wrapped = True
        with torch.no_grad():
            module.lora_A.weight.copy_(A)
            module.lora_B.weight.copy_(B)
            if mag is not None:
                module.lora_magnitude_vector.copy_(mag)
    if wrapped:
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_A." in f".{n}" or ".lora_B." in f".{n}"
                             or n.split(".")[-1] == "lora_magnitude_vector")
    return given
