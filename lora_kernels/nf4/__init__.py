"""The LoRA layer on a bitsandbytes 4-bit (NF4/FP4) frozen base: QLoRA on the fused kernels.

The same ladder as the package: ``reference`` (bitsandbytes' storage, the dequantiser, the
specification) → ``triton_ops`` (W0 dequantised inside the GEMM main loops) → ``ops`` (registered
ops, fake and autograd) → ``functional`` (``qlora_linear``) → ``module`` (``LoRALinear4bit``, which
``LoRALinear.from_linear`` returns for a ``Linear4bit``). bitsandbytes is optional: it is needed to
hold a 4-bit model at all, not to import this package.
"""

from . import ops  # noqa: F401  (registers lora_kernels::qlora_*)
from .functional import QLoRALinearFunction, qlora_linear
from .module import LoRALinear4bit, is_linear4bit
from .reference import QuantWeight, bitsandbytes_available, dequantize, dequantize_torch

__all__ = ["LoRALinear4bit", "QLoRALinearFunction", "QuantWeight", "bitsandbytes_available", "dequantize",
           "dequantize_torch", "is_linear4bit", "qlora_linear"]
