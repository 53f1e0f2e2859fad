"""``pytest bench``: without a GPU the suite's CPU run executes the package's Triton path under
Triton's CPU interpreter, which must be chosen before Triton is first imported (as in
python_tests/conftest.py), hence here, at collection time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
