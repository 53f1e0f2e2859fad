"""The registered ops (namespace ``lora_kernels``), their fake kernels and autograd.

All schemas, ``register_fake`` and ``register_autograd`` calls live in this one
file. Each op takes the name of a concrete backend (see
:mod:`lora_kernels.backends`) and calls that backend's launcher, so one op
serves every device and torch.compile sees a single opaque node per call.

- ``lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend) -> (y, xa)``
- ``lora_backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend)
  -> (grad_x, grad_A, grad_B)``; ``grad_x`` has zero elements unless ``need_grad_x``.
- ``lora_merge_(weight, lora_A, lora_B, scaling, backend) -> ()``: ``W0 += scaling·B A`` in place
  (unmerge is the same op with ``-scaling``).

Inputs are 2-D and share one dtype; :mod:`lora_kernels.functional` flattens,
casts and validates before calling. ``seed`` is a 0-dim int64 tensor on the
inputs' device rather than an int: under torch.compile it is drawn afresh at
every call inside the graph instead of being baked into it as a constant, and
the kernels read it from device memory, so CUDA-graph replays draw new masks.
"""

# NOTE: no `from __future__ import annotations` in this file: torch.library.custom_op reads the
# annotations below as types, and torch 2.4's infer_schema refuses them as strings.

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends, reference


@torch.library.custom_op("lora_kernels::lora_forward", mutates_args=())
def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return backends.get(backend).forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lora_kernels::lora_backward", mutates_args=())
def lora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor,
    need_grad_x: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return backends.get(backend).backward(
        grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x
    )


@lora_backward.register_fake
def _(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend):
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.custom_op("lora_kernels::lora_merge_", mutates_args=("weight",))
def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, backend: str) -> None:
    backends.get(backend).merge_(weight, lora_A, lora_B, scaling)


@lora_merge_.register_fake
def _(weight, lora_A, lora_B, scaling, backend):
    return None


# The compiled dropout mask of the reference path (csrc/cpu/dropout.cpp), where the extension is built.
if reference.COMPILED_MASK:

    @torch.library.register_fake("lora_kernels::dropout_keep_mask")
    def _(rows, cols, p, seed):
        return torch.empty(rows, cols, dtype=torch.bool, device=seed.device)

    @torch.library.register_fake("lora_kernels::dropout_scale")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lora_kernels::dropout_scale_pair")
    def _(x, other, p, seed):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(other, memory_format=torch.contiguous_format))


def tracing() -> bool:
    """Whether a compiler or a tracing mode (fake tensors, make_fx, functionalization) is active."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    """``lora_forward``: the registered op while tracing, the backend's launcher in eager mode.

    NOTE: an eager call of a Python custom op costs ~10 µs of dispatch (and its autograd wrapper
    ~25 µs more): as much as a whole GEMM at a few hundred tokens. Eager mode does not need the
    opaque node, so it calls the launcher directly; the two paths run the same launcher.
    """
    if tracing():
        return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return backends.get(backend).forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _backward_kernels(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend):
    """``lora_backward``, chosen as in :func:`forward`."""
    if tracing():
        return lora_backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x, backend)
    return backends.get(backend).backward(
        grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x
    )


def setup_context(ctx, inputs, output):
    """Save ``x`` and ``xa`` (no mask, no dropped copy of ``x``) plus the weights, which are parameters."""
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.has_bias = bias is not None
    # NOTE: xa's gradient is never used; without this autograd would fill a zero tensor for it
    # (one kernel per backward). backward() then sees None for an output nobody differentiated.
    ctx.set_materialize_grads(False)


def backward(ctx, grad_out, grad_xa):
    """``dx, dW0, db, dA, dB`` from the derivation in :mod:`lora_kernels.reference`.

    ``grad_xa`` is ignored: ``xa`` is an internal output saved for backward only. Gradients are
    not materialised (:func:`setup_context`): ``grad_out`` is None when ``y`` did not reach the
    loss, and then every gradient is None (zero).
    """
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_b = grad_A = grad_B = None
    if need_x or need_a or need_bb:
        grad_x, grad_A, grad_B = _backward_kernels(
            grad_out.contiguous(), x, weight, lora_A, lora_B, xa,
            ctx.scaling, ctx.dropout_p, seed, bool(need_x), ctx.backend,
        )
        grad_x = grad_x if need_x else None
    if need_w:
        grad_w = grad_out.t() @ x
    if need_b and ctx.has_bias:
        grad_b = grad_out.sum(0)
    return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None


torch.library.register_autograd("lora_kernels::lora_forward", backward, setup_context=setup_context)
