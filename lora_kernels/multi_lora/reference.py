"""The multi-LoRA specification in plain PyTorch, and the CPU path.

A layer holds ``n`` adapters stacked and zero-padded to one rank ``R``:
``A (n, R, K)``, ``B (n, N, R)``, per-adapter scaling ``s (n,)``. Each row
``m`` of ``x (M, K)`` names its adapter ``i = ids[m]`` (``-1``: the base model
only). With ``D`` the dropout mask of the single-adapter path (the same bits
for the same seed, over the rows and columns of the flattened ``x``)::

    xa[m] = s_i · (x[m] ⊙ D[m]) A_iᵀ          (0 for rows with i = -1)   (M, R)
    y[m]  = x[m] W0ᵀ + b + xa[m] B_iᵀ                                     (M, N)

Backward, with ``rows(i)`` the rows whose adapter is ``i``::

    dB_i  = dy[rows(i)]ᵀ xa[rows(i)]                                      (N, R)
    g[m]  = s_i · dy[m] B_i                    (0 for rows with i = -1)   (M, R)
    dA_i  = g[rows(i)]ᵀ (x ⊙ D)[rows(i)]                                  (R, K)
    dx    = dy W0 + (g[m] A_i) ⊙ D  per row

Adapters with no rows get zero gradients. Every intermediate is kept in the
original row order; ``order``/``seg`` (the rows sorted by adapter, and where
each adapter's run starts, see :func:`segments`) are what the kernels use, and
this file ignores them.

The launchers below are a per-adapter loop with masks instead of row
selections, so that they never synchronise with the host (a boolean index
would) and run under CUDA-graph capture too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import dropout_scale, dropout_scale_pair


def segments(adapter_ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(order, seg)``: a stable argsort of ``adapter_ids`` and, for ``i`` in ``[0, n]``, the first
    sorted position whose id is ``≥ i``. Adapter ``i`` owns sorted positions ``[seg[i], seg[i+1])``;
    rows with ``-1`` come first, before ``seg[0]``. Device ops only: no host synchronisation.
    """
    sorted_ids, order = torch.sort(adapter_ids, stable=True)
    bounds = torch.arange(n + 1, device=adapter_ids.device, dtype=adapter_ids.dtype)
    return order, torch.searchsorted(sorted_ids, bounds)


def multi_lora_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: list[Tensor],
    lora_B: list[Tensor],
    scaling: list[float],
    adapter_ids: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Differentiable reference ``y`` by a loop over the adapters, each on its own rows.

    ``lora_A[i]`` is ``(r_i, K)`` and ``lora_B[i]`` ``(N, r_i)``: unpadded, ranks may differ.
    ``x`` is ``(..., K)`` and ``adapter_ids`` has shape ``x.shape[:-1]``.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ids = adapter_ids.reshape(-1)
    xd = dropout_scale(x2, dropout_p, seed)
    y = torch.nn.functional.linear(x2, weight, bias)
    for i, (A, B, s) in enumerate(zip(lora_A, lora_B, scaling)):
        rows = (ids == i).nonzero().squeeze(1)
        y = y.index_add(0, rows, s * (xd[rows] @ A.t()) @ B.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _scaled(t: Tensor, s: Tensor) -> Tensor:
    """``s · t`` with the scaling kept in its fp32 (or fp64) precision, rounded once to ``t``'s dtype."""
    return (t.to(s.dtype) * s).to(t.dtype)


def _masks(adapter_ids: Tensor, n: int):
    return [(adapter_ids == i).unsqueeze(1) for i in range(n)]


def multi_lora_forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed):
    """Op-level forward for 2-D ``x``: ``(y, xa)``."""
    n, R = lora_A.shape[0], lora_A.shape[1]
    xd = dropout_scale(x, dropout_p, seed)
    xa = x.new_zeros(x.shape[0], R)
    up = x.new_zeros(x.shape[0], weight.shape[0])
    for i, sel in enumerate(_masks(adapter_ids, n)):
        xa_i = _scaled(xd @ lora_A[i].t(), scaling[i])
        xa = torch.where(sel, xa_i, xa)
        up = torch.where(sel, xa_i @ lora_B[i].t(), up)
    y = torch.nn.functional.linear(x, weight, bias).add_(up)
    return y, xa


def multi_lora_backward(
    grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p, seed, need_grad_x
):
    """Op-level backward: ``(dx, dA, dB)``; ``dx`` is empty unless asked for."""
    dy = grad_out
    n = lora_A.shape[0]
    grad_A = torch.empty_like(lora_A)
    grad_B = torch.empty_like(lora_B)
    up = x.new_zeros(x.shape) if need_grad_x else None
    gs = []
    for i, sel in enumerate(_masks(adapter_ids, n)):
        grad_B[i] = dy.t() @ torch.where(sel, xa, 0.0)
        gs.append(torch.where(sel, _scaled(dy @ lora_B[i], scaling[i]), 0.0))
        if need_grad_x:
            up = up + gs[i] @ lora_A[i]
    # The mask drawn once for dA and dx.
    if need_grad_x:
        xd, up_d = dropout_scale_pair(x, up, dropout_p, seed)
        grad_x = dy @ weight + up_d
    else:
        xd = dropout_scale(x, dropout_p, seed)
        grad_x = x.new_empty(0)
    for i, g_i in enumerate(gs):
        grad_A[i] = g_i.t() @ xd
    return grad_x, grad_A, grad_B
