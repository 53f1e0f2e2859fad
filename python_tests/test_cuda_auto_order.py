"""The measured table behind backend="auto" (lora_kernels.backends.AUTO_MEASURED_ORDER), on the CPU.

The table holds only measurements (docs/cuda.md says how to fill it from bench/run.py);
every entry must be a complete order of real backends, and a GPU without an entry keeps
the default order.
"""

import pytest
import torch

from lora_kernels import backends


@pytest.mark.parametrize("capability,order", sorted(backends.AUTO_MEASURED_ORDER.items()) or [("none", ())])
def test_every_entry_is_an_order_of_all_backends(capability, order):
    if capability == "none":
        pytest.skip("no measurements recorded yet: auto keeps AUTO_ORDER_CUDA everywhere")
    major, minor = capability.split(".")
    assert major.isdigit() and minor.isdigit(), f"capability {capability!r} is not 'major.minor'"
    assert sorted(order) == sorted(backends.BACKENDS), f"{capability}: {order} is not an order of {backends.BACKENDS}"
    assert order[-1] == "reference", f"{capability}: the reference path comes last"


def test_a_gpu_without_an_entry_keeps_the_default_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 7))
    assert backends.auto_order(torch.device("cuda", 0)) == backends.AUTO_ORDER_CUDA


def test_a_measured_entry_is_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(backends.AUTO_MEASURED_ORDER, "9.0", ("cuda", "triton", "reference"))
    assert backends.auto_order(torch.device("cuda", 0)) == ("cuda", "triton", "reference")
