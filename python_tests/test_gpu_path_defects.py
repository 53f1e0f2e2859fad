"""Defects of the GPU path that the interpreter's branches hid, each reproduced on the CPU.

The interpreter alone gives each autotuner one config and never uses TMA, so these tests put the
launch code on a GPU's branches by hand (a GPU's config lists and arch, TMA chosen) and use only
what the launch code offered before the fixes, so that each can be run against that code and seen
to fail there. The emulated target (test_emulated_target.py) runs the same branches end to end.
"""

import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import triton_ops
from lora_kernels.multi_lora import triton_ops as multi_triton
from lora_kernels.nf4 import triton_ops as nf4_triton

from conftest import ON_GPU, TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(ON_GPU or not triton_ops.INTERPRET,
                                reason="CPU reproductions under Triton's interpreter (TRITON_INTERPRET=1)")


def _clear():
    triton_ops._autotuned.cache_clear()
    multi_triton._sgmv_gemm.cache_clear()
    nf4_triton._autotuned.cache_clear()
    triton_ops.clear_launch_caches()


@pytest.fixture
def gpu_config_lists(monkeypatch):
    """The autotuners built with a GPU's config lists, pruned for an sm_90 part's arch and shared memory."""
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    monkeypatch.setattr(triton_ops, "_target_arch", lambda device: 90)
    monkeypatch.setattr(triton_ops, "_shared_memory_limit", lambda device: 232448)
    _clear()
    yield
    _clear()


def _autotuners():
    return [("forward-tma", triton_ops._autotuned("forward", True)),
            ("forward-pointer", triton_ops._autotuned("forward", False)),
            ("backward-tma", triton_ops._autotuned("backward", True)),
            ("backward-pointer", triton_ops._autotuned("backward", False)),
            ("multi-gemm", multi_triton._sgmv_gemm()),
            ("nf4-forward", nf4_triton._autotuned("forward")),
            ("nf4-backward", nf4_triton._autotuned("backward"))]


def test_prune_takes_keyword_arguments_as_autotuner_run_passes_them(gpu_config_lists):
    """Autotuner.run calls ``early_config_prune(configs, self.nargs, **kwargs)``, its ``nargs`` built
    from the positional arguments alone, and our launches pass keywords only. Before the fix the prune
    read ``named_args`` alone and every autotuned kernel's first compiled call crashed."""
    for name, tuner in _autotuners():
        assert len(tuner.configs) > 1, name  # a GPU's list: the autotuner really prunes
        kwargs = {a: torch.empty(64, 64, dtype=torch.bfloat16) for a in tuner.arg_names if a.endswith("_ptr")}
        tuner.nargs = {}
        kept = tuner.prune_configs(kwargs)
        assert kept and all(c in tuner.configs for c in kept), name


def test_exclusion_table_matches_keyword_launches(gpu_config_lists):
    """A config the compile check excluded for a kernel variant is pruned when the variant's flags
    arrive as keywords (they always do). Before the fix every flag read as -1 and nothing matched."""
    entries = [k for k in triton_ops._EXCLUDED if k[0] == "_lora_forward_kernel" and k[1] == 90 and k[2] == 2]
    if not entries:
        pytest.skip(f"Triton {triton_ops.triton.__version__}'s table excludes no sm_90 16-bit forward config")
    matched = 0
    for kernel, arch, size, variant, shape in entries:
        flags = {f: bool(v) for f, v in zip(triton_ops.VARIANT_FLAGS, variant) if v >= 0}
        tuner = triton_ops._autotuned("forward", bool(flags.get("TMA")))
        by_shape = {tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (c.num_stages, c.num_warps): c
                    for c in tuner.configs}
        if shape not in by_shape:
            continue
        tuner.nargs = {}
        kept = tuner.prune_configs(dict(flags, y_ptr=torch.empty(64, 64, dtype=torch.bfloat16)))
        assert by_shape[shape] not in kept or kept == tuner.configs[-1:], (variant, shape)
        matched += 1
    assert matched, "no excluded config is in today's config lists"


def _bf16_call():
    torch.manual_seed(0)
    return (torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16), None,
            torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(96, 8, dtype=torch.bfloat16), 1.0, 0.0)


@pytest.fixture
def tma_chosen(monkeypatch):
    """The launchers choose TMA for 16-bit operands (as on Hopper), with no case failed yet."""
    monkeypatch.setattr(triton_ops, "_tma_by_default", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(triton_ops, "_TMA_FAILED_CASES", set())
    monkeypatch.setattr(triton_ops, "_WARNED", set())
    triton_ops.clear_launch_caches()
    yield
    triton_ops.clear_launch_caches()


def test_a_tma_bug_is_not_hidden_as_a_slow_path(tma_chosen, monkeypatch):
    """Only a failure to build the TMA kernel may fall back to the pointer kernel. Before the fix every
    exception did: a crash or a bad descriptor became a quiet slow path, for good."""

    def broken(t):
        raise ValueError("a bad descriptor")

    monkeypatch.setattr(triton_ops, "_descriptor", broken)
    with pytest.raises(ValueError, match="a bad descriptor"):
        lk.lora_linear(*_bf16_call(), backend="triton")
    assert not triton_ops._TMA_FAILED_CASES


def test_a_tma_build_failure_falls_back_loudly(tma_chosen, monkeypatch):
    from triton.runtime.errors import OutOfResources

    def out_of_resources(t):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_ops, "_descriptor", out_of_resources)
    args = _bf16_call()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lk.lora_linear(*args, backend="triton")
    assert any("TMA" in str(w.message) for w in caught)
    assert len(triton_ops._TMA_FAILED_CASES) == 1
    x, w, _, A, B, s, _ = (a.double() if isinstance(a, torch.Tensor) else a for a in args)
    assert relative_error(y, x @ w.t() + s * (x @ A.t()) @ B.t()) < TOLERANCE[torch.bfloat16]
    if hasattr(triton_ops, "tma_fallbacks"):
        assert triton_ops.tma_fallbacks() == sorted(triton_ops._TMA_FAILED_CASES, key=repr)
