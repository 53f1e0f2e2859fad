"""Build and install lora_kernels.

The pure-Python package (reference path and Triton kernels) always installs.
The CUDA extension ``lora_kernels._C`` is built separately (see csrc/).
"""

from setuptools import find_packages, setup

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for LoRA linear layers",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
)
