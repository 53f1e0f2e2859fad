"""Functional API: input checks, the autograd Function, ``lora_linear`` and merge/unmerge.

Every public entry point validates its inputs here, before any kernel runs or
any tensor is written, so a refused call changes nothing.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_dropout(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")


def _check_factors(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Shapes, dtypes and devices of ``W0 (N, K)``, ``A (r, K)``, ``B (N, r)``."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("LoRA rank must be positive: lora_A has 0 rows")
    if lora_A.shape[1] != in_features:
        raise ValueError(
            f"lora_A must have shape (r, in_features={in_features}), got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(
            f"lora_B must have shape (out_features={out_features}, r={r}), got {tuple(lora_B.shape)}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")


def check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Raise a clear error for anything the kernels cannot compute correctly."""
    _check_factors(weight, lora_A, lora_B)
    check_activation(x, weight, bias)
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    check_dropout(dropout_p)


def check_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """``x`` of shape ``(..., in_features)`` matching the base layer's dtype and device, and the bias."""
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have shape (..., in_features={weight.shape[1]}), got {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has dtype {weight.dtype}; they must match")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"bias ({bias.dtype}, {bias.device}) must match weight ({weight.dtype}, {weight.device})"
            )


def draw_seed(device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None) -> Tensor:
    """A dropout seed: a 0-dim int64 tensor drawn on ``device`` from PyTorch's generator.

    ``torch.manual_seed`` therefore reproduces the masks. The kernels read the seed
    from device memory, so nothing waits on the host, and under CUDA-graph capture
    each replay draws a fresh seed (PyTorch's CUDA generator is capture-aware).
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed: int, device: torch.device | str) -> Tensor:
    """An explicit dropout seed as the 0-dim int64 tensor the ops take."""
    if not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


# The seed argument when dropout is off: never read.
_NO_SEED = torch.zeros((), dtype=torch.int64)


_M64 = (1 << 64) - 1
# Host seeds lie in [2**32, 2**62): Triton types every one as int64 (a value below 2**31 would be
# int32, another compiled variant of each kernel).
_HOST_SEED_LOW, _HOST_SEED_SPAN = 1 << 32, (1 << 62) - (1 << 32)


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters neighbouring inputs."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def host_seed(generator) -> Tensor:
    """A fresh dropout seed from a CUDA generator's Philox state, read and advanced on the host as
    PyTorch's own dropout takes its seed and offset: no kernel, no copy, no sync.

    The seed is a function of the generator's seed and offset (so ``torch.manual_seed`` reproduces
    the masks, and every call gets its own), returned as a 0-dim int64 CPU tensor whose value the
    kernels receive by value. Not for use under CUDA-graph capture: a replay would reuse it.
    """
    offset = generator.get_offset()
    generator.set_offset(offset + 4)  # one Philox counter step, as a 4-value draw consumes
    value = _mix64(_mix64(generator.initial_seed() & _M64) ^ offset)
    return torch.tensor(_HOST_SEED_LOW + value % _HOST_SEED_SPAN, dtype=torch.int64)


# Whether eager calls on a GPU draw their dropout seeds on the host (host_seed). LORA_KERNELS_HOST_SEEDS=0
# draws them on the device, as compiled graphs and CUDA-graph captures do, so that eager and compiled
# runs from one torch.manual_seed share their masks (a randint kernel per forward).
HOST_SEEDS = os.environ.get("LORA_KERNELS_HOST_SEEDS", "1") != "0"


def call_seed(dropout_p: float, seed: Optional[int], device: torch.device, by_value: bool = False) -> Tensor:
    """The seed tensor a call passes to the ops: unused without dropout, else ``seed`` or a fresh draw.

    NOTE: with ``by_value`` (a backend whose kernels take a seed held on the host by value:
    ``Backend.seed_by_value``), in eager mode on a GPU the seed stays on the host: an explicit one
    with no copy to the device, a fresh one from the generator's state (host_seed) with no launch
    (a device draw is a randint kernel per forward). Traced code and CUDA-graph capture draw on
    the device, so that every run of the graph draws afresh; so do the Triton kernels, whose
    by-value variants spill registers in some configs.
    """
    if dropout_p == 0.0:
        return _NO_SEED
    if by_value and device.type == "cuda" and not ops.tracing():
        if seed is not None:
            return seed_tensor(seed, "cpu")
        if HOST_SEEDS and not torch.cuda.is_current_stream_capturing():
            index = device.index if device.index is not None else torch.cuda.current_device()
            return host_seed(torch.cuda.default_generators[index])
    return draw_seed(device) if seed is None else seed_tensor(seed, device)


# NOTE: torch.amp.is_autocast_available is asked outside the graph (its result is a constant per
# device type): Dynamo refuses the call itself on torch 2.8–2.11, which broke fullgraph compilation.
@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` exists for ``device_type`` (``torch.is_autocast_enabled`` raises otherwise)."""
    return torch.amp.is_autocast_available(device_type)


def _autocast_inputs(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under ``torch.autocast``, the inputs cast as ``F.linear`` casts them (fp64 is left alone).

    So ``x``, the frozen weights and the factors (fp32 masters included) all take
    the autocast dtype, ``y`` comes out in it, and the casts are differentiable:
    gradients flow back to each tensor in its own dtype.
    """
    device_type = tensors[0].device.type
    if not (_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        for t in tensors
    )


class LoRALinearFunction(torch.autograd.Function):
    """``(y, xa) = lora_forward(x, W0, b, A, B, ...)`` with the backward of :mod:`lora_kernels.ops`.

    A thin Function over the registered ops: forward is one ``lora_forward`` call,
    backward one ``lora_backward`` call, plus ``dW0 = dyᵀ x`` and ``db = Σ dy`` when
    the frozen weights ask for them. (In eager mode the calls go straight to the
    backend's launchers; see :func:`lora_kernels.ops.forward`.) ``x`` is ``(..., K)``
    (``y`` is ``(..., N)``, ``xa`` always 2-D), all of one dtype; use :func:`lora_linear`
    for the checked entry point.
    """

    # NOTE: the ctx-first form: the separate setup_context form binds its arguments through
    # inspect.signature on every call (~10 µs, the price of a small GEMM). x is flattened here,
    # not by the caller: outside the Function the flattening and the unflattening of y were two
    # more autograd nodes per call, as much as a small layer's GEMMs on the CPU.
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        ctx.x_shape = x.shape
        inputs = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        y, xa = ops.forward(*inputs)
        ops.setup_context(ctx, inputs, (y, xa))
        ctx.mark_non_differentiable(xa)
        if x.dim() != 2:
            # NOTE: _unsafe_view, as torch.matmul does: y is not a view for autograd, so in-place
            # ops on it (and FSDP2's hooks) treat it as the fresh tensor it is.
            y = torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
        return y, xa

    @staticmethod
    def backward(ctx, grad_out, grad_xa):
        return flat_backward(ops.backward, ctx, grad_out, grad_xa)


def flat_backward(backward, ctx, grad_out, grad_xa) -> tuple:
    """An op's ``backward`` on the 2-D view of ``grad_out``, ``dx`` returned in ``ctx.x_shape``: the
    backward of a Function whose forward flattened ``x`` (``(..., K)``) itself."""
    if grad_out is not None and grad_out.dim() != 2:
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    grads = backward(ctx, grad_out, grad_xa)
    if grads[0] is None or len(ctx.x_shape) == 2:
        return grads
    return (grads[0].view(ctx.x_shape),) + tuple(grads[1:])


# NOTE: the full checks and the backend's resolution run once per call signature (every shape,
# dtype and device the checks read, the scalars and the backend asked for); a call whose signature
# was accepted before skips them. Bounded: past _CHECKED_SIZE signatures the cache starts over.
_CHECKED: dict = {}
_CHECKED_SIZE = 1024


def _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend) -> tuple:
    return (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            lora_A.shape, lora_A.dtype, lora_A.device, lora_B.shape, lora_B.dtype, lora_B.device,
            scaling, dropout_p, backend)


def _checked_backend(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend: str) -> str:
    """:func:`check_inputs`, then the concrete backend for ``backend``; from the cache for a signature
    accepted before (never while tracing: the compiler sees the checks themselves)."""
    if ops.tracing():
        check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        return backends.resolve(backend, x.device)
    key = _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    name = _CHECKED.get(key)
    if name is None:
        check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        name = backends.resolve(backend, x.device)
        if len(_CHECKED) >= _CHECKED_SIZE:
            _CHECKED.clear()
        _CHECKED[key] = name
    return name


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
    seed: Optional[int] = None,
) -> Tensor:
    """``y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` for ``x`` of shape ``(..., in_features)``.

    ``weight``/``bias`` are the frozen base layer's (``(out, in)``, ``(out,)``),
    ``lora_A`` is ``(r, in)`` and ``lora_B`` ``(out, r)``, as PEFT stores them.
    ``lora_A``/``lora_B`` may be held in another float dtype (fp32 masters for a
    bf16 model, say): they are cast to ``x.dtype`` for the kernels and their
    gradients flow back in their own dtype. Under ``torch.autocast`` everything
    is computed in the autocast dtype, as ``F.linear`` would. ``seed`` fixes the
    dropout mask; by default it is drawn from PyTorch's generator. ``backend`` is
    ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
    """
    x, weight, bias, lora_A, lora_B = _autocast_inputs(x, weight, bias, lora_A, lora_B)
    name = _checked_backend(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    launchers = None if ops.tracing() else backends.get(name)
    seed_t = call_seed(dropout_p, seed, x.device, launchers is not None and launchers.seed_by_value)
    lora_A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
    lora_B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
    # The backend's own differentiable layer where it has one (cuda: autograd in C++); traced code keeps the ops.
    linear = None if launchers is None else launchers.linear
    if linear is not None:
        return linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed_t)
    y, _ = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed_t, name)
    return y


def _merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, backend: str) -> None:
    _check_factors(weight, lora_A, lora_B)
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    name = backends.resolve(backend, weight.device)
    with torch.no_grad():
        ops.lora_merge_(weight, lora_A, lora_B, float(scaling), name)


def merge_lora_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, backend: str = "auto") -> None:
    """``weight += scaling · lora_B @ lora_A`` in place (fp32 accumulation, one rounding)."""
    _merge(weight, lora_A, lora_B, scaling, backend)


def unmerge_lora_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, backend: str = "auto") -> None:
    """``weight -= scaling · lora_B @ lora_A`` in place; undoes :func:`merge_lora_` to within one rounding."""
    _merge(weight, lora_A, lora_B, -scaling, backend)
