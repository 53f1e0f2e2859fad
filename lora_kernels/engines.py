"""The hooks of distributed and offloading engines that the fused PEFT path runs under.

DeepSpeed ZeRO-3, FSDP1/FSDP2 units and accelerate's device maps do their work in module calls: ZeRO-3's
forward pre-hook all-gathers a module's own parameters and its forward hook releases them,
wrapping the output (and the input) in autograd functions that re-gather them before that
module's backward and release them after; accelerate's ``AlignDevicesHook`` replaces
``forward`` on the instance with a wrapper that moves the inputs and (offloaded) weights to the
execution device and back. The fused path reads ``W0``, ``A`` and ``B`` in one call, so it must
be computed *inside* the module calls of the layers that own them: :func:`call_inside` calls
each hooked module as ``module(x)`` (torch's ``_call_impl``: every hook fires as it would for
PEFT's forward), with the innermost module's forward set, for that call only, to the fused
computation. Each module is called once per forward, as in PEFT's forward: no extra gather.

Only the hooks verified here are recognised (:func:`unrecognised`); any other keeps PEFT's
forward, and the report names it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

# NOTE: recognised by where they are defined, not by name alone: a hook from elsewhere that
# happens to share a name keeps PEFT's forward.
_DEEPSPEED_HOOKS = ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload._register_deepspeed_module.")
_FSDP2_HOOKS = ("torch.distributed.fsdp._fully_shard._fsdp_state", ("FSDPState._pre_forward", "FSDPState._post_forward"))
_ACCELERATE_FORWARD = ("accelerate.hooks", "add_hook_to_module.<locals>.new_forward")
_MISSING = object()


def _fn(hook) -> Callable:
    """The function behind ``hook``: partials, bound methods and DeepSpeed's NVTX wrapper unwrapped."""
    while True:
        if isinstance(hook, functools.partial):
            hook = hook.func
        elif hasattr(hook, "__func__"):
            hook = hook.__func__
        elif (getattr(hook, "__module__", "") == "deepspeed.utils.nvtx"
              and getattr(hook, "__code__", None) is not None and "func" in hook.__code__.co_freevars):
            hook = hook.__closure__[hook.__code__.co_freevars.index("func")].cell_contents
        else:
            return hook


def _is_engine_hook(hook) -> bool:
    """ZeRO-3's module hooks, or FSDP2's on a module sharded on its own (``fully_shard(module)``)."""
    fn = _fn(hook)
    module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
    return ((module == _DEEPSPEED_HOOKS[0] and qualname.startswith(_DEEPSPEED_HOOKS[1]))
            or (module == _FSDP2_HOOKS[0] and qualname in _FSDP2_HOOKS[1]))


def _accelerate_hooks(hook) -> Optional[list]:
    """The device-alignment hooks inside accelerate's ``module._hf_hook``, or None if any is another kind."""
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # pragma: no cover - a forward of accelerate's without accelerate cannot exist
        return None
    hooks = list(hook.hooks) if type(hook) is SequentialHook else [hook]
    return hooks if all(type(h) is AlignDevicesHook for h in hooks) else None


def accelerate_hooked(module: nn.Module) -> bool:
    """True when ``module.forward`` is accelerate's hook wrapper (``add_hook_to_module``)."""
    fwd = module.__dict__.get("forward")
    fn = _fn(fwd) if fwd is not None else None
    return (fn is not None and getattr(fn, "__module__", "") == _ACCELERATE_FORWARD[0]
            and getattr(fn, "__qualname__", "") == _ACCELERATE_FORWARD[1] and "_old_forward" in module.__dict__)


def unrecognised(module: nn.Module) -> list[str]:
    """The hooks on ``module`` the fused path does not run under (empty: none, or only recognised ones)."""
    if _fsdp1(module):  # the unit's own work is in its class's forward; what it wraps is judged as well
        return unrecognised(module._fsdp_wrapped_module)
    out = []
    for kind, hooks in (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks)):
        out += [f"{kind} {getattr(_fn(h), '__qualname__', repr(h))}" for h in hooks.values()
                if not _is_engine_hook(h)]
    if module._backward_hooks or module._backward_pre_hooks:
        out.append("backward hooks")
    if "forward" in module.__dict__:
        if not accelerate_hooked(module):
            out.append(f"replaced forward {getattr(_fn(module.forward), '__qualname__', repr(module.forward))}")
        elif _accelerate_hooks(module._hf_hook) is None:
            out.append(f"accelerate hook {type(module._hf_hook).__name__} (only AlignDevicesHook is recognised)")
    return out


def _fsdp1(module: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return type(module) is FullyShardedDataParallel


def hooked(module: nn.Module) -> bool:
    """True when ``module`` has a (recognised) hook that a fused call must run under, or is an FSDP1
    unit (its forward unshards the flat parameter, registers the backward's unshard and reduction)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__) or _fsdp1(module)


def execution_device(module: nn.Module, param: Tensor) -> torch.device:
    """The device ``param`` is on when ``module``'s forward runs: accelerate's execution device for a
    hooked module (an offloaded weight sits on ``meta`` in between), else the parameter's own."""
    if accelerate_hooked(module):
        for hook in _accelerate_hooks(module._hf_hook) or []:
            if hook.execution_device is not None:
                return torch.device(hook.execution_device) if not isinstance(hook.execution_device, int) \
                    else torch.device("cuda", hook.execution_device)
    return param.device


def full_shape(param: Tensor) -> torch.Size:
    """The parameter's shape as its module's forward sees it (ZeRO-3 partitions it to an empty tensor in between)."""
    shape = getattr(param, "ds_shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def call_inside(modules: list[nn.Module], fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` computed inside the calls of ``modules`` (outermost first): each is called as
    ``module(x)``, so that its hooks gather, move and release its parameters (and, for ZeRO-3, do
    so again around its backward), with its forward set for this call to the next one inward."""
    if not modules:
        return fn(x)
    module, rest = modules[0], modules[1:]
    # The forward the hooks run around: an FSDP1 unit calls the module it wraps (whose own hooks, if
    # any, are judged like any module's), accelerate's wrapper calls ``_old_forward``.
    target = module._fsdp_wrapped_module if _fsdp1(module) else module
    attr = "_old_forward" if accelerate_hooked(target) else "forward"
    saved = target.__dict__.get(attr, _MISSING)
    target.__dict__[attr] = lambda inner: call_inside(rest, fn, inner)
    try:
        return module(x)
    finally:
        if saved is _MISSING:
            del target.__dict__[attr]
        else:
            target.__dict__[attr] = saved
