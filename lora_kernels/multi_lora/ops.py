"""Registered multi-LoRA ops (namespace ``lora_kernels``), their fake kernels, autograd and backends.

- ``multi_lora_forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed,
  backend) -> (y, xa)``
- ``multi_lora_backward(grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p,
  seed, need_grad_x, backend) -> (grad_x, grad_A, grad_B)``; ``grad_x`` is empty unless ``need_grad_x``.

Inputs are 2-D (``x (M, K)``, ``ids (M,)``) with the factors stacked: ``lora_A (n, R, K)``,
``lora_B (n, N, R)``, ``scaling (n,)``. ``order``/``seg`` are the device-side segmentation of
``adapter_ids`` (:func:`lora_kernels.multi_lora.reference.segments`), computed once per call by
:mod:`lora_kernels.multi_lora.functional` and shared by forward and backward. ``seed`` is a 0-dim
int64 tensor on the inputs' device, as in :mod:`lora_kernels.ops`.

Backends: ``reference`` (plain PyTorch, any device: the CPU path) and ``triton``. There are no CUDA
C++ multi-LoRA kernels: ``backend="auto"`` resolves as for the single-adapter layer and falls back
to ``reference`` where that would pick ``cuda``.
"""

# NOTE: no `from __future__ import annotations` in this file: torch.library.custom_op reads the
# annotations below as types, and torch 2.4's infer_schema refuses them as strings.

import functools
import importlib
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..ops import tracing
from ..backends import BackendUnavailableError

MULTI_BACKENDS = ("reference", "triton")


@functools.lru_cache(maxsize=None)
def _load(name: str):
    if name not in MULTI_BACKENDS:
        raise BackendUnavailableError(
            f"backend {name!r} has no multi-LoRA kernels; use one of {MULTI_BACKENDS} or 'auto'"
        )
    module = "reference" if name == "reference" else "triton_ops"
    try:
        return importlib.import_module(f"lora_kernels.multi_lora.{module}")
    except Exception as exc:  # noqa: BLE001  (as in lora_kernels.backends: a driverless Triton raises RuntimeError)
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {type(exc).__name__}: {exc}") from exc


@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device) -> str:
    """A concrete multi-LoRA backend for ``device`` (``"auto"`` as in :func:`lora_kernels.backends.resolve`)."""
    if name == "cuda":
        raise BackendUnavailableError(
            "backend 'cuda' has no multi-LoRA kernels (the CUDA C++ extension serves one adapter); "
            "use backend='triton', 'reference' or 'auto'"
        )
    concrete = backends.resolve(name, device)
    return "reference" if concrete == "cuda" else concrete


@torch.library.custom_op("lora_kernels::multi_lora_forward", mutates_args=())
def multi_lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    order: Tensor,
    seg: Tensor,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _load(backend).multi_lora_forward(
        x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed
    )


@multi_lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[1])


@torch.library.custom_op("lora_kernels::multi_lora_backward", mutates_args=())
def multi_lora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    xa: Tensor,
    adapter_ids: Tensor,
    order: Tensor,
    seg: Tensor,
    dropout_p: float,
    seed: Tensor,
    need_grad_x: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _load(backend).multi_lora_backward(
        grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p, seed,
        need_grad_x,
    )


@multi_lora_backward.register_fake
def _(grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p, seed, need_grad_x,
      backend):
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


def forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed, backend):
    """``multi_lora_forward``: the registered op while tracing, the launcher in eager mode
    (as :func:`lora_kernels.ops.forward`, for the same dispatch cost)."""
    args = (x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p)
    if tracing():
        return multi_lora_forward(*args, seed, backend)
    return _load(backend).multi_lora_forward(*args, seed)


def _backward_kernels(grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p, seed,
                      need_grad_x, backend):
    args = (grad_out, x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, dropout_p)
    if tracing():
        return multi_lora_backward(*args, seed, need_grad_x, backend)
    return _load(backend).multi_lora_backward(*args, seed, need_grad_x)


def setup_context(ctx, inputs, output):
    """Save ``x``, ``xa`` and the segmentation (no mask, no dropped copy of ``x``) plus the parameters."""
    x, weight, bias, lora_A, lora_B, scaling, adapter_ids, order, seg, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.has_bias = bias is not None


def backward(ctx, grad_out, grad_xa):
    """``dx, dW0, db, dA, dB`` (see :mod:`lora_kernels.multi_lora.reference`); ``grad_xa`` is ignored."""
    x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_b = grad_A = grad_B = None
    if need_x or need_a or need_bb:
        grad_x, grad_A, grad_B = _backward_kernels(
            grad_out.contiguous(), x, weight, lora_A, lora_B, scaling, xa, adapter_ids, order, seg,
            ctx.dropout_p, seed, bool(need_x), ctx.backend,
        )
        grad_x = grad_x if need_x else None
    if need_w:
        grad_w = grad_out.t() @ x
    if need_b and ctx.has_bias:
        grad_b = grad_out.sum(0)
    return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None, None, None


torch.library.register_autograd("lora_kernels::multi_lora_forward", backward, setup_context=setup_context)
