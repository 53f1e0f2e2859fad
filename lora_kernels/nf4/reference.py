"""The specification of the 4-bit base: bitsandbytes' NF4/FP4 storage, dequantised in plain PyTorch.

bitsandbytes (``bitsandbytes.functional.quantize_4bit``) stores a weight ``W0`` of shape
``(N, K)`` as follows, over the row-major flat index ``i = n·K + k``:

- ``packed`` (uint8, ``⌈N·K/2⌉`` bytes): byte ``i // 2`` holds the 4-bit code of element ``i``
  in its **high** nibble when ``i`` is even, in its low nibble when ``i`` is odd;
- ``code`` (fp32, 16 entries): the value of each 4-bit code (NF4's normal quantiles, or FP4);
- ``absmax`` (fp32, one per block of ``blocksize`` consecutive flat elements; the kernels take
  ``K`` a multiple of ``blocksize``, so that a block lies in one row);
- with ``compress_statistics=True`` (double quantisation) ``absmax`` itself is stored as uint8
  codes into the 256-entry ``code2`` (bnb's dynamic map), with one fp32 ``absmax2`` per block of
  ``blocksize2`` (256) codes and an fp32 ``offset`` (the mean that was subtracted)::

      absmax[b] = code2[absmax_q[b]] · absmax2[b // blocksize2] + offset     (fp32)

Then, in fp32 and rounded once to the weight's dtype (``dtype``, bnb's ``quant_state.dtype``)::

    W0[i] = round_dtype(code[q[i]] · absmax[i // blocksize])

and the layer computes with ``W0`` converted to the activation's dtype, as ``bnb.matmul_4bit``
does (``dequantize_4bit(...).to(x.dtype)``). :func:`dequantize_torch` states this in PyTorch;
:func:`dequantize` uses bitsandbytes' own function where bitsandbytes is installed, and the tests
compare the two bit for bit.

The layer is then exactly the bf16 layer of :mod:`lora_kernels.reference` on ``W0``: forward
``y = x W0ᵀ + b + xa Bᵀ`` and backward ``dx = dy W0 + (g A) ⊙ D`` (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import reference

INSTALL_HINT = "pip install 'lora_kernels[qlora]' (or: pip install bitsandbytes)"


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - an installed but broken bitsandbytes counts as missing
        return False
    return True


def require_bitsandbytes(what: str):
    """``bitsandbytes``, or an ImportError saying what to install."""
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001
        raise ImportError(f"{what} needs bitsandbytes: {INSTALL_HINT}") from exc
    return bitsandbytes


@dataclass(frozen=True)
class QuantWeight:
    """A bitsandbytes 4-bit weight as the kernels read it (no copy: bnb's own tensors).

    ``absmax2``, ``code2`` and ``offset`` are empty unless ``nested`` (double quantisation);
    ``offset`` is a 1-element fp32 tensor (bnb's 0-dim one, viewed).
    """

    packed: Tensor  # uint8, (⌈N·K/2⌉,)
    absmax: Tensor  # fp32 (blocks,), or uint8 codes into code2 when nested
    code: Tensor  # fp32 (16,)
    absmax2: Tensor  # fp32 (⌈blocks / blocksize2⌉,) (nested only)
    code2: Tensor  # fp32 (256,) (nested only)
    offset: Tensor  # fp32 (1,) (nested only)
    blocksize: int
    blocksize2: int
    shape: tuple  # (N, K)
    dtype: torch.dtype  # bnb's quant_state.dtype: the dtype W0 is dequantised to

    @property
    def nested(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The six tensors, in the order the ops take them."""
        return (self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset)

    @classmethod
    def from_quant_state(cls, packed: Tensor, quant_state) -> "QuantWeight":
        """From bnb's packed data (``Params4bit.data``) and its ``QuantState``; checked (see :func:`check`)."""
        qs = quant_state
        if qs is None:
            raise ValueError("the 4-bit weight has no quant_state: it is not quantised yet (move it to its device "
                             "first, as bitsandbytes quantises on .to(device))")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("the 4-bit weight was repacked by bitsandbytes for its CPU inference kernel "
                             "(packing_format_for_cpu): that layout is not bitsandbytes' 4-bit storage")
        if qs.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"the packed 4-bit weight must be stored as uint8 (quant_storage=torch.uint8), "
                            f"got {packed.dtype}")
        empty = qs.absmax.new_empty(0, dtype=torch.float32)
        if qs.nested:
            state2 = qs.state2
            absmax2, code2 = state2.absmax.float(), state2.code.float()
            offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device).reshape(1)
            blocksize2 = state2.blocksize
        else:
            absmax2, code2, offset, blocksize2 = empty, empty, empty, 0
        shape = tuple(int(d) for d in qs.shape)
        if len(shape) != 2:
            raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {shape}")
        self = cls(packed.reshape(-1), qs.absmax if qs.nested else qs.absmax.float(), qs.code.float().to(packed.device),
                   absmax2, code2.to(packed.device), offset, int(qs.blocksize), int(blocksize2), shape, qs.dtype)
        check(self)
        return self

    @classmethod
    def from_param(cls, weight) -> "QuantWeight":
        """From a ``bitsandbytes.nn.Params4bit`` (``Linear4bit.weight``)."""
        return cls.from_quant_state(weight.data, getattr(weight, "quant_state", None))


def check(q: QuantWeight) -> None:
    """Raise a clear error for a 4-bit weight the kernels cannot read."""
    N, K = q.shape
    if q.blocksize <= 0 or K % q.blocksize:
        # NOTE: bnb's flat blocks would then span rows, and its own CPU kernel reads such weights
        # differently from its CUDA kernel and its PyTorch fallback: no single meaning to match.
        raise ValueError(f"in_features ({K}) must be a multiple of the 4-bit blocksize ({q.blocksize}): "
                         "the kernels read one row's blocks (quantise with a blocksize that divides in_features)")
    if q.packed.numel() != (N * K + 1) // 2:
        raise ValueError(f"the packed weight has {q.packed.numel()} bytes; shape {q.shape} needs {(N * K + 1) // 2}")
    blocks = -(-N * K // q.blocksize)
    if q.absmax.numel() != blocks:
        raise ValueError(f"absmax has {q.absmax.numel()} entries; {blocks} blocks of {q.blocksize} expected")
    if q.code.numel() != 16:
        raise ValueError(f"the 4-bit code table must have 16 entries, got {q.code.numel()}")
    if q.nested and (q.code2.numel() != 256 or q.offset.numel() != 1 or q.blocksize2 <= 0
                     or q.absmax2.numel() != -(-blocks // q.blocksize2)):
        raise ValueError("the double-quantised statistics (code2, absmax2, offset) do not fit absmax")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the 4-bit weight's dtype must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in zip(("packed", "absmax", "code", "absmax2", "code2", "offset"), q.tensors):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but the packed weight is on {q.device}")


def absmax_torch(q: QuantWeight) -> Tensor:
    """The fp32 block scales: ``absmax``, or dequantised from the nested statistics."""
    if not q.nested:
        return q.absmax.float()
    scale = q.absmax2.repeat_interleave(q.blocksize2)[: q.absmax.numel()]
    return (q.code2[q.absmax.long()] * scale).add_(q.offset)


def dequantize_torch(q: QuantWeight) -> Tensor:
    """``W0`` (N, K) in ``q.dtype``, as the module docstring defines it (pure PyTorch)."""
    N, K = q.shape
    nibbles = torch.stack((q.packed >> 4, q.packed & 0xF), dim=-1).reshape(-1)[: N * K]
    values = q.code[nibbles.long()]
    scale = absmax_torch(q).repeat_interleave(q.blocksize)[: N * K]
    return (values * scale).to(q.dtype).reshape(N, K)


def dequantize(q: QuantWeight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``W0`` in ``dtype`` (default ``q.dtype``): bitsandbytes' ``dequantize_4bit`` where it is
    installed, else :func:`dequantize_torch` (bit for bit the same)."""
    if bitsandbytes_available():
        w = _dequantize_bnb(q)
    else:
        w = dequantize_torch(q)
    return w if dtype is None else w.to(dtype)


def _dequantize_bnb(q: QuantWeight) -> Tensor:
    import bitsandbytes.functional as bnbf

    quant_type = "nf4" if torch.equal(q.code.cpu(), bnbf.get_4bit_type("nf4", device="cpu")) else "fp4"
    state2 = None
    if q.nested:
        state2 = bnbf.QuantState(absmax=q.absmax2, code=q.code2, blocksize=q.blocksize2, dtype=torch.float32)
    state = bnbf.QuantState(absmax=q.absmax, shape=torch.Size(q.shape), code=q.code, blocksize=q.blocksize,
                            quant_type=quant_type, dtype=q.dtype, offset=q.offset.reshape(()) if q.nested else None,
                            state2=state2)
    return bnbf.dequantize_4bit(q.packed.reshape(-1, 1), state)


def quant_weight(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features,
                 weight_dtype) -> QuantWeight:
    """A :class:`QuantWeight` from the ops' arguments (unchecked: the functional layer checked it)."""
    return QuantWeight(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                       (out_features, in_features), weight_dtype)


# --------------------------------------------------------------------------- #
# The backend launchers (the signatures of lora_kernels.nf4.triton_ops)
# --------------------------------------------------------------------------- #


def qlora_forward(x, q: QuantWeight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, xa)`` on the dequantised ``W0`` (:func:`lora_kernels.reference.lora_forward`)."""
    return reference.lora_forward(x, dequantize(q, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)


def qlora_backward(grad_out, x, q: QuantWeight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x):
    """``(dx, dA, dB)`` on the dequantised ``W0`` (:func:`lora_kernels.reference.lora_backward`)."""
    weight = dequantize(q, x.dtype) if need_grad_x else x.new_empty(q.shape[0], 0)
    return reference.lora_backward(grad_out, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_grad_x)
