"""The shapes the suite runs: Llama-3-8B's projections, a CPU-sized copy, and the presets.

A *case* is one layer shape at one token count, rank and dropout probability.
Merge and unmerge do not depend on tokens or dropout, so their cases carry
``tokens=0`` and ``dropout=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# (in_features, out_features) of Llama-3-8B's linear layers (hidden 4096, GQA 8 KV heads, MLP 14336).
LLAMA3_8B = {
    "q": (4096, 4096),
    "k": (4096, 1024),
    "v": (4096, 1024),
    "o": (4096, 4096),
    "gate": (4096, 14336),
    "up": (4096, 14336),
    "down": (14336, 4096),
}
# The same model scaled down 16× for CPU smoke runs (hidden 256).
LLAMA3_8B_CPU = {name: (k // 16, n // 16) for name, (k, n) in LLAMA3_8B.items()}
LAYER_ORDER = tuple(LLAMA3_8B)

TIMED_MODES = ("fwd", "fwd+bwd")
MERGE_MODES = ("merge", "unmerge")
MODES = ("fwd", "fwd+bwd", "memory", "merge", "unmerge")
_MODE_ALIASES = {"forward": "fwd", "fwd_bwd": "fwd+bwd", "fwdbwd": "fwd+bwd", "backward": "fwd+bwd", "mem": "memory"}


@dataclass(frozen=True)
class Preset:
    layers: tuple[str, ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    dropouts: tuple[float, ...]


# Quick: the README's main job, a few minutes on an H100. Full: every default shape.
PRESETS = {
    ("cuda", "quick"): Preset(("q", "k", "gate", "down"), (512, 8192), (16,), (0.0, 0.1)),
    ("cuda", "full"): Preset(LAYER_ORDER, (512, 2048, 8192), (8, 16, 64), (0.0, 0.1)),
    ("cpu", "quick"): Preset(("q", "gate"), (128,), (8,), (0.0, 0.1)),
    ("cpu", "full"): Preset(LAYER_ORDER, (64, 256), (8, 16), (0.0, 0.1)),
}


@dataclass(frozen=True)
class Layer:
    """One distinct weight shape; ``name`` lists every projection that has it (``"q/o"``)."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Case:
    layer: Layer
    tokens: int
    r: int
    dropout: float

    @property
    def key(self) -> str:
        s = f"{self.layer.name} {self.layer.in_features}→{self.layer.out_features} r={self.r}"
        if self.tokens:
            s += f" M={self.tokens} p={self.dropout:g}"
        return s


def layers_from_names(names: Iterable[str], table: dict[str, tuple[int, int]]) -> list[Layer]:
    """Projections by name, identical shapes measured once (``q`` and ``o`` become ``q/o``)."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; choose from {', '.join(table)}")
    by_shape: dict[tuple[int, int], list[str]] = {}
    for n in names:
        by_shape.setdefault(table[n], []).append(n)
    return [Layer("/".join(ns), k, n) for (k, n), ns in by_shape.items()]


def custom_layers(in_features: list[int], out_features: list[int]) -> list[Layer]:
    if len(in_features) != len(out_features):
        raise ValueError("--in and --out need the same number of values")
    return [Layer(f"{k}x{n}", k, n) for k, n in zip(in_features, out_features)]


def parse_modes(spec: str) -> tuple[str, ...]:
    if spec == "all":
        return MODES
    out = []
    for m in spec.split(","):
        m = _MODE_ALIASES.get(m.strip(), m.strip())
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)} or 'all'")
        out.append(m)
    return tuple(dict.fromkeys(out))


def activation_cases(layers, tokens, ranks, dropouts) -> list[Case]:
    return [Case(l, m, r, p) for l in layers for m in tokens for r in ranks for p in dropouts]


def merge_cases(layers, ranks) -> list[Case]:
    return [Case(l, 0, r, 0.0) for l in layers for r in ranks]
