"""Several LoRA adapters in one batch: fused (SGMV-style) forward and backward.

Layers, as for the single-adapter layer: kernels (``triton_ops``) and the plain-PyTorch
specification (``reference``) → registered ops ``lora_kernels::multi_lora_forward`` /
``multi_lora_backward`` (``ops``) → ``multi_lora_linear`` (``functional``) → ``MultiLoRALinear``
(``module``). See docs/multi_lora.md.
"""

from . import ops  # noqa: F401  (registers the lora_kernels::multi_lora_* ops)
from .functional import MultiLoRALinearFunction, multi_lora_linear
from .module import MultiLoRALinear
from .reference import multi_lora_reference, segments

__all__ = ["MultiLoRALinear", "MultiLoRALinearFunction", "multi_lora_linear", "multi_lora_reference", "segments"]
