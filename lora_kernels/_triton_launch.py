"""Triton launches of a cached plan at the launcher's floor.

On a GPU every ``kernel[grid](**kwargs)`` goes through ``JITFunction.run``: it binds every
argument (defaults included), computes the specialization (each pointer's dtype and 16-byte
alignment, each integer's value class) and from it the cache key, looks the compiled kernel up,
checks the globals it read, evaluates the grid and calls the compiled kernel's launcher,
``run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
exit_hook, *bound_args)``. An autotuned kernel first rebuilds its key from the arguments and
merges the chosen config's. For a launch of a cached plan, whose key fixes every shape, stride,
dtype, scalar and flag of the call, all of that comes out the same on every call but the tensors.

:func:`planned_launch` keeps, in the plan, what its first launch found (:class:`Launch`: the chosen
config; :class:`Direct`: the compiled kernel, the bound arguments with the tensors' slots, the
grid, the device) and from then on checks only what the plan's key does not fix (each tensor's
dtype and alignment, the current device, Triton's hooks), puts the tensors in and calls the
launcher exactly as ``JITFunction.run`` does. Anything unexpected takes ``JITFunction.run``.

Feature-detected, not version-checked: a :class:`Direct` is made only where the first launch
returns a compiled kernel with a launcher (``run``, ``function``, ``packed_metadata``,
``launch_metadata``), the JIT function's per-device cache ends with its binder, and the binder's
arguments are the kernel's parameters in order (Triton 3.4 to 3.9 all do). Elsewhere (the CPU
interpreter, another Triton) a plan's launches skip only the autotuner's dispatch.
"""

from __future__ import annotations

import os

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # a Triton without knobs (< 3.4): no direct launches
    _knobs = _driver = _JITFunction = None

# LORA_KERNELS_DIRECT_LAUNCH=0 sends every launch through JITFunction.run (read per call).
DIRECT = os.environ.get("LORA_KERNELS_DIRECT_LAUNCH", "1") != "0"

_ALIGN_MASK = 16 - 1  # Triton specializes each pointer on its 16-byte alignment


class Direct:
    """One compiled kernel's launch with the bound arguments of a plan's first call.

    ``slots``: ``(index, name, dtype, aligned, is_descriptor)`` of every tensor argument (a tensor
    descriptor's checks are on its base tensor); every other argument is the plan's, as bound then.
    NOTE: the globals check of ``JITFunction.run`` is not repeated (the kernels read only constant
    globals), nor are environment-driven compile options (``TRITON_DEBUG``) re-read per call.
    """

    __slots__ = ("name", "fn", "compiled", "template", "slots", "grid", "device", "get_device", "get_stream")

    def __init__(self, name, fn, compiled, template, slots, grid, device, get_device, get_stream):
        self.name, self.fn, self.compiled, self.template, self.slots = name, fn, compiled, template, slots
        self.grid, self.device, self.get_device, self.get_stream = grid, device, get_device, get_stream

    def __call__(self, kwargs: dict) -> bool:
        """Launch with ``kwargs``' tensors; False (nothing launched) where the compiled kernel may not fit them."""
        args = self.template.copy()
        for index, name, dtype, aligned, descriptor in self.slots:
            value = kwargs[name]
            base = value.base if descriptor else value
            if base.dtype is not dtype or (not base.data_ptr() & _ALIGN_MASK) is not aligned:
                return False
            args[index] = value
        runtime = _knobs.runtime
        if self.fn.pre_run_hooks or getattr(runtime, "add_stages_inspection_hook", None) is not None:
            return False
        device = self.get_device()
        if device != self.device:
            return False
        stream = self.get_stream(device)
        kernel, grid = self.compiled, self.grid
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *args), runtime.launch_enter_hook, runtime.launch_exit_hook,
                   *args)
        return True


class Launch:
    """A cached plan's launch of one kernel: the autotuner's config chosen once, and a :class:`Direct`
    where the installed Triton allows one."""

    __slots__ = ("fn", "grid", "pre_hook", "config_kwargs", "direct")

    def __init__(self, fn, grid, pre_hook, config_kwargs, direct):
        self.fn, self.grid, self.pre_hook, self.config_kwargs, self.direct = fn, grid, pre_hook, config_kwargs, direct

    def __call__(self, kwargs: dict) -> None:
        if self.pre_hook is not None:  # sets the tensor descriptors' block shapes for the config
            self.pre_hook({**kwargs, **self.config_kwargs})
        direct = self.direct if DIRECT else None
        if direct is not None and direct(kwargs):
            return
        compiled = self.fn[self.grid](**kwargs, **self.config_kwargs)
        if direct is not None:
            # NOTE: a refused direct launch (another alignment, device or a hook) is made again from
            # this call, so that a plan whose first call was the odd one out does not stay slow.
            self.direct = _direct(self.fn, self.grid, {**kwargs, **self.config_kwargs}, compiled)


def planned_launch(kernel, grid, kwargs: dict, plan=None, slot=None) -> None:
    """``kernel[grid](**kwargs)`` for a JIT function or an autotuner over one.

    ``plan``: the call's cached launch plan (a dict whose key fixes every non-tensor argument in
    ``kwargs`` and the tensors' shapes, strides and dtypes), which keeps this launch under ``slot``
    after the first call; None launches through Triton's dispatch every time.
    """
    entry = plan.get(slot) if plan is not None else None
    if entry is not None:
        return entry(kwargs)
    compiled = kernel[grid](**kwargs)
    if plan is not None:
        plan[slot] = _first_launch(kernel, grid, kwargs, compiled)


def _first_launch(kernel, grid, kwargs: dict, compiled) -> Launch:
    fn, pre_hook, config_kwargs = kernel, None, {}
    config = getattr(kernel, "best_config", None)
    if hasattr(kernel, "configs") and hasattr(kernel, "fn"):  # an autotuner
        if config is None:  # an autotuner that keeps no chosen config: dispatch every time
            return Launch(kernel, grid, None, {}, None)
        fn, pre_hook, config_kwargs = kernel.fn, config.pre_hook, config.all_kwargs()
    return Launch(fn, grid, pre_hook, config_kwargs, _direct(fn, grid, {**kwargs, **config_kwargs}, compiled))


def _direct(fn, grid, kwargs: dict, compiled):
    """The :class:`Direct` of ``fn``'s launch with ``kwargs`` by ``compiled``, or None where this Triton
    (or an interpreted kernel) does not launch as described above."""
    if _JITFunction is None or not isinstance(fn, _JITFunction) or compiled is None:
        return None
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        return None
    try:
        active = _driver.active
        get_device, get_stream = active.get_current_device, active.get_current_stream
        device = get_device()
        binder = fn.device_caches[device][-1]
        bound, _, _ = binder(**kwargs)
    except Exception:  # noqa: BLE001 - any other layout of Triton's internals: no direct launch
        return None
    if not isinstance(bound, dict) or list(bound) != list(fn.arg_names):
        return None
    template = list(bound.values())
    slots = []
    for index, (name, value) in enumerate(bound.items()):
        descriptor = isinstance(getattr(value, "base", None), torch.Tensor) and hasattr(value, "block_shape")
        if isinstance(value, torch.Tensor) or descriptor:
            base = value.base if descriptor else value
            slots.append((index, name, base.dtype, not base.data_ptr() & _ALIGN_MASK, descriptor))
            template[index] = None  # NOTE: the record must not keep the first call's tensors alive
        elif name in kwargs and kwargs[name] is not value:
            return None  # the binder converted an argument: replaying it is not the same call
    grid = grid(bound) if callable(grid) else grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Direct(getattr(fn, "__name__", "?"), fn, compiled, template, tuple(slots), grid, device,
                  get_device, get_stream)
