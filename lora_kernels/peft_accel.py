"""``accelerate_peft``: run an existing PEFT model's LoRA layers on lora_kernels, in place.

The model stays PEFT's. For each PEFT LoRA ``Linear`` layer, three *instance*
attributes are set — ``forward``, ``merge`` and ``unmerge`` — that shadow PEFT's
class methods on that layer only (no class is patched, so other models are not
touched; where accelerate's hook wrapper is the layer's ``forward``, ours goes beneath
it, as its ``_old_forward``). Parameters, module names, ``state_dict`` keys, ``save_pretrained`` /
``from_pretrained``, ``disable_adapter()``, ``set_adapter``, ``modules_to_save``,
gradient checkpointing and ``merge_and_unload`` are PEFT's own code and keep
working. :func:`deaccelerate_peft` (or ``report.undo()``) deletes the three
attributes again.

At every call the layer's state decides (:func:`_state_reason`, :func:`_call_reason`):

- fused (:func:`lora_kernels.lora_linear`, or :func:`lora_kernels.qlora_linear` for PEFT's 4-bit
  ``lora.bnb.Linear4bit`` on bitsandbytes' ``Linear4bit``, ``x`` then in its ``compute_dtype``;
  merging such a layer is refused): one active adapter on this layer, plain
  LoRA or DoRA (:func:`lora_kernels.dora.dora_linear`: the row norms from the low-rank
  structure, never PEFT's dense ``B A``; no other variant; 16-bit bases), ``lora_bias=False``,
  ``fan_in_fan_out=False``, dropout an ``nn.Dropout`` or ``nn.Identity``, not merged,
  adapters enabled, no extra arguments, ``x`` in the base weight's dtype (or under
  autocast) and device, no hooks on the base layer or the factors other than the engines'
  that :mod:`lora_kernels.engines` recognises (ZeRO-3, FSDP1/FSDP2, accelerate's
  ``AlignDevicesHook``: the fused call then runs inside those modules' calls). Several
  active plain adapters without dropout in training (16-bit bases): one fused call of their
  stacked rank (``[A₁; A₂]``, ``[s₁B₁ | s₂B₂]``). ``adapter_names=`` (PEFT's mixed batch, eval,
  16-bit bases): one call of the segmented multi-adapter kernels (:func:`lora_kernels.multi_lora_linear`).
  The scaling is PEFT's stored ``layer.scaling[adapter]`` (so rsLoRA,
  ``alpha_pattern`` and ``set_scale`` are honoured); a base bias (trainable with
  ``bias="all"``/``"lora_only"``) gets its gradient.
- otherwise PEFT's own ``forward``: the very same results as without
  ``accelerate_peft``.

Merge and unmerge run ``merge_lora_``/``unmerge_lora_`` (one pass over the weight,
fp32 product, one rounding) for adapters the fused path supports, PEFT's code for
the others, and keep PEFT's bookkeeping (``merged_adapters``, ``safe_merge``).

Dropout: with ``p > 0`` in training, the fused path draws its mask from
lora_kernels' counter-based generator, seeded from PyTorch's generator (so
``torch.manual_seed`` reproduces it), not from ``nn.Dropout``: the masks differ
from PEFT's, with the same distribution (keep probability ``1 - p``, kept values
scaled by ``1/(1 - p)``).
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, engines
from .dora import WeightNorms, dora_linear
from .functional import _autocast_available, lora_linear, merge_lora_, unmerge_lora_
from .nf4 import peft_accel as nf4

__all__ = ["AccelerationReport", "accelerate_peft", "deaccelerate_peft"]

# The instance attribute that marks an accelerated layer and holds its settings.
_STATE = "_lora_kernels_accel"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - exercised only without peft
        raise ImportError("accelerate_peft needs the 'peft' package: pip install peft") from exc
    return lora_layer


@dataclass
class _Settings:
    backend: str
    # DoRA: ‖W0ᵢ‖ of the base weight, recomputed when the weight changes (cleared by merge and unmerge,
    # which write through .data)
    weight_norms: WeightNorms = field(default_factory=WeightNorms)


# --------------------------------------------------------------------------- #
# Why a layer (or one call) cannot take the fused path
# --------------------------------------------------------------------------- #


def _static_reason(layer: nn.Module, lora_layer, backend: str = "auto") -> Optional[str]:
    """Why this PEFT layer is never accelerated (its class or base layer), or None."""
    if nf4.is_peft_linear4bit(layer):
        return nf4.static_reason(layer, backend)
    if type(layer) is not lora_layer.Linear:
        return (f"{type(layer).__name__} is not PEFT's LoRA Linear or 4-bit Linear4bit (Embedding, Conv, 8-bit and "
                "other LoRA layer classes keep PEFT's forward)")
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear"
    return None


def _hooked_modules(layer: nn.Module, adapters) -> list[nn.Module]:
    """The modules owning the parameters a fused call reads that carry (recognised) engine hooks: the
    fused call runs inside their calls (:func:`engines.call_inside`), outermost first."""
    owners = [m for a in adapters for m in (layer.lora_A[a], layer.lora_B[a])] + [layer.base_layer]
    return [m for m in owners if engines.hooked(m)]


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return variant is not None and type(variant).__name__ == "DoraLinearVariant"


def _adapter_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why adapter ``adapter`` of ``layer`` cannot be fused (forward or merge), or None."""
    if adapter in layer.lora_variant and not _is_dora(layer, adapter):
        return f"adapter {adapter!r} is a LoRA variant ({type(layer.lora_variant[adapter]).__name__})"
    if _is_dora(layer, adapter) and nf4.is_peft_linear4bit(layer):
        return f"adapter {adapter!r} is DoRA on a 4-bit base (the 4-bit kernels have no DoRA)"
    if _is_dora(layer, adapter):
        mag = layer.lora_magnitude_vector[adapter].weight
        W = layer.base_layer.weight
        rows = engines.full_shape(W)[0]
        if mag.device != W.device or mag.dtype not in _FLOATS or engines.full_shape(mag) != (rows,):
            return (f"DoRA magnitude of adapter {adapter!r}: {tuple(mag.shape)} {mag.dtype} on {mag.device} "
                    f"(needs ({rows},), a float dtype, the weight's device)")
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out=True"
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    W = layer.base_layer.weight
    w_dtype = nf4.weight_dtype(layer) if nf4.is_peft_linear4bit(layer) else W.dtype
    if A.dtype != B.dtype or A.dtype not in _FLOATS or w_dtype not in _FLOATS:
        return f"dtypes weight={w_dtype}, lora_A={A.dtype}, lora_B={B.dtype} (float factors of one dtype needed)"
    devices = [engines.execution_device(m, m.weight) for m in (layer.base_layer, layer.lora_A[adapter],
                                                                 layer.lora_B[adapter])]
    if len(set(devices)) > 1:
        return f"devices weight={devices[0]}, lora_A={devices[1]}, lora_B={devices[2]} differ"
    scaling = layer.scaling[adapter]
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        return f"scaling {scaling!r} of adapter {adapter!r} is not a finite number"
    return None


def _dropout_p(dropout: nn.Module) -> float:
    """The dropout probability a call applies now (0 for nn.Identity or in eval mode)."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _state_reason(layer: nn.Module) -> tuple[Optional[str], Optional[tuple[str, ...]]]:
    """``(reason, None)`` when the layer's current state needs PEFT's forward, else ``(None, adapters)``:
    the active adapters the fused call computes (one, or several summed as one stacked rank)."""
    if layer.disable_adapters:
        return "adapters disabled (base layer only, PEFT's forward)", None
    if layer.merged:
        return f"adapters {layer.merged_adapters} merged into the base weight (base layer only)", None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return "no active adapter on this layer", None
    for adapter in active:
        why = _adapter_reason(layer, adapter)
        if why:
            return why, None
        dropout = layer.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"dropout module is {type(dropout).__name__}, not nn.Dropout or nn.Identity", None
        owners = (("base_layer", layer.base_layer), ("lora_A", layer.lora_A[adapter]),
                  ("lora_B", layer.lora_B[adapter]), ("lora_dropout", dropout))
        unknown = {n: engines.unrecognised(m) for n, m in owners}
        unknown = {n: hooks for n, hooks in unknown.items() if hooks}
        if unknown:
            return f"hooks the fused path does not run under: {unknown}", None
        if any(engines.hooked(m) for _, m in owners) and (_is_dora(layer, adapter) or nf4.is_peft_linear4bit(layer)):
            return "engine hooks (ZeRO-3, accelerate) on a DoRA or 4-bit layer (fused only for plain LoRA)", None
    if len(active) > 1:
        if nf4.is_peft_linear4bit(layer):
            return f"{len(active)} active adapters {active} on a 4-bit base (the 4-bit kernels take one)", None
        if any(_is_dora(layer, a) for a in active):
            return f"{len(active)} active adapters {active}, DoRA among them (summed by PEFT's forward)", None
        if any(_dropout_p(layer.lora_dropout[a]) > 0 for a in active):
            return (f"{len(active)} active adapters {active} with dropout in training (PEFT draws a mask per "
                    "adapter; the stacked fused call would share one)"), None
        A = [layer.lora_A[a].weight for a in active]
        if len({t.dtype for t in A}) > 1:
            return f"{len(active)} active adapters {active} of different dtypes", None
    return None, tuple(active)


def _mixed_reason(layer: nn.Module, x, names) -> Optional[str]:
    """Why an ``adapter_names=`` call (PEFT's mixed batch) needs PEFT's forward, or None."""
    if layer.disable_adapters or layer.merged:
        return "adapter_names= on a layer with adapters disabled or merged (PEFT's forward decides)"
    if nf4.is_peft_linear4bit(layer):
        return "adapter_names= on a 4-bit base (the multi-adapter kernels take a 16-bit weight)"
    if any(engines.hooked(m) for m in list(layer.modules())[1:]):
        return "adapter_names= under engine hooks (ZeRO-3, accelerate)"
    if not isinstance(names, (list, tuple)) or not isinstance(x, Tensor) or x.dim() < 2 or len(names) != len(x):
        return "adapter_names= that does not name one adapter per input row (PEFT's forward reports it)"
    used = [a for a in dict.fromkeys(names) if a in layer.lora_A]
    for adapter in used:
        why = _adapter_reason(layer, adapter) or ("DoRA" if _is_dora(layer, adapter) else None)
        if why:
            return f"adapter_names= with adapter {adapter!r}: {why}"
        dropout = layer.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity) or _dropout_p(dropout) > 0:
            return f"adapter_names= with dropout active on adapter {adapter!r} (training)"
    if len({layer.lora_A[a].weight.dtype for a in used}) > 1:
        return "adapter_names= over adapters of different dtypes"
    return None


def _mixed_forward(layer: nn.Module, x: Tensor, names) -> Tensor:
    """PEFT's mixed batch (``adapter_names=``; ``"__base__"`` rows and adapters absent from this layer
    get the base layer only) as one call of the segmented multi-adapter kernels."""
    from .multi_lora import multi_lora_linear

    used = [a for a in dict.fromkeys(names) if a in layer.lora_A]
    index = {a: i for i, a in enumerate(used)}
    base = layer.base_layer
    ids = torch.tensor([index.get(a, -1) for a in names], dtype=torch.int64, device=x.device)
    if not used:
        return base(x)
    r = max(layer.lora_A[a].weight.shape[0] for a in used)
    ref = layer.lora_A[used[0]].weight
    A = ref.new_zeros(len(used), r, ref.shape[1])
    B = ref.new_zeros(len(used), base.weight.shape[0], r)
    for i, a in enumerate(used):  # adapters of smaller rank zero-padded to the largest
        a_w, b_w = layer.lora_A[a].weight, layer.lora_B[a].weight
        A[i, : a_w.shape[0]] = a_w
        B[i, :, : b_w.shape[1]] = b_w
    backend = getattr(layer, _STATE).backend
    # NOTE: the multi-adapter kernels have Triton and reference backends; "cuda" asks for the former.
    return multi_lora_linear(x, base.weight, base.bias, A, B, [float(layer.scaling[a]) for a in used], ids,
                             backend="auto" if backend == "cuda" else backend, check_ids=False)


def _call_reason(layer: nn.Module, x, args: tuple, kwargs: dict) -> Optional[str]:
    """Why this particular call needs PEFT's forward (its arguments), or None."""
    if kwargs.get("adapter_names") is not None:
        why = _mixed_reason(layer, x, kwargs["adapter_names"])
        if why:
            return why
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra forward arguments"
    if not isinstance(x, Tensor):
        return f"input is {type(x).__name__}, not a Tensor"
    W = layer.base_layer.weight
    quantised = nf4.is_peft_linear4bit(layer)
    device = engines.execution_device(layer.base_layer, W)
    if x.device != device:
        return f"input on {x.device}, weight on {device}"
    if quantised:
        why = nf4.call_reason(layer, x)
        if why:
            return why
    elif x.dtype != W.dtype and not (_autocast_available(x.device.type)
                                      and torch.is_autocast_enabled(x.device.type)):
        return f"input dtype {x.dtype} differs from the weight's {W.dtype} (outside autocast)"
    in_features = nf4.in_features(layer) if quantised else engines.full_shape(W)[1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        return f"input shape {tuple(x.shape)} does not fit in_features={in_features}"
    return None


# --------------------------------------------------------------------------- #
# The per-instance forward, merge and unmerge
# --------------------------------------------------------------------------- #


def _forward(layer: nn.Module, x, *args, **kwargs):
    names = kwargs.get("adapter_names")
    if names is not None and _call_reason(layer, x, args, kwargs) is None:
        return _mixed_forward(layer, x, names)
    adapters = None
    if names is None and _call_reason(layer, x, args, kwargs) is None:
        adapters = _state_reason(layer)[1]
    if adapters is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    hooked = _hooked_modules(layer, adapters)
    if hooked:
        # NOTE: ZeRO-3 / accelerate gather or move the parameters in their modules' calls: the weights
        # are read inside those calls (engines.py), never here.
        return engines.call_inside(hooked, functools.partial(_fused, layer, adapters), x)
    return _fused(layer, adapters, x)


def _fused(layer: nn.Module, adapters: tuple[str, ...], x: Tensor) -> Tensor:
    """The fused call for the active ``adapters``, reading the parameters now."""
    base, settings = layer.base_layer, getattr(layer, _STATE)
    if len(adapters) > 1:
        # Σₐ sₐ·(x Aₐᵀ) Bₐᵀ = (x [A₁; A₂; …]ᵀ) [s₁B₁ | s₂B₂ | …]ᵀ: one fused call of the summed rank (the
        # stacking is differentiable, so each adapter gets its own gradients); no dropout here.
        A = torch.cat([layer.lora_A[a].weight for a in adapters])
        B = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in adapters], dim=1)
        return lora_linear(x, base.weight, base.bias, A, B, 1.0, dropout_p=0.0, backend=settings.backend)
    (adapter,) = adapters
    p = _dropout_p(layer.lora_dropout[adapter])
    if nf4.is_peft_linear4bit(layer):
        return nf4.forward(layer, adapter, x, p, settings.backend)
    A, B, s = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
    if _is_dora(layer, adapter):
        # NOTE: PEFT's DoRA draws its dropout with nn.Dropout (torch's generator): so does dora_linear.
        return dora_linear(x, base.weight, base.bias, A, B, s, layer.lora_magnitude_vector[adapter].weight,
                           dropout_p=p, backend=settings.backend,
                           weight_norm=settings.weight_norms(base.weight, A.dtype))
    return lora_linear(x, base.weight, base.bias, A, B, s, dropout_p=p, backend=settings.backend)


def _merge_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    why = _adapter_reason(layer, adapter)
    if why is None and _is_dora(layer, adapter):
        why = "DoRA adapter (PEFT's merge: it keeps the row norms that its unmerge needs)"
    if why is None and any(_is_dtensor(t) for t in (layer.base_layer.weight, layer.lora_A[adapter].weight)):
        why = "sharded (DTensor) parameters"
    if why is None and hasattr(layer.base_layer.weight, "ds_id"):
        why = "ZeRO-3 partitioned parameters"
    return why


def _merge(layer: nn.Module, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    """PEFT's ``Linear.merge``, with the weight update done by :func:`merge_lora_` where it applies."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    if nf4.is_peft_linear4bit(layer):
        raise RuntimeError(nf4.MERGE_REFUSED)
    backend = getattr(layer, _STATE).backend
    getattr(layer, _STATE).weight_norms.clear()
    for adapter in check_adapters_to_merge(layer, adapter_names):
        if adapter not in layer.lora_A:
            continue
        if _merge_reason(layer, adapter):
            type(layer).merge(layer, safe_merge=safe_merge, adapter_names=[adapter])
            continue
        weight = layer.base_layer.weight
        A, B, s = layer.lora_A[adapter].weight.data, layer.lora_B[adapter].weight.data, layer.scaling[adapter]
        if safe_merge:  # as PEFT: merge into a copy, check it, then swap it in
            merged = weight.data.clone()
            merge_lora_(merged, A, B, s, backend)
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.data = merged
        else:
            merge_lora_(weight.data, A, B, s, backend)
        layer.merged_adapters.append(adapter)


def _unmerge(layer: nn.Module) -> None:
    """PEFT's ``Linear.unmerge``, with :func:`unmerge_lora_` for the adapters :func:`_merge` supports."""
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    if nf4.is_peft_linear4bit(layer):
        raise RuntimeError(nf4.MERGE_REFUSED)
    backend = getattr(layer, _STATE).backend
    getattr(layer, _STATE).weight_norms.clear()
    while layer.merged_adapters:
        adapter = layer.merged_adapters.pop()
        if adapter not in layer.lora_A:
            continue
        if _merge_reason(layer, adapter):
            # PEFT's unmerge pops every merged adapter: hand it this one alone.
            rest, layer.merged_adapters = layer.merged_adapters, [adapter]
            try:
                type(layer).unmerge(layer)
            finally:
                layer.merged_adapters = rest
            continue
        unmerge_lora_(layer.base_layer.weight.data, layer.lora_A[adapter].weight.data,
                      layer.lora_B[adapter].weight.data, layer.scaling[adapter], backend)


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


@dataclass
class AccelerationReport:
    """What :func:`accelerate_peft` did.

    ``accelerated``: the layers whose forward and merge now go through lora_kernels
    whenever their state allows; ``skipped``: PEFT LoRA layers left untouched, with
    the reason (their class or base layer). Whether an accelerated layer runs fused
    also depends on its state (merged, disabled, several active adapters, DoRA...):
    :meth:`current` says, per layer, what a call would do now.
    """

    model: nn.Module = field(repr=False)
    backend: str
    accelerated: list[str]
    skipped: dict[str, str]

    def current(self) -> dict[str, str]:
        """``{layer: "fused" or the reason PEFT's forward runs}`` for the layers' state now.

        Reasons that depend on a call's arguments (``adapter_names=``, the input's
        dtype or device) are not known without the call and are not listed.
        """
        out = {}
        for name, layer in self.model.named_modules():
            if name in self.skipped:
                out[name] = f"not accelerated: {self.skipped[name]}"
            elif hasattr(layer, _STATE):
                out[name] = _state_reason(layer)[0] or "fused"
        return out

    def undo(self) -> nn.Module:
        """Restore PEFT's forward, merge and unmerge on every layer (:func:`deaccelerate_peft`)."""
        return deaccelerate_peft(self.model)

    def __str__(self) -> str:
        lines = [f"accelerate_peft(backend={self.backend!r}): {len(self.accelerated)} layer(s) accelerated, "
                 f"{len(self.skipped)} left to PEFT"]
        lines += [f"  PEFT: {n}: {why}" for n, why in self.skipped.items()]
        now = [(n, why) for n, why in self.current().items() if n not in self.skipped and why != "fused"]
        lines += [f"  PEFT's forward now: {n}: {why}" for n, why in now]
        return "\n".join(lines)


def accelerate_peft(model: nn.Module, backend: str = "auto") -> AccelerationReport:
    """Make the PEFT LoRA ``Linear`` layers of ``model`` run on lora_kernels; the model stays PEFT's.

    ``backend`` is ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` as in
    :func:`lora_kernels.lora_linear`. Calling it again on an accelerated model
    changes the backend. Raises ``ValueError`` if the model has no PEFT LoRA layer
    and :class:`~lora_kernels.BackendUnavailableError` if a forced backend cannot
    run on the layers' device, having modified nothing. Returns an
    :class:`AccelerationReport`; ``report.undo()`` restores PEFT's forward.
    """
    lora_layer = _peft_lora()
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {backends.BACKENDS}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]
    if not layers:
        raise ValueError("accelerate_peft found no PEFT LoRA layer in the model")
    chosen, skipped = [], {}
    for name, layer in layers:
        why = _static_reason(layer, lora_layer, backend)
        if why:
            skipped[name] = why
        else:
            chosen.append((name, layer))
    if backend != "auto":
        for device in sorted({layer.base_layer.weight.device for _, layer in chosen}, key=str):
            why = backends.unavailable_reason(backend, device)
            if why:
                raise backends.BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    for _, layer in chosen:
        # NOTE: plain instance attributes; functools.partial (not a bound method) so that
        # deepcopy and pickling of the model carry them over to the copy's own layer.
        object.__setattr__(layer, _STATE, _Settings(backend))
        # NOTE: where accelerate's hook wrapper is the layer's forward (dispatch_model hooks every module
        # with its own tensors, and the PEFT layer too), ours goes beneath it, where its own forward was.
        setattr(layer, "_old_forward" if engines.accelerate_hooked(layer) else "forward",
                functools.partial(_forward, layer))
        layer.merge = functools.partial(_merge, layer)
        layer.unmerge = functools.partial(_unmerge, layer)
    return AccelerationReport(model, backend, [n for n, _ in chosen], skipped)


def _is_ours(fn) -> bool:
    return isinstance(fn, functools.partial) and fn.func is _forward


def deaccelerate_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_peft`: every layer runs PEFT's own forward, merge and unmerge again.

    Merged adapters stay merged (PEFT's unmerge undoes them as well). Returns ``model``.
    """
    for module in model.modules():
        if hasattr(module, _STATE):
            for attr in ("merge", "unmerge"):
                module.__dict__.pop(attr, None)
            if _is_ours(module.__dict__.get("forward")):
                del module.__dict__["forward"]
            if _is_ours(module.__dict__.get("_old_forward")):  # beneath accelerate's hook: its own forward back
                module._old_forward = types.MethodType(type(module).forward, module)
            object.__delattr__(module, _STATE)
    return model
