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


# NOTE: on the CPU the counters go through the rounds in chunks whose working tensors stay in
# the caches (a mask is ~100 elementwise passes); a chunk is also below PyTorch's grain for
# splitting an elementwise op across threads, which on a loaded machine only adds contention.
_PHILOX_CHUNK = 1 << 14


def _philox_rounds(c0: Tensor, c1: Tensor, k0: int, k1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of counters ``(c0, c1, 0, 0)`` under key ``(k0, k1)``; uint32 values in int64 tensors.

    A 32×32-bit product is computed as one int64 multiply, which wraps modulo 2**64 (as
    PyTorch's integer multiply does on the CPU and on CUDA; the mask tests compare the two bit
    for bit): with both factors below 2**32 the wrapped product holds the true product's bits,
    so ``lo`` is its low word and ``hi = (p >> 32) & (2**32 - 1)`` its high word. Only the words
    multiplied in the next round (c0, c2) must be exact 32-bit values; c1 and c3 carry the high
    bits along and are masked once, at the end.
    """
    # Round 1, for the counter's zero high words: mulhilo(0, B) = (0, 0).
    p_a = c0 * _PHILOX_ROUND_A
    c0, c2, c3 = c1.bitwise_xor(k0), (p_a >> 32).bitwise_xor_(k1).bitwise_and_(_M32), p_a
    c1 = None  # lo(0 · B) = 0
    for _ in range(PHILOX_ROUNDS - 1):
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
        p_b = c2 * _PHILOX_ROUND_B
        p_a = c0 * _PHILOX_ROUND_A
        hi_b = p_b >> 32
        if c1 is not None:
            hi_b.bitwise_xor_(c1)
        c0 = hi_b.bitwise_xor_(k0).bitwise_and_(_M32)
        c2 = (p_a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_M32)
        c1, c3 = p_b, p_a
    return c0, c1.bitwise_and_(_M32), c2, c3.bitwise_and_(_M32)


def philox4x32(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four words of Philox-4x32-10 for each int64 ``counter``; uint32 values in int64 tensors."""
    seed = int(seed)
    return _philox_rounds(counter & _M32, (counter >> 32) & _M32, seed & _M32, (seed >> 32) & _M32)


def _compiled_mask_available() -> bool:
    """Whether the extension provides ``torch.ops.lora_kernels.dropout_keep_mask`` (csrc/cpu/dropout.cpp)."""
    try:
        import lora_kernels._C  # noqa: F401
    except (ImportError, OSError):  # not built (a CPU-only install), or built for another torch
        return False
    return hasattr(torch.ops.lora_kernels, "dropout_keep_mask")


# Whether dropout_keep_mask computes CPU masks with the compiled kernel (one C++ loop over the
# counters) instead of the PyTorch integer ops of keep_mask_torch; the two agree bit for bit
# (python_tests/test_cpu_mask.py flips this switch to test both).
COMPILED_MASK = _compiled_mask_available()


def dropout_keep_mask(rows: int, cols: int, p: float, seed: int, device=None) -> Tensor:
    """Boolean keep-mask of shape ``(rows, cols)``, as defined in the module docstring.

    ``seed``: an int or a 0-dim int64 tensor (the ops' seed). On the CPU this is the compiled
    kernel where the extension is built (:data:`COMPILED_MASK`), else :func:`keep_mask_torch`.
    """
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if COMPILED_MASK and device.type == "cpu":
        return torch.ops.lora_kernels.dropout_keep_mask(rows, cols, p, _cpu_seed(seed))
    return keep_mask_torch(rows, cols, p, seed, device)


def _cpu_seed(seed) -> Tensor:
    """``seed`` as the compiled ops take it: a 0-dim int64 CPU tensor."""
    if isinstance(seed, Tensor):
        return seed.to("cpu", torch.int64)
    # The key is the seed's low 64 bits, as an int64 (two's complement) for the tensor.
    return torch.tensor((int(seed) + 2**63) % 2**64 - 2**63, dtype=torch.int64)


def keep_mask_torch(rows: int, cols: int, p: float, seed: int, device=None) -> Tensor:
    """:func:`dropout_keep_mask` with PyTorch integer ops, on any device (a view of a ``(rows, 4⌈cols/4⌉)`` mask)."""
    seed = int(seed)  # an int, or the ops' 0-dim seed tensor (read on the host: the reference is no fast path)
    groups = (cols + 3) // 4
    # (words[j] >> 8) >= t  <=>  words[j] >= t << 8, for 32-bit words.
    threshold = dropout_threshold(p) << 8
    keep = torch.empty(rows * groups, 4, dtype=torch.bool, device=device)
    chunk = _PHILOX_CHUNK if keep.device.type == "cpu" else rows * groups
    for start in range(0, rows * groups, max(chunk, 1)):
        counter = torch.arange(start, min(start + chunk, rows * groups), device=device, dtype=torch.int64)
        for j, word in enumerate(philox4x32(seed, counter)):
            torch.ge(word, threshold, out=keep[start:start + counter.numel(), j])
    return keep.view(rows, 4 * groups)[:, :cols]


def dropout_scale(x2d: Tensor, p: float, seed: int, keep: Optional[Tensor] = None) -> Tensor:
    """``x * D``: ``x2d`` with the dropout mask applied and the survivors scaled by ``1/(1-p)``.

    ``keep`` is the mask of :func:`dropout_keep_mask` for this shape and seed, when the caller
    already has it (backward applies the one mask twice).
    """
    if p == 0.0:
        return x2d
    if keep is None and COMPILED_MASK and x2d.device.type == "cpu" and not (x2d.requires_grad and torch.is_grad_enabled()):
        # One pass, the mask never stored (csrc/cpu/dropout.cpp). NOTE: the op has no autograd formula
        # (a Python one costs more than the op at small shapes): a differentiable call takes the path below.
        return torch.ops.lora_kernels.dropout_scale(x2d, p, _cpu_seed(seed))
    if keep is None:
        keep = dropout_keep_mask(x2d.shape[0], x2d.shape[1], p, seed, x2d.device)
    return x2d.mul(keep).mul_(1.0 / (1.0 - p))


def dropout_scale_pair(a: Tensor, b: Tensor, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(a ⊙ D, b ⊙ D)`` for ``a`` and ``b`` of one shape: :func:`dropout_scale` of each, the mask drawn
    once (backward's ``x`` and ``g A``). ``b`` may be overwritten."""
    if p == 0.0:
        return a, b
    if COMPILED_MASK and a.device.type == "cpu" and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.ops.lora_kernels.dropout_scale_pair(a, b, p, _cpu_seed(seed))
    keep = dropout_keep_mask(a.shape[0], a.shape[1], p, seed, a.device)
    return dropout_scale(a, p, seed, keep), dropout_scale(b, p, seed, keep)


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


# The seed is read on the host (keep_mask_torch): one held there costs no copy and no sync.
SEED_BY_VALUE = True


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
    xa = torch.mm(dropout_scale(x, dropout_p, seed), lora_A.t()).mul_(scaling)
    y = torch.nn.functional.linear(x, weight, bias).addmm_(xa, lora_B.t())
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
    grad_B = torch.mm(dy.t(), xa)
    g = torch.mm(dy, lora_B).mul_(scaling)
    if need_grad_x:
        x_d, ga_d = dropout_scale_pair(x, torch.mm(g, lora_A), dropout_p, seed)
        grad_x = ga_d.addmm_(dy, weight)
    else:
        x_d = dropout_scale(x, dropout_p, seed)
        grad_x = x.new_empty(0)
    grad_A = torch.mm(g.t(), x_d)
    return grad_x, grad_A, grad_B


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
    """``W0 += s·B A`` in place, accumulated in at least fp32 and rounded once."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_B.to(acc) @ lora_A.to(acc)
    weight.copy_(weight.to(acc).add_(delta, alpha=scaling))
