"""The quantities of the LoRA paper's Section 7, in batched, device-agnostic torch.

Shapes follow PEFT and the paper (``W0`` is ``(d_out, d_in)``, ``h = W0 x``):
``lora_A`` is ``(r, d_in)``, ``lora_B`` is ``(d_out, r)`` and ``ΔW = s · B A``.
Every function accepts leading batch dimensions (``(..., r, d_in)``), so a
stack of same-shaped layers is one batched QR / SVD call, and computes on the
input's device in ``dtype`` (float64 unless told otherwise).

Bases are returned as matrices with orthonormal *columns*, the top singular
direction first:

* ``A`` ``(r, d_in)``: its right singular vectors, columns of ``V`` in
  ``A = U Σ Vᵀ``, live in ``R^{d_in}`` (the row space of ``A``: the input
  directions the adapter reads). This is what the paper calls "the
  right-singular unitary matrix" ``U_A``.
* ``B`` ``(d_out, r)``: its left singular vectors, columns of ``U`` in
  ``B = U Σ Vᵀ``, live in ``R^{d_out}`` (the column space of ``B``: the output
  directions the adapter writes).
* ``ΔW = s B A``: either side; ``"right"`` spans the same space as ``A``'s
  (when ``B`` has full column rank), ``"left"`` the same as ``B``'s.

The SVD of ``ΔW`` never forms the ``(d_out, d_in)`` product::

    B  = Q_B R_B        (thin QR, Q_B (d_out, r))
    Aᵀ = Q_A R_A        (thin QR, Q_A (d_in, r))
    s R_B R_Aᵀ = U_c Σ V_cᵀ             (r × r SVD)
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ

which costs ``O((d_out + d_in) r²)`` instead of ``O(d_out d_in r)`` for the
product plus ``O(d_out d_in min(d_out, d_in))`` for a dense SVD.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

Side = Literal["left", "right"]
_SIDES = ("left", "right")


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    if not torch.is_floating_point(t):
        raise TypeError(f"expected a floating-point tensor, got {t.dtype}")
    return t.to(dtype)


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got shape {tuple(t.shape)}")


class LowRankSVD(NamedTuple):
    """Thin SVD ``M = U diag(S) Vh`` with ``U`` ``(..., m, k)``, ``S`` ``(..., k)``, ``Vh`` ``(..., k, n)``."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def lora_svd(
    lora_A: Tensor, lora_B: Tensor, scaling: Union[float, Tensor] = 1.0, dtype: torch.dtype = torch.float64
) -> LowRankSVD:
    """Thin SVD of ``ΔW = scaling · lora_B @ lora_A`` from thin QR factors, without forming ``ΔW``.

    ``lora_A`` ``(..., r, d_in)``, ``lora_B`` ``(..., d_out, r)``; ``scaling`` a
    number or a tensor broadcastable to the batch shape. Returns ``k = min(r,
    d_out, d_in)`` triplets, singular values descending. Directions belonging to
    zero singular values (a rank-deficient update, e.g. ``B = 0`` at
    initialisation) are an arbitrary orthonormal completion.
    """
    _check_2d("lora_A", lora_A)
    _check_2d("lora_B", lora_B)
    if lora_A.shape[-2] != lora_B.shape[-1]:
        raise ValueError(
            f"rank mismatch: lora_A is {tuple(lora_A.shape)} (r, d_in), lora_B is {tuple(lora_B.shape)} (d_out, r)"
        )
    A = _as(lora_A, dtype)
    B = _as(lora_B, dtype)
    Q_B, R_B = torch.linalg.qr(B)  # (..., d_out, k_B), (..., k_B, r)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (..., d_in, k_A), (..., k_A, r)
    core = R_B @ R_A.mT  # (..., k_B, k_A)
    if isinstance(scaling, Tensor):
        core = core * scaling.to(core).reshape(scaling.shape + (1, 1))
    else:
        core = core * scaling
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(Q_B @ U_c, S, Vh_c @ Q_A.mT)


def delta_weight(
    lora_A: Tensor, lora_B: Tensor, scaling: Union[float, Tensor] = 1.0, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The dense update ``ΔW = scaling · B A`` ``(..., d_out, d_in)`` (for reference and small layers)."""
    dtype = dtype or lora_A.dtype
    delta = _as(lora_B, dtype) @ _as(lora_A, dtype)
    if isinstance(scaling, Tensor):
        return delta * scaling.to(delta).reshape(scaling.shape + (1, 1))
    return delta * scaling


def top_singular_vectors(
    M: Tensor, side: Side = "right", k: Optional[int] = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Top-``k`` singular vectors of ``M`` ``(..., m, n)`` as orthonormal columns, largest first.

    ``side="right"``: columns of ``V`` in ``M = U Σ Vᵀ``, shape ``(..., n, k)``;
    ``side="left"``: columns of ``U``, shape ``(..., m, k)``. ``k`` defaults to
    ``min(m, n)``.
    """
    if side not in _SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    _check_2d("M", M)
    U, _, Vh = torch.linalg.svd(_as(M, dtype), full_matrices=False)
    basis = U if side == "left" else Vh.mT
    return basis if k is None else basis[..., :k]


def subspace_similarity(U1: Tensor, U2: Tensor) -> Tensor:
    """The paper's normalised subspace similarity for every pair of prefixes, in one pass.

    ``U1`` ``(..., d, k1)`` and ``U2`` ``(..., d, k2)`` have orthonormal columns
    ordered by importance. Returns ``phi`` ``(..., k1, k2)`` with::

        phi[..., i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)   ∈ [0, 1]

    computed as a 2-D cumulative sum of the squared overlap ``(U1ᵀ U2)²``.
    ``phi = 1`` when one prefix's span contains the other's, ``0`` when they
    are orthogonal; for independent uniformly random subspaces its expectation
    is ``max(i, j) / d`` (see :func:`random_subspace_similarity`).
    """
    _check_2d("U1", U1)
    _check_2d("U2", U2)
    if U1.shape[-2] != U2.shape[-2]:
        raise ValueError(f"bases live in different spaces: {tuple(U1.shape)} vs {tuple(U2.shape)} (..., d, k)")
    dtype = torch.promote_types(U1.dtype, U2.dtype)
    overlap = (U1.to(dtype).mT @ U2.to(dtype)).square()  # (..., k1, k2)
    cumulative = overlap.cumsum(-2).cumsum(-1)
    k1, k2 = overlap.shape[-2:]
    i = torch.arange(1, k1 + 1, device=overlap.device, dtype=dtype)
    j = torch.arange(1, k2 + 1, device=overlap.device, dtype=dtype)
    return (cumulative / torch.minimum(i[:, None], j[None, :])).clamp_(0.0, 1.0)


def random_subspace_similarity(k1: int, k2: int, d: int, device=None, dtype: torch.dtype = torch.float64) -> Tensor:
    """``E[phi(i, j)] = max(i, j) / d`` for independent uniformly random subspaces of ``R^d``, ``(k1, k2)``.

    With ``P_j`` the projector on a random ``j``-dimensional subspace,
    ``E[P_j] = (j / d) I``, so ``E‖U_iᵀ U_j‖²_F = tr(P_i E[P_j]) = i j / d`` and
    dividing by ``min(i, j)`` leaves ``max(i, j) / d``.
    """
    i = torch.arange(1, k1 + 1, device=device, dtype=dtype)
    j = torch.arange(1, k2 + 1, device=device, dtype=dtype)
    return torch.maximum(i[:, None], j[None, :]) / d


# Which singular vectors each factor contributes, and the space they live in.
FACTORS = {
    "A": "right singular vectors of lora_A (row space, R^d_in)",
    "B": "left singular vectors of lora_B (column space, R^d_out)",
    "dW_in": "right singular vectors of ΔW = B A (R^d_in)",
    "dW_out": "left singular vectors of ΔW = B A (R^d_out)",
}


def adapter_bases(
    lora_A: Optional[Tensor], lora_B: Optional[Tensor], factors: Sequence[str], dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """The ordered orthonormal bases that :data:`FACTORS` names, as columns, one per requested factor.

    ``"A"`` needs only ``lora_A`` and ``"B"`` only ``lora_B``; ``"dW_in"`` and
    ``"dW_out"`` share one :func:`lora_svd` (the scaling does not change the
    directions).
    """
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise ValueError(f"factors must be among {list(FACTORS)}, got {unknown}")
    bases = {}
    if "A" in factors:
        bases["A"] = top_singular_vectors(lora_A, "right", dtype=dtype)
    if "B" in factors:
        bases["B"] = top_singular_vectors(lora_B, "left", dtype=dtype)
    if "dW_in" in factors or "dW_out" in factors:
        svd = lora_svd(lora_A, lora_B, 1.0, dtype)
        bases["dW_in"], bases["dW_out"] = svd.Vh.mT, svd.U
    return {f: bases[f] for f in factors}


def adapter_basis(
    lora_A: Optional[Tensor], lora_B: Optional[Tensor], factor: str, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The basis of one ``factor`` (see :func:`adapter_bases`)."""
    return adapter_bases(lora_A, lora_B, [factor], dtype)[factor]


def adapter_similarity(
    adapter1: tuple[Optional[Tensor], Optional[Tensor]],
    adapter2: tuple[Optional[Tensor], Optional[Tensor]],
    factor: str = "A",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``phi`` grid ``(..., r1, r2)`` between two adapters ``(lora_A, lora_B)`` of the same layer.

    One SVD (or QR + small SVD) per adapter, then :func:`subspace_similarity`.
    Rows index ``i`` (first adapter), columns ``j`` (second). ``factor="A"`` is
    the paper's Figures 3–4; ``"A"`` needs no ``lora_B`` and ``"B"`` no ``lora_A``
    (pass None).
    """
    return adapter_similarities(adapter1, adapter2, [factor], dtype)[factor]


def adapter_similarities(
    adapter1: tuple[Optional[Tensor], Optional[Tensor]],
    adapter2: tuple[Optional[Tensor], Optional[Tensor]],
    factors: Sequence[str] = tuple(FACTORS),
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """:func:`adapter_similarity` for several factors, sharing the decompositions."""
    bases1 = adapter_bases(*adapter1, factors, dtype)
    bases2 = adapter_bases(*adapter2, factors, dtype)
    return {f: subspace_similarity(bases1[f], bases2[f].to(bases1[f].device)) for f in factors}


def random_orthonormal(
    *shape: int, generator: Optional[torch.Generator] = None, device=None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Haar-random ``(..., n, k)`` matrix with orthonormal columns (QR of a Gaussian, signs fixed).

    Drawn on the CPU from ``generator`` and then moved, so a seed gives the
    same matrix on every device.
    """
    G = torch.randn(*shape, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    return Q.to(device=device, dtype=dtype)


def projected_norm(weight: Tensor, U: Tensor, Vh: Tensor) -> Tensor:
    """``‖Uᵀ W Vhᵀ‖_F`` for ``W`` ``(..., d_out, d_in)``, ``U`` ``(..., d_out, k)``, ``Vh`` ``(..., k, d_in)``.

    The norm of ``W`` projected onto the ``k``-dimensional left/right subspaces
    (``U Uᵀ W Vhᵀ Vh`` has the same Frobenius norm). Costs ``O(k d_out d_in)``.
    """
    W = weight.to(U.dtype)
    return torch.linalg.matrix_norm((U.mT @ W) @ Vh.mT)


class Amplification(NamedTuple):
    """The quantities of the paper's Table 7 for one layer (or a batch of them).

    ``projected_delta`` ``‖U_ΔᵀWV_Δᵀ‖_F``: ``W`` projected onto the top-``k``
    singular directions of ``ΔW``; ``projected_weight``: onto ``W``'s own top-``k``
    (equal to ``sqrt(σ_1² + … + σ_k²)`` of ``W``); ``projected_random``: onto
    Haar-random ``k``-dimensional subspaces (expected square
    ``k² ‖W‖²_F / (d_out d_in)``). ``factor = delta_norm / projected_delta``:
    how much ``ΔW`` amplifies the directions of ``W`` it shares.
    """

    k: int
    weight_norm: Tensor
    delta_norm: Tensor
    projected_delta: Tensor
    projected_weight: Tensor
    projected_random: Tensor
    factor: Tensor


def weight_top_singular_values(weight: Tensor, k: int, method: str = "exact") -> Tensor:
    """The ``k`` largest singular values of ``weight`` ``(..., m, n)``.

    ``"exact"``: ``torch.linalg.svdvals`` (values only, no vectors);
    ``"lowrank"``: randomized ``torch.svd_lowrank`` with ``2k + 10`` columns and
    6 power iterations: ``O(d_out d_in k)`` instead of ``O(d_out d_in min(d_out,
    d_in))``, accurate when the spectrum decays past ``σ_k``, and never above
    the exact values (it underestimates when the top of the spectrum is flat).
    """
    if method == "exact":
        return torch.linalg.svdvals(weight)[..., :k]
    if method == "lowrank":
        q = min(2 * k + 10, *weight.shape[-2:])
        flat = weight.reshape(-1, *weight.shape[-2:])
        S = torch.stack([torch.svd_lowrank(w, q=q, niter=6)[1][:k] for w in flat])
        return S.reshape(*weight.shape[:-2], S.shape[-1])
    raise ValueError(f"method must be 'exact' or 'lowrank', got {method!r}")


def amplification(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Union[float, Tensor] = 1.0,
    k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
    weight_svd: str = "exact",
) -> Amplification:
    """Table 7 of the LoRA paper for base ``weight`` ``(..., d_out, d_in)`` and ``ΔW = scaling · B A``.

    ``U`` ``(d_out, k)`` and ``V`` ``(k, d_in)`` (rows, as in the paper's
    ``Uᵀ W Vᵀ``) are the top-``k`` left/right singular vectors of ``ΔW``
    (from :func:`lora_svd`, never densely), of ``W``, or of a random matrix;
    ``k`` defaults to the rank ``r``. All on ``weight``'s device, in ``dtype``.
    """
    _check_2d("weight", weight)
    d_out, d_in = weight.shape[-2:]
    if lora_A.shape[-1] != d_in or lora_B.shape[-2] != d_out:
        raise ValueError(
            f"weight {tuple(weight.shape)} (d_out, d_in) does not match lora_A {tuple(lora_A.shape)} (r, d_in) "
            f"and lora_B {tuple(lora_B.shape)} (d_out, r)"
        )
    device = weight.device
    W = _as(weight, dtype)
    svd = lora_svd(lora_A.to(device), lora_B.to(device), scaling, dtype)
    rank = svd.S.shape[-1]
    k = rank if k is None else k
    if not 0 < k <= rank:
        raise ValueError(f"k must be in [1, {rank}], got {k}")
    delta_norm = torch.linalg.vector_norm(svd.S, dim=-1)
    projected_delta = projected_norm(W, svd.U[..., :k], svd.Vh[..., :k, :])
    projected_weight = torch.linalg.vector_norm(weight_top_singular_values(W, k, weight_svd), dim=-1)
    batch = W.shape[:-2]
    U_rand = random_orthonormal(*batch, d_out, k, generator=generator, device=device, dtype=dtype)
    V_rand = random_orthonormal(*batch, d_in, k, generator=generator, device=device, dtype=dtype)
    projected_random = projected_norm(W, U_rand, V_rand.mT)
    return Amplification(
        k=k,
        weight_norm=torch.linalg.matrix_norm(W),
        delta_norm=delta_norm,
        projected_delta=projected_delta,
        projected_weight=projected_weight,
        projected_random=projected_random,
        factor=delta_norm / projected_delta,
    )
