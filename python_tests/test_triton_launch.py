"""Direct launches of a cached plan's Triton kernels (lora_kernels/_triton_launch.py).

On the CPU the layer's kernels are made real ``JITFunction``s over a stand-in driver
(``lora_kernels._emulate.stand_in_triton``, through ``bench.host_overhead.jit_on_cpu``): Triton's binding, specialization key and cache lookup run
for real and only the compiled kernels are stand-ins that record their launcher's arguments. So
these tests check that a direct launch calls the launcher with exactly what ``JITFunction.run``
passes, that the steady state skips ``JITFunction.run``, and that whatever the plan's key does not
fix (a tensor's alignment, the device, Triton's hooks) sends the launch back through it. On a GPU
the last test runs the real thing against the reference.
"""

import contextlib

import pytest
import torch

import lora_kernels as lk
from lora_kernels import _emulate, _triton_launch, backends, reference, triton_ops
from conftest import DEVICE, ON_GPU, TOLERANCE, relative_error

host_overhead = pytest.importorskip("bench.host_overhead")

on_cpu_harness = pytest.mark.skipif(ON_GPU or not triton_ops.INTERPRET or _triton_launch._knobs is None,
                                    reason="the stand-in JIT harness runs under the CPU interpreter, "
                                           "with a Triton that has knobs (3.4+)")


@pytest.fixture
def jit_calls():
    with host_overhead.jit_on_cpu() as calls:
        yield calls


@contextlib.contextmanager
def _settings(**values):
    saved = {name: getattr(triton_ops, name) for name in values}
    for name, value in values.items():
        setattr(triton_ops, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(triton_ops, name, value)


@contextlib.contextmanager
def _direct(on: bool):
    saved, _triton_launch.DIRECT = _triton_launch.DIRECT, on
    try:
        yield
    finally:
        _triton_launch.DIRECT = saved


@contextlib.contextmanager
def _count_jit_runs():
    from triton.runtime.jit import JITFunction

    runs, original = [], JITFunction.run

    def run(self, *args, **kwargs):
        runs.append(self.__name__)
        return original(self, *args, **kwargs)

    JITFunction.run = run
    try:
        yield runs
    finally:
        JITFunction.run = original


def _layer_inputs(M=24, K=40, N=36, r=8, dtype=torch.float32):
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, dtype=dtype) / K**0.5
    A = (torch.randn(r, K) / K**0.5).to(dtype).requires_grad_(True)
    B = torch.randn(N, r, dtype=dtype).requires_grad_(True)
    return x, weight, A, B, torch.randn(M, N, dtype=dtype)


def _step(x, weight, A, B, dy, p=0.0):
    y = lk.lora_linear(x, weight, None, A, B, 0.5, dropout_p=p, backend="triton", seed=7)
    y.backward(dy)
    x.grad = A.grad = B.grad = None


def _normal(value, inputs):
    """A launcher argument with what differs between two calls of the same plan taken out: a fresh
    output tensor by its layout, one of the call's inputs by its identity."""
    if isinstance(value, torch.Tensor):
        known = next((i for i, t in enumerate(inputs) if t.data_ptr() == value.data_ptr()), None)
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, known)
    if hasattr(value, "block_shape") and isinstance(getattr(value, "base", None), torch.Tensor):
        return ("descriptor", _normal(value.base, inputs), tuple(value.shape), tuple(value.strides),
                tuple(value.block_shape))
    return value


def _launches(calls, inputs):
    return [(kernel.name, [_normal(v, inputs) for v in args]) for kernel, args in calls]


@on_cpu_harness
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("forward_plan,backward_plan", [("fused", "fused"), ("two_pass", "g_pass")])
def test_direct_launch_passes_what_jit_run_passes(jit_calls, p, forward_plan, backward_plan):
    first = _layer_inputs()

    def fresh():  # the same values in new storage: a stale tensor in a launch shows by its identity
        return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in first)

    with _settings(FORWARD_PLAN=forward_plan, BACKWARD_PLAN=backward_plan):
        _step(*first, p=p)  # first calls: plans, configs, launch records
        jit_calls.clear()
        inputs = fresh()
        with _direct(False), _count_jit_runs() as runs:
            _step(*inputs, p=p)
        through_jit = _launches(jit_calls, inputs)
        assert len(runs) == len(through_jit)
        jit_calls.clear()
        inputs = fresh()
        with _count_jit_runs() as runs:
            _step(*inputs, p=p)
        direct = _launches(jit_calls, inputs)
    assert runs == []  # every launch went past JITFunction.run
    expected = ["_lora_forward_kernel"] if forward_plan == "fused" else ["_lora_shrink_kernel", "_lora_forward_kernel"]
    expected += ["_lora_g_kernel"] if backward_plan == "g_pass" else []
    assert [name for name, _ in direct] == expected + ["_lora_backward_kernel", "_reduce_runs_kernel"]
    assert direct == through_jit


@on_cpu_harness
def test_misaligned_tensor_goes_through_jit_run_and_its_own_kernel(jit_calls):
    x, weight, A, B, dy = _layer_inputs()
    # the same shape and strides one element further on: the plan's key is the same, the alignment not
    shifted = torch.randn(x.numel() + 1)[1:].view_as(x).requires_grad_(True)
    assert shifted.stride() == x.stride() and shifted.data_ptr() % 16 != 0

    def step(x):
        jit_calls.clear()
        compiled = len(_emulate._ACTIVE.compiled)
        with _count_jit_runs() as runs:
            _step(x, weight, A, B, dy)
        forward = [k for k, _ in jit_calls if k.name == "_lora_forward_kernel"]
        return runs, forward[0], len(_emulate._ACTIVE.compiled) - compiled

    _, aligned_kernel, _ = step(x)
    runs, kernel, new = step(shifted)  # through JITFunction.run, to a kernel specialized for it
    assert "_lora_forward_kernel" in runs and "_lora_backward_kernel" in runs
    assert kernel is not aligned_kernel and new > 0
    runs, again, new = step(shifted)  # its launch made again from that call: direct from now on
    assert runs == [] and again is kernel and new == 0
    runs, kernel, new = step(x)  # back: through JITFunction.run once, to the aligned kernel, no compile
    assert "_lora_forward_kernel" in runs and kernel is aligned_kernel and new == 0
    assert step(x)[0] == []


@on_cpu_harness
def test_changed_device_or_pre_run_hook_goes_through_jit_run(jit_calls):
    from triton.runtime import driver

    x, weight, A, B, dy = _layer_inputs()
    _step(x, weight, A, B, dy)
    driver.active.device = 1
    try:
        with _count_jit_runs() as runs:
            _step(x, weight, A, B, dy)
    finally:
        driver.active.device = 0
    assert runs == ["_lora_forward_kernel", "_lora_backward_kernel", "_reduce_runs_kernel"]
    seen = []
    fn = triton_ops._autotuned("forward", False).fn
    fn.pre_run_hooks.append(lambda *args, **kwargs: seen.append(kwargs["M"]))
    try:
        with _count_jit_runs() as runs:
            _step(x, weight, A, B, dy)
    finally:
        fn.pre_run_hooks.clear()
    assert runs[0] == "_lora_forward_kernel" and seen == [x.shape[0]]


@on_cpu_harness
def test_launch_hooks_see_direct_launches(jit_calls):
    from triton import knobs

    x, weight, A, B, dy = _layer_inputs()
    _step(x, weight, A, B, dy)
    jit_calls.clear()
    enter = object()
    saved, knobs.runtime.launch_enter_hook = knobs.runtime.launch_enter_hook, enter
    try:
        with _count_jit_runs() as runs:
            _step(x, weight, A, B, dy)
    finally:
        knobs.runtime.launch_enter_hook = saved
    assert runs == [] and all(args[7] is enter for _, args in jit_calls)


@on_cpu_harness
def test_launch_counter_counts_direct_launches_once(jit_calls):
    x, weight, A, B, dy = _layer_inputs()
    _step(x, weight, A, B, dy)
    with host_overhead.counting(torch_ops=False) as counter:
        _step(x, weight, A, B, dy)
    assert counter.triton == ["_lora_forward_kernel", "_lora_backward_kernel", "_reduce_runs_kernel"]


@pytest.mark.skipif(not ON_GPU or bool(backends.unavailable_reason("triton", DEVICE)),
                    reason="needs a CUDA GPU with the Triton backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_direct_launches_on_gpu_match_the_reference(dtype):
    """Repeated calls (direct launches), then a misaligned input of the same plan (back through
    JITFunction.run once, then direct again), with and without dropout, against float64."""
    M, K, N, r = 65, 96, 72, 8
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dtype)
    B = torch.randn(N, r, device=DEVICE, dtype=dtype)
    storage = torch.randn(M * K + 8, device=DEVICE, dtype=dtype)
    for p in (0.0, 0.1):
        jit_runs = []
        for call, offset in enumerate((0, 0, 0, 1, 1)):
            x = storage[offset:offset + M * K].view(M, K)
            dy = torch.randn(M, N, device=DEVICE, dtype=dtype)
            xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, A, B))
            with _count_jit_runs() as runs:
                y = lk.lora_linear(xs, weight, None, As, Bs, 0.5, dropout_p=p, backend="triton", seed=11 + call)
                y.backward(dy)
            jit_runs.append(len(runs))
            x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
            y64 = reference.lora_linear_reference(x64, weight.double(), None, A64, B64, 0.5, p, 11 + call)
            y64.backward(dy.double())
            for out, ref in ((y, y64), (xs.grad, x64.grad), (As.grad, A64.grad), (Bs.grad, B64.grad)):
                assert relative_error(out, ref) < TOLERANCE[dtype] * 4
        assert jit_runs[0] > 0 and jit_runs[2] == 0 and jit_runs[3] > 0 and jit_runs[4] == 0, jit_runs


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_layer_on_another_gpu_than_the_current_one(backend):
    """A layer on cuda:1 called while cuda:0 is current (as ``device_map="auto"`` leaves it) launches
    on cuda:1: forward, gradients and merge against float64; the current device is left as it was."""
    why = backends.unavailable_reason(backend, torch.device("cuda", 1))
    if why:
        pytest.skip(why)
    dev = torch.device("cuda", 1)
    M, K, N, r = 65, 96, 72, 8
    x = torch.randn(M, K, device=dev, dtype=torch.float32)
    weight = torch.randn(N, K, device=dev) / K**0.5
    A, B = torch.randn(r, K, device=dev) / K**0.5, torch.randn(N, r, device=dev)
    dy = torch.randn(M, N, device=dev)
    with torch.cuda.device(0):
        xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, A, B))
        y = lk.lora_linear(xs, weight, None, As, Bs, 0.5, dropout_p=0.1, backend=backend, seed=5)
        y.backward(dy)
        merged = weight.clone()
        lk.merge_lora_(merged, A, B, 0.5, backend=backend)
        assert torch.cuda.current_device() == 0
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y64 = reference.lora_linear_reference(x64, weight.double(), None, A64, B64, 0.5, 0.1, 5)
    y64.backward(dy.double())
    for out, ref in ((y, y64), (xs.grad, x64.grad), (As.grad, A64.grad), (Bs.grad, B64.grad),
                     (merged, weight.double() + 0.5 * B.double() @ A.double())):
        assert relative_error(out, ref) < TOLERANCE[torch.float32]


@on_cpu_harness
def test_launch_records_keep_no_tensor_alive(jit_calls):
    import gc
    import weakref

    x, weight, A, B, dy = _layer_inputs()
    _step(x, weight, A, B, dy)
    _step(x, weight, A, B, dy)
    refs = [weakref.ref(t) for t in (x, dy)]
    jit_calls.clear()
    del x, dy
    gc.collect()
    assert all(r() is None for r in refs)  # the plans' records hold no input (nor any output)
    records = [v for plan in triton_ops._PLANS.values() for v in plan.values()
               if isinstance(v, _triton_launch.Launch) and v.direct is not None]
    assert records and all(not isinstance(a, torch.Tensor) for rec in records for a in rec.direct.template)


@pytest.mark.skipif(not ON_GPU or bool(backends.unavailable_reason("triton", DEVICE)),
                    reason="needs a CUDA GPU with the Triton backend")
def test_host_overhead_gpu_times_see_the_kernels():
    """bench/host_overhead.py --real's GPU work: the profiler's kernels, more for forward+backward."""
    layer, x, dy = host_overhead.make_layer(256, 512, 384, 16, 0.1, DEVICE, torch.bfloat16)
    t = host_overhead.gpu_times(layer, x, dy, steps=3)
    assert 0 < t["fwd"]["gpu"] < t["fwd_bwd"]["gpu"]
    assert t["fwd"]["wall"] > 0 and t["fwd_bwd"]["wall"] > 0
