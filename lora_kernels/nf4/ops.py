"""The registered ops of the 4-bit base (namespace ``lora_kernels``), their fake kernels and autograd.

- ``qlora_forward(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features,
  weight_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, backend) -> (y, xa)``
- ``qlora_backward(grad_out, x, packed, ..., weight_dtype, lora_A, lora_B, xa, scaling, dropout_p, seed,
  need_grad_x, backend) -> (grad_x, grad_A, grad_B)``; ``grad_x`` has zero elements unless ``need_grad_x``.

The six tensors and four numbers after ``x`` are a :class:`~lora_kernels.nf4.reference.QuantWeight`
(bitsandbytes' own tensors). ``W0`` is frozen and quantised: it has no gradient. Backends:
``reference`` (dequantise, then :mod:`lora_kernels.reference`) and ``triton``
(:mod:`lora_kernels.nf4.triton_ops`); the hand-written CUDA kernels have no 4-bit variant.
"""

# NOTE: no `from __future__ import annotations`: torch.library.custom_op reads these annotations as types.

import importlib
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..ops import tracing
from .reference import QuantWeight, quant_weight

BACKENDS = ("reference", "triton")


@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device) -> str:
    """``"auto"`` → Triton on CUDA where it runs, else the reference; a named backend is checked."""
    if name == "auto":
        return "triton" if device.type == "cuda" and not backends.unavailable_reason("triton", device) else "reference"
    if name not in BACKENDS:
        raise backends.BackendUnavailableError(
            f"backend {name!r} has no kernels for a 4-bit base; use 'auto', 'triton' or 'reference'")
    why = backends.unavailable_reason(name, device)
    if why:
        raise backends.BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    return name


def _launchers(backend: str):
    return importlib.import_module("lora_kernels.nf4." + ("triton_ops" if backend == "triton" else "reference"))


@torch.library.custom_op("lora_kernels::qlora_forward", mutates_args=())
def qlora_forward(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor, code2: Tensor, offset: Tensor,
    blocksize: int, blocksize2: int, out_features: int, weight_dtype: torch.dtype,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    q = quant_weight(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features,
                     x.shape[1], weight_dtype)
    return _launchers(backend).qlora_forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed)


@qlora_forward.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, weight_dtype,
      bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lora_kernels::qlora_backward", mutates_args=())
def qlora_backward(
    grad_out: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor, code2: Tensor,
    offset: Tensor, blocksize: int, blocksize2: int, out_features: int, weight_dtype: torch.dtype,
    lora_A: Tensor, lora_B: Tensor, xa: Tensor, scaling: float, dropout_p: float, seed: Tensor,
    need_grad_x: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    q = quant_weight(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features,
                     x.shape[1], weight_dtype)
    return _launchers(backend).qlora_backward(grad_out, x, q, lora_A, lora_B, xa, scaling, dropout_p, seed,
                                              need_grad_x)


@qlora_backward.register_fake
def _(grad_out, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features,
      weight_dtype, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend):
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _q_args(q: QuantWeight) -> tuple:
    return (*q.tensors, q.blocksize, q.blocksize2, q.shape[0], q.dtype)


def forward(x, q: QuantWeight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    """``qlora_forward``: the registered op while tracing, the launcher in eager mode (as
    :func:`lora_kernels.ops.forward`)."""
    if tracing():
        return qlora_forward(x, *_q_args(q), bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return _launchers(backend).qlora_forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed)


def backward_kernels(grad_out, x, q: QuantWeight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend):
    """``qlora_backward``, chosen as in :func:`forward`."""
    if tracing():
        return qlora_backward(grad_out, x, *_q_args(q), lora_A, lora_B, xa, scaling, dropout_p, seed,
                              need_grad_x, backend)
    return _launchers(backend).qlora_backward(grad_out, x, q, lora_A, lora_B, xa, scaling, dropout_p, seed,
                                              need_grad_x)


def setup_context(ctx, inputs, output):
    x = inputs[0]
    bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs[11:]
    ctx.save_for_backward(x, *inputs[1:7], lora_A, lora_B, output[1], seed)
    ctx.q_numbers = inputs[7:11]
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.has_bias = scaling, dropout_p, backend, bias is not None
    ctx.set_materialize_grads(False)


def backward(ctx, grad_out, grad_xa):
    """``dx, db, dA, dB`` (docs/design.md); the quantised ``W0`` gets none."""
    n_inputs = 18
    if grad_out is None:
        return (None,) * n_inputs
    x, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
    q = quant_weight(packed, absmax, code, absmax2, code2, offset, *ctx.q_numbers[:3], x.shape[1], ctx.q_numbers[3])
    need_x, need_b, need_a, need_bb = ctx.needs_input_grad[0], *ctx.needs_input_grad[11:14]
    grad_x = grad_b = grad_A = grad_B = None
    if need_x or need_a or need_bb:
        grad_x, grad_A, grad_B = backward_kernels(grad_out.contiguous(), x, q, lora_A, lora_B, xa, ctx.scaling,
                                                  ctx.dropout_p, seed, bool(need_x), ctx.backend)
        grad_x = grad_x if need_x else None
    if need_b and ctx.has_bias:
        grad_b = grad_out.sum(0)
    return (grad_x,) + (None,) * 10 + (grad_b, grad_A, grad_B) + (None,) * 4


torch.library.register_autograd("lora_kernels::qlora_forward", backward, setup_context=setup_context)
