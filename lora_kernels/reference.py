"""The specification: LoRA linear in plain PyTorch.

Everything the kernels compute is defined here, including the dropout mask bit
for bit, so that every backend can be tested against this file (in float64) and
the CPU path runs it directly.

Forward, for ``x`` of shape ``(M, K)`` (leading dimensions flattened), frozen
``W0`` ``(N, K)`` and ``b`` ``(N,)``, trainable ``A`` ``(r, K)`` and ``B``
``(N, r)``, scaling ``s`` and dropout probability ``p``::

    D  = mask / (1 - p)                  # (M, K), mask[i, j] in {0, 1}
    xa = s · (x * D) Aᵀ                  # (M, r)   saved for backward
    y  = x W0ᵀ + b + xa Bᵀ               # (M, N)

Backward, given ``dy = ∂L/∂y`` (see docs/design.md for the derivation)::

    dB  = dyᵀ xa                         # (N, r)
    g   = s · dy B                       # (M, r)   = ∂L/∂xa
    dA  = gᵀ (x * D)                     # (r, K)
    dx  = dy W0 + (g A) * D              # (M, K)
    db  = Σ_i dy[i]          dW0 = dyᵀ x # only when the frozen weights want grads

The dropout mask is counter based, so it is regenerated in backward rather than
stored. One Philox-4x32-10 call yields four 32-bit words, which serve four
neighbouring columns of a row::

    words = philox(seed, i·⌈K/4⌉ + ⌊j/4⌋)        # 4 words
    keep[i, j] = (words[j mod 4] >> 8) >= round(p · 2**24)

with key ``(seed mod 2**32, seed >> 32)`` and counter ``(c mod 2**32, c >> 32, 0, 0)``:
the same generator as Triton's ``tl.randint4x``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10


def dropout_threshold(p: float) -> int:
    """Integer threshold on the top 24 bits of a Philox word: drop iff ``bits < threshold``."""
    return int(round(p * (1 << 24)))


def _mulhilo32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    # a holds uint32 values in int64; b is a 32-bit constant. The 64-bit product
    # does not fit int64, so multiply by b's 16-bit halves.
    p0 = a * (b & 0xFFFF)
    p1 = a * (b >> 16)
    lo = (p0 + ((p1 & 0xFFFF) << 16)) & _M32
    hi = ((p0 >> 16) + p1) >> 16
    return hi, lo


def philox4x32(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four words of Philox-4x32-10 for each int64 ``counter``; uint32 values in int64 tensors."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_keep_mask(rows: int, cols: int, p: float, seed: int, device=None) -> Tensor:
    """Boolean keep-mask of shape ``(rows, cols)``, as defined in the module docstring."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    seed = int(seed)  # an int, or the ops' 0-dim seed tensor (read on the host: the reference is no fast path)
    groups = (cols + 3) // 4
    counter = torch.arange(rows * groups, device=device, dtype=torch.int64).view(rows, groups)
    words = torch.stack(philox4x32(seed, counter), dim=-1).view(rows, 4 * groups)[:, :cols]
    return (words >> 8) >= dropout_threshold(p)


def dropout_scale(x2d: Tensor, p: float, seed: int) -> Tensor:
    """``x * D``: ``x2d`` with the dropout mask applied and the survivors scaled by ``1/(1-p)``."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(x2d.shape[0], x2d.shape[1], p, seed, x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Differentiable reference ``y`` for ``x`` of shape ``(..., K)``, by plain autograd."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    xa = dropout_scale(x2, dropout_p, seed) @ lora_A.t()
    y = torch.nn.functional.linear(x2, weight, bias) + scaling * (xa @ lora_B.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Op-level forward for 2-D ``x``: returns ``(y, xa)``, ``xa = s·(x ⊙ D) Aᵀ``."""
    xa = scaling * (dropout_scale(x, dropout_p, seed) @ lora_A.t())
    y = torch.nn.functional.linear(x, weight, bias).add_(xa @ lora_B.t())
    return y, xa


def lora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Op-level backward for 2-D inputs: returns ``(dx, dA, dB)``; ``dx`` is empty unless asked for."""
    dy = grad_out
    grad_B = dy.t() @ xa
    g = scaling * (dy @ lora_B)
    grad_A = g.t() @ dropout_scale(x, dropout_p, seed)
    if need_grad_x:
        grad_x = dy @ weight + dropout_scale(g @ lora_A, dropout_p, seed)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_A, grad_B


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
    """``W0 += s·B A`` in place, accumulated in at least fp32 and rounded once."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_B.to(acc) @ lora_A.to(acc)
    weight.copy_(weight.to(acc).add_(delta, alpha=scaling))
