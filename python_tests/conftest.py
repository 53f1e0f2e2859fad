"""Shared test setup.

Without a GPU, Triton's kernels run under its CPU interpreter: TRITON_INTERPRET
must be set before Triton is first imported, which is why it is set here, at
collection time. On a GPU machine the compiled kernels are tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests check results, not speed: one GEMM config per shape instead of autotuning.
    os.environ.setdefault("LORA_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

from lora_kernels import backends  # noqa: E402

# --------------------------------------------------------------------------- #
# Two tiers
# --------------------------------------------------------------------------- #
# The default tier (the README's test command) checks every kernel family and every branch the GPU
# takes (the emulated sm_90/sm_80 targets) against float64, with one fp64 gradcheck, opcheck and
# fullgraph compile per family, in a few minutes on a 2-core CPU. Tests marked `extended` repeat
# those checks more widely, or are slow by nature (multi-process engines, whole training runs, the
# Triton compile check at every rank, gradcheck of every plan under the interpreter, builds of
# the extension): `--extended` runs them too, `--extended -m extended` them alone. CI runs both.
# NOTE: a marker, not a skip: what the default tier leaves out is deselected and counted in the
# summary line, so a green default run never reads as "everything ran".
EXTENDED_RUN = False  # set from the command line in pytest_configure, before test modules import


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the tests marked `extended` (slow or wider sweeps; CI runs them)")


def pytest_configure(config):
    global EXTENDED_RUN
    EXTENDED_RUN = bool(config.getoption("--extended"))
    config.addinivalue_line("markers", "extended: a test of the extended tier, run with --extended (CI runs it)")


def pytest_collection_modifyitems(config, items):
    if EXTENDED_RUN:
        return
    kept = [item for item in items if item.get_closest_marker("extended") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("extended")])
        items[:] = kept


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # (said whenever the extended tier is left out: under pytest-xdist the workers collect, so the
    # main process does not see what they deselected)
    if not EXTENDED_RUN:
        terminalreporter.write_line("default tier: the tests marked `extended` were not run; "
                                    "`python -m pytest python_tests --extended` runs them too (CI does)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def backend_param(name: str):
    """A pytest param for a backend, skipped (with the reason) where it cannot run on DEVICE."""
    why = backends.unavailable_reason(name, DEVICE)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason=why or "available"))


ALL_BACKENDS = [backend_param(name) for name in backends.BACKENDS]


def extended(value, **param_kwargs):
    """``value`` (a plain value or a ``pytest.param``) as a parameter of the extended tier."""
    if isinstance(value, type(pytest.param(None))):
        return pytest.param(*value.values, id=value.id, marks=(*value.marks, pytest.mark.extended))
    return pytest.param(value, marks=pytest.mark.extended, **param_kwargs)

# Backends that must run here (comma-separated), so that CI fails instead of skipping
# when, say, Triton stopped importing: LORA_KERNELS_REQUIRE=triton.
REQUIRED = [n for n in os.environ.get("LORA_KERNELS_REQUIRE", "").split(",") if n]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# Relative-error bounds against a float64 reference.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def identity_dropout_peft_model(p: float, d: int = 64):
    """A PEFT model of one ``proj`` layer whose zero base weight and identity factors make
    ``y = dropout_p(x)``: the kept fraction and the scale of a dropout mask become visible."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d, d, bias=False))
    model = get_peft_model(base, LoraConfig(r=d, lora_alpha=d, lora_dropout=p, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.default.weight.copy_(torch.eye(d))
        layer.lora_B.default.weight.copy_(torch.eye(d))
    return model
