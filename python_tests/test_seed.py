"""The dropout seed: for backends that take it by value (cuda, reference), drawn on the host from the
CUDA generator's state in eager mode on a GPU (no kernel of its own); on the device while traced or
captured, and for the Triton kernels; the CUDA kernels give the same mask for either."""

import pytest
import torch

from lora_kernels import backends, functional, ops
from conftest import requires_gpu



class FakeGenerator:
    """The part of a CUDA generator's interface host_seed reads (seed and Philox offset)."""

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.seed, self.offset = seed, offset

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


def test_host_seed_follows_the_generator_state():
    gen = FakeGenerator(1234)
    seeds = [functional.host_seed(gen) for _ in range(2000)]
    assert gen.offset == 4 * 2000  # each draw consumes one Philox step
    assert all(s.dtype == torch.int64 and s.dim() == 0 and s.device.type == "cpu" for s in seeds)
    values = [int(s) for s in seeds]
    assert len(set(values)) == len(values)
    assert all(2**32 <= v < 2**62 for v in values)  # always int64 for Triton, never int32
    # torch.manual_seed resets seed and offset: the same sequence again.
    again = FakeGenerator(1234)
    assert [int(functional.host_seed(again)) for _ in range(5)] == values[:5]
    assert int(functional.host_seed(FakeGenerator(1235))) != values[0]
    assert int(functional.host_seed(FakeGenerator(1234, offset=8))) == values[2]
    # The top bits of 64-bit seeds count (a seed above 2**63 from torch.seed() included).
    assert int(functional.host_seed(FakeGenerator(2**64 - 1))) != int(functional.host_seed(FakeGenerator(2**63 - 1)))


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's generator queries answered on the CPU: one device with a FakeGenerator."""
    gen = FakeGenerator(99)
    state = {"capturing": False, "device_draws": []}
    monkeypatch.setattr(torch.cuda, "default_generators", (gen,))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(functional, "draw_seed", lambda device: state["device_draws"].append(device) or "device")
    return gen, state


def test_eager_gpu_seeds_stay_on_the_host(fake_gpu):
    gen, state = fake_gpu
    cuda = torch.device("cuda")
    assert functional.call_seed(0.1, None, cuda) == "device"  # a backend that reads the seed on the device
    assert state["device_draws"].pop() == cuda
    s = functional.call_seed(0.1, None, cuda, by_value=True)
    assert s.device.type == "cpu" and int(s) == int(functional.host_seed(FakeGenerator(99)))
    assert gen.offset == 4 and not state["device_draws"]
    explicit = functional.call_seed(0.1, 7, torch.device("cuda", 0), by_value=True)
    assert explicit.device.type == "cpu" and int(explicit) == 7
    assert functional.call_seed(0.0, None, cuda) is functional._NO_SEED
    with pytest.raises(ValueError, match="seed must be an integer"):
        functional.call_seed(0.1, -1, cuda, by_value=True)


def test_captured_and_traced_gpu_seeds_are_drawn_on_the_device(fake_gpu, monkeypatch):
    gen, state = fake_gpu
    state["capturing"] = True  # a CUDA graph replays its kernels: the seed must be drawn inside
    assert functional.call_seed(0.1, None, torch.device("cuda"), by_value=True) == "device"
    state["capturing"] = False
    monkeypatch.setattr(functional, "HOST_SEEDS", False)  # LORA_KERNELS_HOST_SEEDS=0: eager draws as graphs do
    assert functional.call_seed(0.1, None, torch.device("cuda"), by_value=True) == "device"
    assert int(functional.call_seed(0.1, 12, torch.device("cuda"), by_value=True)) == 12  # an explicit seed is no draw
    monkeypatch.setattr(ops, "tracing", lambda: True)  # a compiled graph: on the device
    assert functional.call_seed(0.1, None, torch.device("cuda"), by_value=True) == "device"
    assert len(state["device_draws"]) == 3 and gen.offset == 0


def test_cpu_seeds_are_drawn_from_the_cpu_generator():
    torch.manual_seed(5)
    a = functional.call_seed(0.1, None, torch.device("cpu"))
    torch.manual_seed(5)
    assert int(functional.call_seed(0.1, None, torch.device("cpu"))) == int(a)


def test_backends_that_take_a_host_seed():
    assert backends.get("reference").seed_by_value
    assert not backends._load("triton")[0] or not backends.get("triton").seed_by_value
    cuda = backends._load("cuda")[0]
    assert cuda is None or cuda.seed_by_value


def _check_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "reference"])
def test_eager_dropout_on_a_gpu_launches_no_seed_kernel_and_reproduces(backend):
    from torch.utils._python_dispatch import TorchDispatchMode

    why = backends.unavailable_reason(backend, DEVICE)
    if why:
        pytest.skip(why)
    import lora_kernels as lk

    x = torch.randn(64, 96, device="cuda")
    w, A, B = torch.randn(80, 96, device="cuda"), torch.randn(8, 96, device="cuda"), torch.randn(80, 8, device="cuda")

    class RandomOps(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("randint", "random_"):
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    lk.lora_linear(x, w, None, A, B, 0.5, dropout_p=0.2, backend=backend)  # warm
    torch.manual_seed(3)
    mode = RandomOps()
    # NOTE: as bench/host_overhead.py: with a dispatch mode active, ops would take the traced path.
    before, ops.tracing = ops.tracing, lambda: False
    try:
        with mode:
            y1 = lk.lora_linear(x, w, None, A, B, 0.5, dropout_p=0.2, backend=backend)
    finally:
        ops.tracing = before
    assert mode.seen == []
    torch.manual_seed(3)
    y2 = lk.lora_linear(x, w, None, A, B, 0.5, dropout_p=0.2, backend=backend)
    y3 = lk.lora_linear(x, w, None, A, B, 0.5, dropout_p=0.2, backend=backend)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


@requires_gpu
def test_cuda_ops_take_a_host_seed_by_value():
    try:
        import lora_kernels.cuda_ops  # noqa: F401
    except ImportError as exc:
        pytest.skip(str(exc))
    x, w = torch.randn(33, 40, device="cuda"), torch.randn(24, 40, device="cuda")
    A, B, dy = torch.randn(4, 40, device="cuda"), torch.randn(24, 4, device="cuda"), torch.randn(33, 24, device="cuda")
    ops_ = torch.ops.lora_kernels
    host, dev = torch.tensor(2**40 + 77), torch.tensor(2**40 + 77, device="cuda")
    fwd = ops_.cuda_lora_forward(x, w, None, A, B, 0.5, 0.3, dev)
    _check_same(ops_.cuda_lora_forward(x, w, None, A, B, 0.5, 0.3, host), fwd)
    _check_same(ops_.cuda_lora_backward(dy, x, w, A, B, fwd[1], 0.5, 0.3, host, True),
                ops_.cuda_lora_backward(dy, x, w, A, B, fwd[1], 0.5, 0.3, dev, True))
