"""lora_kernels: fused Triton and CUDA kernels for LoRA linear layers.

Layers, from the bottom up: kernels (``triton_ops``, ``csrc/``) → registered ops
(``ops``) → ``LoRALinearFunction`` and ``lora_linear`` (``functional``) →
``LoRALinear`` and ``apply_lora`` (``module``). ``reference`` is the
specification every backend is tested against.
"""

from . import _runtime, ops  # noqa: F401  (ops registers the lora_kernels::* ops)
from .backends import BackendUnavailableError, available_backends
from .dora import dora_linear, dora_weight_norm
from .functional import (
    LoRALinearFunction,
    lora_linear,
    lora_scaling,
    merge_lora_,
    unmerge_lora_,
)
from .module import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    disable_adapters,
    enable_adapters,
    load_lora_pretrained,
    lora_state_dict,
    merge_and_unload,
    print_trainable_parameters,
)
from .multi_lora import MultiLoRALinear, multi_lora_linear
from .nf4 import LoRALinear4bit, qlora_linear
from .peft_accel import AccelerationReport, accelerate_peft, deaccelerate_peft

__version__ = "0.1.0"

__all__ = [
    "AccelerationReport",
    "BackendUnavailableError",
    "LoRALinear",
    "LoRALinear4bit",
    "LoRALinearFunction",
    "MultiLoRALinear",
    "accelerate_peft",
    "dora_linear",
    "dora_weight_norm",
    "adapters_disabled",
    "apply_lora",
    "available_backends",
    "deaccelerate_peft",
    "disable_adapters",
    "enable_adapters",
    "load_lora_pretrained",
    "lora_linear",
    "lora_scaling",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora_",
    "multi_lora_linear",
    "print_trainable_parameters",
    "qlora_linear",
    "unmerge_lora_",
]

if _runtime.emulated_target() is not None:
    # LORA_KERNELS_EMULATE=sm90|sm80 (with TRITON_INTERPRET=1): this whole process takes that GPU's
    # decisions and Triton's launch path over a stand-in driver (lora_kernels._emulate).
    from . import _emulate

    _emulate.for_this_process()
