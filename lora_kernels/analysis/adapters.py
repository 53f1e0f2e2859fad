"""Reading saved adapters and base weights, and pairing their layers by name.

Accepted inputs (a file, or a folder holding them):

* this package's adapter state dict (``lora_state_dict(model)``), keys
  ``<path>.lora_A.weight`` / ``<path>.lora_B.weight``;
* PEFT's ``adapter_model.safetensors`` (or ``.bin``), keys
  ``base_model.model.<path>.lora_A.weight``, with ``adapter_config.json``
  beside it giving ``lora_alpha``, ``use_rslora`` and ``alpha_pattern``;
* PEFT's in-memory names (``<path>.lora_A.<adapter>.weight``,
  ``<path>.base_layer.weight``);
* for base weights, any state dict holding ``<path>.weight`` (a Hugging Face
  checkpoint folder with several ``*.safetensors`` shards works too).

Files are opened lazily (``safe_open`` / ``torch.load(mmap=True)``), so only
the tensors that are analysed are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor

_PEFT_PREFIX = "base_model.model."
# ``path`` is empty for the state dict of a lone LoRALinear (keys ``lora_A.weight``).
_ADAPTER_KEY = re.compile(r"^(?:(?P<path>.+)\.)?lora_(?P<factor>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def strip_prefix(key: str) -> str:
    """Drop PEFT's ``base_model.model.`` wrapper prefix, so both formats name a layer the same way."""
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


class TensorFile:
    """Read-on-demand view of one or more state-dict files (``.safetensors`` or ``torch.save``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files = _state_dict_files(path)
        self._where: dict[str, tuple[str, object]] = {}
        for f in self.files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                handle = safe_open(f, framework="pt", device="cpu")
                for k in handle.keys():
                    self._where[k] = (f, handle)
            else:
                sd = _torch_load(f)
                for k, v in sd.items():
                    if isinstance(v, Tensor):
                        self._where[k] = (f, v)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Tensor:
        _, src = self._where[key]
        return src if isinstance(src, Tensor) else src.get_tensor(key)


def _torch_load(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    # A checkpoint that wraps its state dict: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(sd, dict) and not any(isinstance(v, Tensor) for v in sd.values()):
        for name in ("state_dict", "model", "module"):
            if isinstance(sd.get(name), dict):
                return sd[name]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def _state_dict_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    for name in _ADAPTER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    names = sorted(os.listdir(path))
    found = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
    if not found:
        found = [os.path.join(path, n) for n in names if n.endswith(_TORCH_SUFFIXES)]
    if not found:
        raise FileNotFoundError(f"{path} holds no .safetensors, .bin, .pt or .pth file")
    return found


@dataclass
class LoRALayer:
    """The factors of one adapted layer: ``lora_A`` ``(r, d_in)``, ``lora_B`` ``(d_out, r)``."""

    path: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class Adapter:
    """All LoRA layers of one saved adapter, keyed by module path (PEFT prefix removed)."""

    source: str
    layers: dict[str, LoRALayer]
    scaling_note: str
    skipped: list[str] = field(default_factory=list)


def find_adapter_config(path: str) -> Optional[dict]:
    """PEFT's ``adapter_config.json`` in the folder ``path`` or beside the file ``path``."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f)
    return None


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's get_pattern_key: an exact key, else a regex matching a dotted suffix of the path.
    for key, value in patterns.items():
        if key == path or re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_scaling(
    path: str, r: int, config: Optional[dict], alpha: Optional[float] = None, use_rslora: bool = False
) -> Optional[float]:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) from an explicit ``alpha`` or a PEFT config, else None."""
    if alpha is None and config is not None and "lora_alpha" in config:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        use_rslora = bool(config.get("use_rslora", False))
    if alpha is None:
        return None
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def load_adapter(
    path: str,
    adapter_name: Optional[str] = None,
    alpha: Optional[float] = None,
    scaling: Optional[float] = None,
    use_rslora: bool = False,
) -> Adapter:
    """Every ``(lora_A, lora_B)`` pair in ``path``, with each layer's scaling ``s`` of ``ΔW = s B A``.

    The scaling comes from ``scaling`` if given, else ``alpha`` (over each
    layer's own ``r``), else PEFT's ``adapter_config.json`` beside the file,
    else 1 (noted in :attr:`Adapter.scaling_note`). Layers that are not 2-D
    linear factors (convolutions) or lack one factor are listed in ``skipped``.
    ``adapter_name`` picks one adapter when the keys carry several
    (``lora_A.<name>.weight``).
    """
    tensors = TensorFile(path)
    config = find_adapter_config(path) if scaling is None and alpha is None else None
    factors: dict[str, dict[str, str]] = {}
    names: set[str] = set()
    for key in tensors.keys():
        m = _ADAPTER_KEY.match(strip_prefix(key))
        if not m:
            continue
        if adapter_name is not None and m["name"] not in (None, adapter_name):
            continue
        names.add(m["name"])
        factors.setdefault(m["path"] or "", {})[m["factor"]] = key
    if len(names) > 1:
        raise ValueError(
            f"{path} holds several adapters ({', '.join(sorted(n or '<unnamed>' for n in names))}); "
            "choose one with adapter_name"
        )
    if not factors:
        raise ValueError(f"{path} holds no LoRA factors (keys ending in lora_A.weight / lora_B.weight)")
    if scaling is not None:
        note = f"scaling {scaling:g} (given)"
    elif alpha is not None:
        note = f"scaling alpha/{'sqrt(r)' if use_rslora else 'r'} with alpha={alpha:g} (given)"
    elif config is not None and "lora_alpha" in config:
        note = "scaling from adapter_config.json (lora_alpha, use_rslora, alpha_pattern)"
    else:
        note = "scaling 1: no alpha given and no adapter_config.json found; ‖ΔW‖ is ‖B A‖"
    layers, skipped = {}, []
    for layer_path in natural_sorted(factors):
        keys = factors[layer_path]
        if set(keys) != {"A", "B"}:
            skipped.append(f"{layer_path} (only lora_{''.join(keys)})")
            continue
        A, B = tensors.get(keys["A"]), tensors.get(keys["B"])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            skipped.append(f"{layer_path} (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}: not linear factors)")
            continue
        s = scaling
        if s is None:
            s = layer_scaling(layer_path, A.shape[0], config, alpha, use_rslora)
        layers[layer_path] = LoRALayer(layer_path, A, B, 1.0 if s is None else float(s))
    return Adapter(path, layers, note, skipped)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Sort so ``layers.2`` comes before ``layers.10``."""
    return sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def match_name(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate equal to ``name``, else the only one that is a dotted suffix of it or has it as one.

    So ``model.layers.0.q_proj`` pairs with ``transformer.model.layers.0.q_proj``
    or ``layers.0.q_proj``; an ambiguous or missing match gives None.
    """
    candidates = list(candidates)
    if name in candidates:
        return name
    hits = [c for c in candidates if c.endswith("." + name) or name.endswith("." + c)]
    return hits[0] if len(hits) == 1 else None


def pair_layers(names1: Iterable[str], names2: Iterable[str]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Pairs ``(name1, name2)`` for the same layer of two adapters, and the names left unpaired on each side."""
    names1, remaining = list(names1), list(names2)
    pairs, alone1 = [], []
    for n in names1:
        m = match_name(n, remaining)
        if m is None:
            alone1.append(n)
        else:
            pairs.append((n, m))
            remaining.remove(m)
    return pairs, alone1, remaining


class BaseWeights:
    """Base-model weights looked up by layer path (``<path>.weight`` or PEFT's ``<path>.base_layer.weight``)."""

    def __init__(self, path: str) -> None:
        self.tensors = TensorFile(path)
        self._by_layer: dict[str, str] = {}
        for key in self.tensors.keys():
            name = strip_prefix(key)
            if not (name == "weight" or name.endswith(".weight")) or _ADAPTER_KEY.match(name):
                continue
            layer = name[: -len("weight")].rstrip(".")
            if layer == "base_layer" or layer.endswith(".base_layer"):
                layer = layer[: -len("base_layer")].rstrip(".")
            self._by_layer.setdefault(layer, key)

    def weight(self, layer_path: str, shape: tuple[int, int]) -> tuple[Optional[Tensor], str]:
        """The ``(d_out, d_in) = shape`` weight of ``layer_path``, and a note (empty, or why it is missing/transposed).

        A weight stored transposed (GPT-2's ``Conv1D``, PEFT's ``fan_in_fan_out``)
        is transposed back.
        """
        match = match_name(layer_path, self._by_layer)
        if match is None:
            return None, "no base weight found"
        W = self.tensors.get(self._by_layer[match])
        if tuple(W.shape) == tuple(shape):
            return W, ""
        if W.dim() == 2 and tuple(W.shape) == tuple(shape)[::-1]:
            return W.mT, "stored transposed (fan_in_fan_out)"
        return None, f"base weight {self._by_layer[match]} has shape {tuple(W.shape)}, expected {tuple(shape)}"
