"""The LoRA layer on a bitsandbytes 4-bit (NF4/FP4) frozen base: QLoRA on the fused kernels."""
