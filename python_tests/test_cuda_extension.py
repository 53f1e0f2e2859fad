"""The compiled CUDA extension ``lora_kernels._C`` (the ``cuda`` backend).

Without a build with the CUDA kernels (none, or a CPU-only ``_C``: ``lora_kernels.cuda_ops``
raises ImportError) the whole file skips, with the reason, unless CI requires the
extension (``LORA_KERNELS_REQUIRE`` contains ``extension``), in which case it
fails. The registration tests run on the CPU; the kernel tests need a GPU and
compare against the float64 reference (:mod:`lora_kernels.reference`).
"""

import itertools
import os
from pathlib import Path

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from conftest import ON_GPU, REQUIRED, relative_error

try:
    import lora_kernels.cuda_ops  # noqa: F401  (ImportError: no _C, or one without the CUDA kernels)

    BUILT, WHY_NOT = True, ""
except ImportError as exc:
    BUILT, WHY_NOT = False, f"the CUDA kernels are not built ({exc})"
    if "extension" in REQUIRED:
        raise  # CI asked for the extension: a missing build is a failure, not a skip

pytestmark = pytest.mark.skipif(not BUILT, reason=WHY_NOT or "built")
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# The fp16/bf16 GEMM kernels a test runs: LORA_KERNELS_CUDA_GEMM=sm80 (cp.async + mma.sync, any
# GPU of compute capability 8.0+) or sm90 (TMA + wgmma; a 9.0 GPU and a build with 9.0a). With sm90,
# calls the sm_90a kernels cannot take (dropout in the backward, unaligned shapes) still run sm80.
GEMM_PATHS = ["sm80", "sm90"]


def _sm90_unavailable() -> str:
    if not ON_GPU:
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"the sm_90a kernels need a compute capability 9.0 GPU, got {torch.cuda.get_device_capability()}"
    return ""


@pytest.fixture(params=GEMM_PATHS)
def gemm_path(request, monkeypatch):
    """Runs the test once per GEMM path (the C++ launchers read the variable on every call)."""
    if request.param == "sm90":
        why = _sm90_unavailable()
        if why:
            pytest.skip(why)
    monkeypatch.setenv("LORA_KERNELS_CUDA_GEMM", request.param)
    if request.param == "sm90":
        x = torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16)
        try:
            torch.ops.lora_kernels.cuda_lora_forward(x, x, None, x, x, 1.0, 0.0, cuda_seed(0))
        except RuntimeError as exc:
            if "no sm_90a kernels" in str(exc):
                pytest.skip(str(exc))
            raise
    return request.param

# Relative error ‖out − ref‖ / ‖ref‖ against float64.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SCHEMAS = {
    "cuda_lora_forward": (
        "lora_kernels::cuda_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)"
    ),
    "cuda_lora_backward": (
        "lora_kernels::cuda_lora_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, "
        "Tensor lora_B, Tensor xa, float scaling, float dropout_p, Tensor seed, bool need_grad_x) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "cuda_lora_merge_": (
        "lora_kernels::cuda_lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()"
    ),
}


# --------------------------------------------------------------------------- #
# Registration (CPU)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_is_registered_with_its_schema(name):
    op = getattr(torch.ops.lora_kernels, name)
    assert str(op.default._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA")


def test_extension_coexists_with_the_python_ops():
    """The C++ TORCH_LIBRARY block and ops.py's custom_op fragment share the namespace."""
    assert torch.ops.lora_kernels.lora_forward.default._schema.name == "lora_kernels::lora_forward"
    assert torch.ops.lora_kernels.cuda_lora_forward.default._schema.name == "lora_kernels::cuda_lora_forward"


def test_extension_loads_before_the_python_package(tmp_path):
    """Loading the library first and importing the package after works too (the TORCH_LIBRARY block of
    csrc/lora.cpp and the fragments of csrc/cpu/dropout.cpp and ops.py, in that order)."""
    import subprocess
    import sys

    code = (
        "import glob, os, torch\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('lora_kernels')\n"
        "pkg = os.path.dirname(spec.origin)\n"
        "torch.ops.load_library(glob.glob(os.path.join(pkg, '_C*.so'))[0])\n"
        "import lora_kernels, lora_kernels.cuda_ops\n"
        "print(torch.ops.lora_kernels.lora_forward.default._schema.name,"
        " torch.ops.lora_kernels.cuda_lora_merge_.default._schema.name,"
        " torch.ops.lora_kernels.dropout_keep_mask.default._schema.name)\n"
    )
    # The package under test (this checkout), whatever else is installed.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "lora_kernels::lora_forward lora_kernels::cuda_lora_merge_ lora_kernels::dropout_keep_mask" in out.stdout


def test_cuda_backend_loads():
    from lora_kernels import backends

    assert backends._load("cuda")[0] is not None


# --------------------------------------------------------------------------- #
# The layer's autograd in C++ (cuda_lora_linear, csrc/autograd.cpp), on the CPU: the two ops
# it calls get CPU kernels here (the reference launchers), so its wiring runs without a GPU
# --------------------------------------------------------------------------- #

LINEAR_SCHEMA = ("lora_kernels::cuda_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
                 "Tensor lora_B, float scaling, float dropout_p, Tensor seed) -> Tensor")


@pytest.fixture
def reference_kernels():
    """CPU kernels for cuda_lora_forward / cuda_lora_backward: the reference launchers, recording their calls."""
    calls = []

    def forward(x, weight, bias, A, B, s, p, seed):
        calls.append(("forward", tuple(x.shape)))
        return reference.lora_forward(x, weight, bias, A, B, s, p, seed)

    def backward(dy, x, weight, A, B, xa, s, p, seed, need_x):
        calls.append(("backward", need_x))
        return reference.lora_backward(dy, x, weight, A, B, xa, s, p, seed, need_x)

    lib = torch.library.Library("lora_kernels", "IMPL")
    lib.impl("cuda_lora_forward", forward, "CPU")
    lib.impl("cuda_lora_backward", backward, "CPU")
    yield calls
    lib._destroy()


def test_linear_op_is_registered_with_its_autograd():
    op = torch.ops.lora_kernels.cuda_lora_linear.default
    assert str(op._schema) == LINEAR_SCHEMA
    for key in ("Autograd", "CompositeExplicitAutograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), key
    assert lk.backends.get("cuda").linear is lora_kernels.cuda_ops.lora_linear
    assert lk.backends.get("triton").linear is None and lk.backends.get("reference").linear is None


def _layer_inputs(lead, K, N, r, bias, frozen=True):
    x = torch.randn(*lead, K, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(N, K, dtype=torch.float64, requires_grad=not frozen)
    b = torch.randn(N, dtype=torch.float64, requires_grad=not frozen) if bias else None
    A = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    return x, weight, b, A, B


@pytest.mark.parametrize("lead,K,N,r", [((1,), 7, 9, 1), ((65,), 136, 20, 16), ((2, 5), 7, 65, 4), ((3, 1, 4), 9, 8, 3)],
                         ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained_base"])
def test_cpp_autograd_matches_the_fp64_reference(reference_kernels, lead, K, N, r, p, bias, frozen):
    x, weight, b, A, B = _layer_inputs(lead, K, N, r, bias, frozen)
    seed = torch.tensor(2**62 - 99)
    y = lora_kernels.cuda_ops.lora_linear(x, weight, b, A, B, 0.7, p, seed)
    assert "LoRALinearCuda" in y.grad_fn.name(), y.grad_fn.name()  # one C++ node, no Python Function
    assert y.shape == (*lead, N)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert reference_kernels == [("forward", (x[..., 0].numel(), K)), ("backward", True)]

    leaves = [t for t in (x, weight, b, A, B) if t is not None]
    grads = [t.grad for t in leaves]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    for t in ref:
        t.grad = None
    rx, rw, rb, rA, rB = ref if bias else (ref[0], ref[1], None, ref[2], ref[3])
    y64 = reference.lora_linear_reference(rx, rw, rb, rA, rB, 0.7, p, int(seed))
    y64.backward(dy)
    assert relative_error(y, y64) <= 1e-12
    for t, g, r64 in zip(leaves, grads, ref):
        if t.requires_grad:
            assert g is not None and relative_error(g, r64.grad) <= 1e-12
        else:
            assert g is None


def test_cpp_autograd_computes_only_the_gradients_asked_for(reference_kernels):
    x, weight, b, A, B = _layer_inputs((6,), 8, 5, 2, True)
    x.requires_grad_(False)
    y = lora_kernels.cuda_ops.lora_linear(x, weight, b, A, B, 1.0, 0.0, torch.zeros((), dtype=torch.int64))
    y.sum().backward()
    assert reference_kernels[-1] == ("backward", False)  # no dx kernel
    assert x.grad is None and weight.grad is None and A.grad is not None and B.grad is not None
    # Only the frozen bias asked for: no LoRA kernel at all.
    A.requires_grad_(False), B.requires_grad_(False), b.requires_grad_(True)
    reference_kernels.clear()
    lora_kernels.cuda_ops.lora_linear(x, weight, b, A, B, 1.0, 0.0, torch.zeros((), dtype=torch.int64)).sum().backward()
    assert reference_kernels == [("forward", (6, 8))]
    assert torch.equal(b.grad, torch.full_like(b, 6.0))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_autograd_gradcheck_fp64(reference_kernels, p):
    x, weight, b, A, B = _layer_inputs((2, 3), 5, 4, 2, True, frozen=False)
    seed = torch.tensor(77)
    fn = lambda *t: lora_kernels.cuda_ops.lora_linear(*t, 1.5, p, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, b, A, B))


def test_cpp_linear_in_inference_mode_and_no_grad(reference_kernels):
    x, weight, b, A, B = _layer_inputs((2, 3), 5, 4, 2, True)
    seed = torch.zeros((), dtype=torch.int64)
    want = reference.lora_linear_reference(x.detach(), weight, b, A.detach(), B.detach(), 0.5, 0.0, 0)
    with torch.inference_mode():  # below autograd: the CompositeExplicitAutograd kernel
        y = lora_kernels.cuda_ops.lora_linear(x, weight, b, A, B, 0.5, 0.0, seed)
    assert y.grad_fn is None and y.shape == (2, 3, 4) and relative_error(y, want) <= 1e-12
    with torch.no_grad():
        y = lora_kernels.cuda_ops.lora_linear(x, weight, b, A, B, 0.5, 0.0, seed)
    assert y.grad_fn is None and relative_error(y, want) <= 1e-12


# --------------------------------------------------------------------------- #
# Host-side plans (CPU): the launchers' own functions, through test-only ops
# --------------------------------------------------------------------------- #

# _cuda_gemm_plan(backward, M, N, K, r, misalign, dropout, cc_major, cc_minor, built, mode)
#   misalign: byte offsets of [x, w, l, u, c, bias] from 16-byte aligned addresses (bias < 0: none)
#   -> [sm90, eligible, gemm M, N, K, R, k-tiles of (X, W), k-tiles of (L, U)]
ALIGNED = [0, 0, 0, 0, 0, 0]


def gemm_plan(backward=False, M=300, N=512, K=1024, r=16, misalign=ALIGNED, dropout=False, cc=(9, 0),
              built=True, mode=None):
    return torch.ops.lora_kernels._cuda_gemm_plan(backward, M, N, K, r, misalign, dropout, cc[0], cc[1], built,
                                                  mode)


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("M,N,K,r", [(1, 8, 8, 8), (300, 512, 1024, 16), (129, 264, 520, 72), (5, 4096, 14336, 64)])
def test_sm90_gemm_plan_maps_the_operands_and_counts_k_tiles(backward, M, N, K, r):
    """Forward: C (M, N) reducing over K then r. Backward: dx (M, K) reducing over N (dy's columns) then r."""
    sm90, eligible, gM, gN, gK, gR, kt_base, kt_lora = gemm_plan(backward, M, N, K, r)
    assert (sm90, eligible) == (1, 1)
    assert (gM, gN, gK, gR) == ((M, K, N, r) if backward else (M, N, K, r))
    # The producer loads ceil(K'/64) k-tiles of (X, W), then ceil(r/64) of (L, U) from k = 0 of L, U.
    assert (kt_base, kt_lora) == (cdiv(gK, 64), cdiv(r, 64))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("operand", range(5), ids=["x", "w", "l", "u", "c"])
@pytest.mark.parametrize("offset", [2, 8])
def test_sm90_gemm_needs_every_tma_operand_16_byte_aligned(backward, operand, offset):
    misalign = list(ALIGNED)
    misalign[operand] = offset
    assert gemm_plan(backward, misalign=misalign)[:2] == [0, 0]


def test_sm90_gemm_bias_alignment_and_no_bias():
    assert gemm_plan(misalign=[0, 0, 0, 0, 0, 8])[:2] == [0, 0]
    assert gemm_plan(misalign=[0, 0, 0, 0, 0, -1])[:2] == [1, 1]  # no bias
    # The backward has no bias: its entry is ignored.
    assert gemm_plan(True, misalign=[0, 0, 0, 0, 0, 8])[:2] == [1, 1]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("field,value", [("r", 4), ("r", 12), ("K", 1020), ("N", 130), ("M", 2**31), ("r", 2**30)])
def test_sm90_gemm_refuses_strides_tma_cannot_take(backward, field, value):
    """Every row stride is a multiple of 8 elements (16 bytes) and the extents fit TMA's int32."""
    assert gemm_plan(backward, **{field: value})[:2] == [0, 0]


def test_sm90_gemm_backward_with_dropout_runs_sm80():
    assert gemm_plan(True, dropout=True)[:2] == [0, 0]
    assert gemm_plan(False, dropout=True)[:2] == [1, 1]  # the forward's mask is in the thin product


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (10, 0), (10, 3), (12, 0)], ids=str)
def test_only_compute_capability_9_0_runs_sm90a_code(cc):
    """sm_90a cubins run on 9.0 only; every other GPU takes the sm_80 kernels (JIT from compute_80 PTX on 10.x/12.x)."""
    assert gemm_plan(cc=cc)[:2] == [0, 1]
    assert gemm_plan(cc=cc, mode="auto")[0] == 0
    with pytest.raises(RuntimeError, match="needs a compute capability 9.0 GPU"):
        gemm_plan(cc=cc, mode="sm90")


def test_gemm_path_modes():
    assert gemm_plan(mode="sm80")[0] == 0
    assert gemm_plan(mode="sm90")[0] == 1
    assert gemm_plan(mode="")[0] == 1  # empty = auto
    assert gemm_plan(r=4, mode="sm90")[:2] == [0, 0]  # ineligible calls still run sm_80
    assert gemm_plan(built=False)[0] == 0
    with pytest.raises(RuntimeError, match="no sm_90a kernels"):
        gemm_plan(built=False, mode="sm90")
    with pytest.raises(RuntimeError, match="must be auto, sm80 or sm90, got 'fast'"):
        gemm_plan(mode="fast")


# _cuda_dy_pass_plan(M, N, r, sms) -> [bj, row_blocks, col_tiles, grid_m, grid_n, grid_j, rb, cb,
#   acc_smem_bytes, g_partial, db_partial, one_pass_bytes, two_pass_bytes, one_pass]
DY_FIELDS = ("bj row_blocks col_tiles grid_m grid_n grid_j rb cb acc_smem_bytes g_partial db_partial "
             "one_pass_bytes two_pass_bytes one_pass").split()
DY_ACC_BUDGET = 48 * 1024


def dy_pass_plan(M, N, r, sms):
    return dict(zip(DY_FIELDS, torch.ops.lora_kernels._cuda_dy_pass_plan(M, N, r, sms)))


def _skinny_splits(I, R, L, bj, sms):
    """launch_skinny's split-K of a tensor-core thin product (64-row blocks, l step 64)."""
    l_tiles = max(cdiv(L, 64), 1)
    blocks = cdiv(I, 64) * cdiv(R, bj)
    splits = min(l_tiles, cdiv(2 * sms, blocks), 256) if blocks < 2 * sms else 1
    return cdiv(l_tiles, cdiv(l_tiles, splits))


DY_SHAPES = [(1, 1, 1), (7, 65, 4), (1000, 130, 16), (65, 130, 72), (512, 4096, 16), (4096, 4096, 8),
             (8192, 4096, 16), (8192, 4096, 64), (8192, 14336, 16), (8192, 14336, 64), (100000, 64, 16),
             (3, 100000, 128)]


@pytest.mark.parametrize("sms", [1, 108, 132])
@pytest.mark.parametrize("M,N,r", DY_SHAPES, ids=lambda v: str(v))
def test_dy_pass_plan_covers_dy_once_and_minimises_partials(M, N, r, sms):
    p = dy_pass_plan(M, N, r, sms)
    assert p["bj"] == (16 if r <= 16 else 32 if r <= 32 else 64)
    assert p["grid_j"] == cdiv(r, p["bj"])
    assert (p["row_blocks"], p["col_tiles"]) == (cdiv(M, 64), cdiv(N, 64))
    # The ranges tile the row blocks and the column tiles exactly, none empty.
    for n, size, tiles in (("grid_m", "rb", "row_blocks"), ("grid_n", "cb", "col_tiles")):
        assert (p[n] - 1) * p[size] < p[tiles] <= p[n] * p[size]
    # The dB accumulators fit the shared-memory budget the launcher sets.
    assert p["acc_smem_bytes"] == p["cb"] * 64 * p["bj"] * 4 <= DY_ACC_BUDGET
    # Partials exist exactly where a range does not span the whole axis.
    assert p["g_partial"] == (p["grid_n"] * M * r if p["grid_n"] > 1 else 0)
    assert p["db_partial"] == (p["grid_m"] * N * r if p["grid_m"] > 1 else 0)
    # Enough programs: 2 per SM and j tile, or every tile of dy.
    want = min(max(1, cdiv(2 * sms, p["grid_j"])), p["row_blocks"] * p["col_tiles"])
    assert p["grid_m"] * p["grid_n"] >= want
    # No other split with enough programs moves fewer partial bytes (brute force).
    cb_max = max(1, DY_ACC_BUDGET // (64 * p["bj"] * 4))
    cost = lambda gm, gn: (gn * M if gn > 1 else 0) + (gm * N if gm > 1 else 0)  # noqa: E731
    best = min(
        cost(cdiv(p["row_blocks"], rb), cdiv(p["col_tiles"], cb))
        for cb in range(1, min(cb_max, p["col_tiles"]) + 1)
        for rb in range(1, p["row_blocks"] + 1)
        if cdiv(p["row_blocks"], rb) * cdiv(p["col_tiles"], cb) >= want
    ) if p["row_blocks"] * p["col_tiles"] <= 20000 else None
    if best is not None:
        assert cost(p["grid_m"], p["grid_n"]) == best
    # The cost model: dy once vs twice, plus the fp32 partials written and read.
    dy = 2 * M * N * p["grid_j"]
    assert p["one_pass_bytes"] == dy + 8 * (p["g_partial"] + p["db_partial"])
    sg, sd = _skinny_splits(M, r, N, p["bj"], sms), _skinny_splits(N, r, M, p["bj"], sms)
    assert p["two_pass_bytes"] == 2 * dy + 8 * ((sg * M * r if sg > 1 else 0) + (sd * N * r if sd > 1 else 0))
    assert p["one_pass"] == int(p["one_pass_bytes"] < p["two_pass_bytes"])


def test_dy_pass_is_one_pass_at_the_default_ranks():
    """From 2048 tokens at r <= 32 on an H100 (132 SMs) the model picks one pass over dy, and it saves
    at least 15 % of the bytes; at r = 64 the partials cost about what a second read of dy does."""
    for M, N, r in [(2048, 4096, 16), (4096, 4096, 8), (8192, 4096, 16), (8192, 14336, 16), (8192, 4096, 32)]:
        p = dy_pass_plan(M, N, r, 132)
        assert p["one_pass"] == 1, (M, N, r, p)
        assert p["one_pass_bytes"] < 0.85 * p["two_pass_bytes"], (M, N, r, p)


# Shapes of the GPU test of the pass over dy; on an H100 (132 SMs) they take every regime of the plan.
DY_PASS_GPU_SHAPES = [(4096, 2048, 16), (2048, 1000, 12), (777, 4104, 72), (3000, 130, 8), (20000, 64, 16),
                      (64, 20000, 16), (1500, 1030, 40)]


def test_dy_pass_gpu_shapes_cover_every_regime_on_an_h100():
    plans = [dy_pass_plan(M, N, r, 132) | {"M": M, "N": N, "r": r} for M, N, r in DY_PASS_GPU_SHAPES]
    one = [p for p in plans if p["one_pass"]]
    assert any(p["rb"] > 1 and p["cb"] > 1 and p["grid_m"] > 1 and p["grid_n"] > 1 for p in one)
    assert any(p["grid_j"] > 1 for p in one)  # r > 64: j tiles
    assert any(p["grid_m"] == 1 for p in one) and any(p["grid_n"] == 1 for p in one)  # no partials on an axis
    assert any(p["N"] % 8 for p in one) and any(p["r"] % 8 for p in one)  # scalar loads at ragged edges
    assert any(p["M"] % 64 for p in one)
    assert any(not p["one_pass"] for p in plans)  # and the two thin products


def test_dy_pass_plan_refuses_empty_problems():
    with pytest.raises(RuntimeError, match="must be positive"):
        dy_pass_plan(0, 64, 16, 132)


# --------------------------------------------------------------------------- #
# Kernels against the float64 reference (GPU)
# --------------------------------------------------------------------------- #


def make(M, K, N, r, dtype, bias=True, device="cuda"):
    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(N, r, device=device).to(dtype)
    dy = torch.randn(M, N, device=device).to(dtype)
    return x, weight, b, A, B, dy


def cuda_seed(seed: int) -> torch.Tensor:
    """The ops' seed argument: a 0-dim int64 tensor on the GPU, read by the kernels."""
    return torch.tensor(seed, dtype=torch.int64, device="cuda")


def forward_backward_match_reference(x, weight, b, A, B, dy, s, p, seed, dtype):
    """The CUDA ops on these (possibly strided or misaligned) tensors against the fp64 reference."""
    ops = torch.ops.lora_kernels
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y, xa = ops.cuda_lora_forward(x, weight, b, A, B, s, p, cuda_seed(seed))
    y64, _ = reference.lora_forward(d(x), d(weight), d(b), d(A), d(B), s, p, seed)
    check("y", y, y64, dtype)
    dx, dA, dB = ops.cuda_lora_backward(dy, x, weight, A, B, xa, s, p, cuda_seed(seed), True)
    ref = reference.lora_backward(d(dy), d(x), d(weight), d(A), d(B), d(xa), s, p, seed, True)
    for name, out, r64 in zip(("dx", "dA", "dB"), (dx, dA, dB), ref):
        check(name, out, r64, dtype)


def check(name, out, ref, dtype):
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = relative_error(out, ref)
    assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


SIZES_M = [1, 7, 65, 1000]
SIZES_KN = [1, 7, 65, 130]
RANKS = [1, 4, 16]
SHAPES = list(itertools.product(SIZES_M, SIZES_KN, SIZES_KN, RANKS))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_fp64_reference(shape, dtype):
    M, K, N, r = shape
    p = 0.3 if (M + K + N + r) % 2 else 0.0  # half the shapes with dropout
    seed, s = 2**62 - 12345, 0.7
    x, weight, b, A, B, dy = make(M, K, N, r, dtype, bias=(K % 2 == 1))
    ops = torch.ops.lora_kernels
    y, xa = ops.cuda_lora_forward(x, weight, b, A, B, s, p, cuda_seed(seed))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y64, xa64 = reference.lora_forward(d(x), d(weight), d(b), d(A), d(B), s, p, seed)
    check("y", y, y64, dtype)
    check("xa", xa, xa64, dtype)

    # Backward from the reference's xa (rounded to dtype), so each op is tested on its own.
    xa_in = xa64.to(dtype)
    dx, dA, dB = ops.cuda_lora_backward(dy, x, weight, A, B, xa_in, s, p, cuda_seed(seed), True)
    dx64, dA64, dB64 = reference.lora_backward(d(dy), d(x), d(weight), d(A), d(B), d(xa_in), s, p, seed, True)
    check("dx", dx, dx64, dtype)
    check("dA", dA, dA64, dtype)
    check("dB", dB, dB64, dtype)

    dx_none, dA2, dB2 = ops.cuda_lora_backward(dy, x, weight, A, B, xa_in, s, p, cuda_seed(seed), False)
    assert dx_none.numel() == 0
    assert torch.equal(dA2, dA) and torch.equal(dB2, dB)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,r", DY_PASS_GPU_SHAPES, ids=lambda v: str(v))
def test_dy_pass_matches_fp64_reference_and_is_deterministic(M, N, r, dtype):
    """g (through dA) and dB of the backward, on whichever plan the GPU's SM count gives."""
    K = 40
    x, weight, _, A, B, dy = make(M, K, N, r, dtype, bias=False)
    s = 0.5
    ops = torch.ops.lora_kernels
    _, xa = ops.cuda_lora_forward(x, weight, None, A, B, s, 0.0, cuda_seed(0))
    runs = [ops.cuda_lora_backward(dy, x, weight, A, B, xa, s, 0.0, cuda_seed(0), False) for _ in range(2)]
    d = lambda t: t.double()  # noqa: E731
    _, dA64, dB64 = reference.lora_backward(d(dy), d(x), d(weight), d(A), d(B), d(xa), s, 0.0, 0, False)
    check("dA", runs[0][1], dA64, dtype)
    check("dB", runs[0][2], dB64, dtype)
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2]), "not deterministic"


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(512, 1024, 768, 64), (257, 520, 130, 128), (3, 4096, 256, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_larger_shapes(shape, dtype, gemm_path):
    """Many k-tiles through the pipeline, ranks spanning several tiles, long thin reductions."""
    M, K, N, r = shape
    x, weight, b, A, B, dy = make(M, K, N, r, dtype)
    forward_backward_match_reference(x, weight, b, A, B, dy, 0.5, 0.1, 7, dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_strided_inputs(dtype, gemm_path):
    """Tensors whose data pointer is not 16-byte aligned take the scalar-load path."""
    M, K, N, r = 33, 64, 48, 8
    x, weight, b, A, B, dy = make(M, K, N, r, dtype)
    x_mis = torch.empty(M * K + 1, device="cuda", dtype=dtype)[1:].view(M, K)
    x_mis.copy_(x)
    w_t = weight.t().contiguous().t()  # non-contiguous view with the same values
    forward_backward_match_reference(x_mis, w_t, b, A, B, dy, 1.25, 0.2, 99, dtype)


# Shapes the sm_90a kernels take (K, N, r multiples of 8): one k-tile or less (K = 8), every
# tile width of the tensor-core thin products (r = 8, 16, 32, 64, 72), ranks above
# one 64-wide k-tile (72), partial tiles on every edge, and more output tiles than SMs (2048 x 4096
# in 128 x 256 tiles, in the forward and in the backward) so that the persistent scheduler loops.
SM90_SHAPES = [(1, 8, 8, 8), (7, 64, 136, 16), (65, 520, 264, 72), (300, 72, 1032, 64), (1000, 4096, 384, 32),
               (2048, 512, 4096, 16), (2048, 4096, 512, 16)]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_paths_match_fp64_reference(shape, bias, dtype, gemm_path):
    """Forward and every gradient, without dropout: on sm90 both GEMMs run the sm_90a kernels."""
    M, K, N, r = shape
    x, weight, b, A, B, dy = make(M, K, N, r, dtype, bias=bias)
    forward_backward_match_reference(x, weight, b, A, B, dy, 0.75, 0.0, 11, dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(65, 520, 264, 16), (513, 1024, 768, 64)], ids=lambda s: "x".join(map(str, s)))
def test_gemm_paths_with_dropout(shape, dtype, gemm_path):
    """With dropout the forward GEMM still runs sm_90a on sm90; the backward's runs sm_80."""
    M, K, N, r = shape
    x, weight, b, A, B, dy = make(M, K, N, r, dtype)
    forward_backward_match_reference(x, weight, b, A, B, dy, 0.5, 0.1, 2**40 + 3, dtype)


@requires_gpu
def test_gemm_path_variable_is_checked(monkeypatch):
    x, weight, b, A, B, _ = make(8, 8, 8, 8, torch.float16)
    monkeypatch.setenv("LORA_KERNELS_CUDA_GEMM", "hopper")
    with pytest.raises(RuntimeError, match="LORA_KERNELS_CUDA_GEMM must be auto, sm80 or sm90"):
        torch.ops.lora_kernels.cuda_lora_forward(x, weight, b, A, B, 1.0, 0.0, cuda_seed(0))
    if torch.cuda.get_device_capability() != (9, 0):
        monkeypatch.setenv("LORA_KERNELS_CUDA_GEMM", "sm90")
        with pytest.raises(RuntimeError, match="compute capability 9.0|no sm_90a kernels"):
            torch.ops.lora_kernels.cuda_lora_forward(x, weight, b, A, B, 1.0, 0.0, cuda_seed(0))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", [(1, 7), (65, 130), (1000, 65), (9, 4)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_bit_identical_to_the_reference(M, K, p, dtype, gemm_path):
    """Choose the factors so that the gradients reveal the mask exactly.

    Forward: A = I (r = K), x = 1, so xa = D. Backward: W0 = 0, A = B = dy = 1
    (r = 1), so dx = s·N·D; dA = gᵀ D is the mask's column sums (checked too).
    """
    seed = 2**62 - 1 - K
    keep = reference.dropout_keep_mask(M, K, p, seed, device="cuda")
    ops = torch.ops.lora_kernels
    x = torch.ones(M, K, device="cuda", dtype=dtype)
    eye = torch.eye(K, device="cuda", dtype=dtype)
    _, xa = ops.cuda_lora_forward(x, torch.zeros(3, K, device="cuda", dtype=dtype), None, eye,
                                  torch.ones(3, K, device="cuda", dtype=dtype), 1.0, p, cuda_seed(seed))
    assert torch.equal(xa != 0, keep), "forward mask differs from reference.dropout_keep_mask"

    N = 5
    weight = torch.zeros(N, K, device="cuda", dtype=dtype)
    A = torch.ones(1, K, device="cuda", dtype=dtype)
    B = torch.ones(N, 1, device="cuda", dtype=dtype)
    dy = torch.ones(M, N, device="cuda", dtype=dtype)
    xa1 = torch.ones(M, 1, device="cuda", dtype=dtype)
    dx, dA, _ = ops.cuda_lora_backward(dy, x, weight, A, B, xa1, 1.0, p, cuda_seed(seed), True)
    assert torch.equal(dx != 0, keep), "backward mask (dx) differs from reference.dropout_keep_mask"
    expected = (keep.double().sum(0) * N / (1 - p)).to(dtype)
    assert torch.allclose(dA[0].double(), expected.double(), rtol=TOL[dtype]), "backward mask (dA)"


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_3d_input_through_the_cuda_backend(dtype, p):
    x, weight, b, A, B, _ = make(2 * 3 * 7, 65, 33, 4, dtype)
    x3 = x.view(2, 21, 65).requires_grad_(True)
    A_ = A.clone().requires_grad_(True)
    B_ = B.clone().requires_grad_(True)
    y = lk.lora_linear(x3, weight, b, A_, B_, 0.5, dropout_p=p, backend="cuda", seed=1234)
    assert y.shape == (2, 21, 33)
    assert "LoRALinearCuda" in y.grad_fn.name()  # eager: the autograd in C++ (csrc/autograd.cpp)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x3.detach().double().requires_grad_(True)
    A64 = A.double().requires_grad_(True)
    B64 = B.double().requires_grad_(True)
    y64 = reference.lora_linear_reference(x64, weight.double(), b.double(), A64, B64, 0.5, p, 1234)
    y64.backward(dy.double())
    check("y", y, y64, dtype)
    check("dx", x3.grad, x64.grad, dtype)
    check("dA", A_.grad, A64.grad, dtype)
    check("dB", B_.grad, B64.grad, dtype)


@requires_gpu
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64_through_the_kernels(p):
    x, weight, b, A, B, _ = make(5, 9, 6, 3, torch.float64)
    args = [t.requires_grad_(True) for t in (x, A, B)]
    fn = lambda x, A, B: lk.lora_linear(x, weight, b, A, B, 1.5, dropout_p=p, backend="cuda", seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("factor_dtype", ["same", torch.float32])
@pytest.mark.parametrize("N,K,r", [(1, 1, 1), (7, 65, 4), (130, 7, 16), (257, 1030, 64), (64, 128, 3)])
def test_merge_matches_reference(dtype, factor_dtype, N, K, r):
    fdtype = dtype if factor_dtype == "same" else factor_dtype
    weight = torch.randn(N, K, device="cuda").to(dtype)
    A = (torch.randn(r, K, device="cuda") / K**0.5).to(fdtype)
    B = torch.randn(N, r, device="cuda").to(fdtype)
    s = 0.37
    expected = weight.double() + s * (B.double() @ A.double())
    merged = weight.clone()
    torch.ops.lora_kernels.cuda_lora_merge_(merged, A, B, s)
    check("merged", merged, expected, dtype)
    # Within one rounding of the exact result, element-wise (plus the fp32 product's own error).
    big = torch.maximum(weight.double().abs(), expected.abs()).to(dtype)
    ulp = torch.nextafter(big, torch.full_like(big, float("inf"))).double() - big.double()
    slack = 1e-6 * (weight.double().abs() + s * (B.double().abs() @ A.double().abs()))
    if dtype == torch.float64:
        slack = slack * 1e-8
    assert ((merged.double() - expected).abs() <= ulp + slack).all()
    # Unmerge comes back within one rounding.
    torch.ops.lora_kernels.cuda_lora_merge_(merged, A, B, -s)
    assert ((merged.double() - weight.double()).abs() <= 2 * ulp + 2 * slack).all()


@requires_gpu
def test_merge_into_a_strided_weight():
    weight = torch.randn(65, 40, device="cuda")
    w_t = weight.t()  # (40, 65), not contiguous
    A, B = torch.randn(3, 65, device="cuda"), torch.randn(40, 3, device="cuda")
    expected = w_t.double() + 0.5 * (B.double() @ A.double())
    torch.ops.lora_kernels.cuda_lora_merge_(w_t, A, B, 0.5)
    check("merged", w_t, expected, torch.float32)


@requires_gpu
def test_empty_token_batch():
    x, weight, b, A, B, dy = make(0, 16, 8, 4, torch.float16)
    y, xa = torch.ops.lora_kernels.cuda_lora_forward(x, weight, b, A, B, 1.0, 0.1, 5)
    assert y.shape == (0, 8) and xa.shape == (0, 4)
    dx, dA, dB = torch.ops.lora_kernels.cuda_lora_backward(dy, x, weight, A, B, xa, 1.0, 0.1, 5, True)
    assert dx.shape == (0, 16) and (dA == 0).all() and (dB == 0).all()


@requires_gpu
def test_bad_inputs_are_refused():
    x, weight, b, A, B, _ = make(4, 8, 6, 2, torch.float32)
    with pytest.raises(RuntimeError, match="lora_A must have shape"):
        torch.ops.lora_kernels.cuda_lora_forward(x, weight, b, A[:, :4], B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.lora_kernels.cuda_lora_forward(x.half(), weight, b, A, B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.lora_kernels.cuda_lora_forward(x.cpu(), weight, b, A, B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.lora_kernels.cuda_lora_forward(x, weight, b, A, B, 1.0, 1.0, 0)
