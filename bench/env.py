"""The environment a run was measured in, recorded in its JSON."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from lora_kernels import backends

REPO = Path(__file__).resolve().parent.parent


def quiet_cuda_home_notice() -> None:
    """Import ``torch.utils.cpp_extension`` without its "No CUDA runtime is found" warning.

    NOTE: that module logs the warning when it is imported on a machine that has a CUDA toolkit
    (CUDA_HOME, or nvcc on PATH) but no GPU, and torch.compile's CPU backend imports it, so a
    CPU benchmark run opened with it. On such a machine no CUDA runtime is expected: the one
    import is done here with that logger raised to ERROR, and its level restored.
    """
    if torch.cuda.is_available() or "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


quiet_cuda_home_notice()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "lora_kernels": _version("lora_kernels"),
        "backends": {n: backends.unavailable_reason(n, device) or "available" for n in backends.BACKENDS},
        "triton_interpret": backends.triton_interpreted(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env
