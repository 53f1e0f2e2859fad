"""Adapter analysis from Section 7 of the LoRA paper: subspace similarity and amplification.

``core`` holds the linear algebra (pure torch, batched, on any device),
``adapters`` reads saved adapters and base weights and pairs their layers,
``report`` and ``cli`` produce the report of ``python -m lora_kernels.analysis``.
See docs/analysis.md for the definitions.
"""

from .adapters import Adapter, BaseWeights, LoRALayer, load_adapter, pair_layers
from .core import (
    FACTORS,
    Amplification,
    LowRankSVD,
    adapter_bases,
    adapter_basis,
    adapter_similarities,
    adapter_similarity,
    amplification,
    delta_weight,
    lora_svd,
    projected_norm,
    random_orthonormal,
    random_subspace_similarity,
    subspace_similarity,
    top_singular_vectors,
    weight_top_singular_values,
)

__all__ = [
    "FACTORS",
    "Adapter",
    "Amplification",
    "BaseWeights",
    "LoRALayer",
    "LowRankSVD",
    "adapter_bases",
    "adapter_basis",
    "adapter_similarities",
    "adapter_similarity",
    "amplification",
    "delta_weight",
    "load_adapter",
    "lora_svd",
    "pair_layers",
    "projected_norm",
    "random_orthonormal",
    "random_subspace_similarity",
    "subspace_similarity",
    "top_singular_vectors",
    "weight_top_singular_values",
]
