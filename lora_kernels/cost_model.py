"""A roofline cost model of the LoRA layer, its plans, and the layers it is compared with.

Every launch is described by its tensor-core FLOPs, its HBM bytes and its SIMT
work (Philox calls for the dropout mask), and costs

    time = max(flops / (tensor rate · wave efficiency) + simt / SIMT rate,  bytes / bandwidth) + launch gap

with achievable (not peak) rates looked up per device (:data:`DEVICES`). The
assumptions, written once (docs/cost_model.md has the formulas and the table):

- Re-reads that hit L2 are free: a GEMM reads each operand from HBM once
  (grouped tile order), and small operands (A, B, xa, g, partials read back by
  the same launch) are read once per launch.
- Tensor work runs at the GEMM rate whatever its shape (the rank-r products
  included); SIMT work (Philox) does not overlap the tensor work of its launch
  (conservative: Hopper's asynchronous wgmma could hide part of it).
- GEMM-shaped launches lose a wave-quantisation factor (tiles / (waves · SMs));
  thin launches split their reduction until they fill the GPU.
- Each launch pays a fixed GPU-side gap (``launch_s``); host cost per launch is
  a parameter (``host_s``): a step takes ``max(GPU time, host time)``.

:func:`choose_forward_plan` and :func:`choose_backward_plan` are what the Triton
launcher calls on every forward and backward: pure arithmetic behind an
``lru_cache``, device numbers cached per device.

``python -m lora_kernels.cost_model --table`` prints the predicted ratios for the
default benchmark shapes (the table in docs/cost_model.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence

import torch

from ._runtime import emulated_target

FORWARD_PLANS = ("fused", "two_pass")
# Every plan predict() knows: ours ("auto" is the forward plan choose_forward_plan picks), the frozen
# layer (the floor) and the peers.
PLANS = ("auto", "fused", "two_pass", "frozen", "unsloth", "peft",
         "qlora", "qlora_fused", "qlora_dequant", "qlora_unsloth", "qlora_peft")
# DoRA (lora_kernels.dora): ours is the fused layer (its forward plan chosen as for "auto") plus the
# row norms and the column scale; PEFT's builds B A and W0 + s·B A every call (dora_launches).
DORA_PLANS = ("dora", "peft_dora")
MODES = ("fwd", "fwd+bwd")

# Philox-4x32-10 call (4 mask elements): 10 rounds of 2 wide multiplies, 2 three-way xors and 2 key
# bumps, plus the four threshold compares and selects: ~100 SIMT instructions.
PHILOX_OPS = 100
BYTES_FP32 = 4


@dataclass(frozen=True)
class DeviceSpec:
    """Achievable rates of one GPU (not datasheet peaks)."""

    name: str
    tensor_flops: float  # fp16/bf16 dense tensor-core FLOP/s
    fp32_flops: float  # fp32 FMA (SIMT) FLOP/s: fp32 GEMMs run here (IEEE, no TF32)
    fp64_flops: float  # fp64 FLOP/s (tensor cores where the GPU has them)
    simt_ops: float  # 32-bit SIMT instructions per second (Philox)
    bandwidth: float  # HBM copy bandwidth, bytes/s
    sms: int
    launch_s: float = 4e-6  # GPU-side cost of one launch (gap, prologue, tail)

    def matmul_flops(self, dtype: torch.dtype) -> float:
        if dtype in (torch.float16, torch.bfloat16):
            return self.tensor_flops
        return self.fp64_flops if dtype == torch.float64 else self.fp32_flops


# NOTE: ~75 % of the dense bf16 peak and ~90 % of the HBM peak are what a tuned GEMM and a copy
# reach; fp32 FMA at 80 % of peak; SIMT instructions at the fp32 FMA instruction rate.
DEVICES = {
    "H100": DeviceSpec("H100 SXM", 750e12, 54e12, 54e12, 27e12, 3.0e12, 132),
    "H100 PCIe": DeviceSpec("H100 PCIe", 570e12, 41e12, 41e12, 20e12, 1.8e12, 114),
    "H200": DeviceSpec("H200 SXM", 750e12, 54e12, 54e12, 27e12, 4.3e12, 132),
    "A100": DeviceSpec("A100 SXM", 240e12, 15.6e12, 15.6e12, 7.8e12, 1.75e12, 108),
}
DEFAULT_DEVICE = "H100"


def spec_for(name: str = "", capability: tuple[int, int] = (0, 0)) -> DeviceSpec:
    """The table entry for a device name (``"NVIDIA H100 80GB HBM3"``), else by compute capability,
    else the H100's."""
    upper = name.upper()
    for key in ("H100 PCIe", "H200", "H100", "A100"):
        if all(part.upper() in upper for part in key.split()):
            return DEVICES[key]
    if capability[0] == 8:
        return DEVICES["A100"]
    return DEVICES[DEFAULT_DEVICE]


@functools.lru_cache(maxsize=None)
def _cuda_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    return replace(spec_for(props.name, (props.major, props.minor)), sms=props.multi_processor_count)


def device_spec(device=None) -> DeviceSpec:
    """Numbers for ``device`` (a ``torch.device``, a string, a :class:`DeviceSpec`, or None):
    a CUDA device's by its name (cached per device), an emulated target's chip while one is set
    (lora_kernels._runtime); anything else gets the H100's."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, str) and device in DEVICES:
        return DEVICES[device]
    emulated = emulated_target()
    if emulated is not None:  # an emulated GPU target decides as its chip would
        return replace(spec_for(emulated.name, emulated.capability), sms=emulated.sms)
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())
    return DEVICES[DEFAULT_DEVICE]


@dataclass(frozen=True)
class Tiling:
    """Block sizes the model assumes for the GEMM-shaped launches (ours and cuBLAS's alike)."""

    block_m: int = 128
    block_n: int = 256
    run_length: int = 8  # row blocks per fp32 partial of dA/dB in the fused backward


DEFAULT_TILING = Tiling()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: tensor-core FLOPs, HBM bytes, Philox calls, and its output tiles (0: a
    thin or elementwise launch that fills the GPU)."""

    name: str
    flops: float
    bytes: float
    philox: float = 0.0
    tiles: int = 0
    simt: float = 0.0  # other SIMT instructions (dequantising a 4-bit W0)

    def time(self, spec: DeviceSpec, dtype: torch.dtype) -> float:
        waves = math.ceil(self.tiles / spec.sms) if self.tiles else 1
        efficiency = self.tiles / (waves * spec.sms) if self.tiles else 1.0
        compute = (self.flops / (spec.matmul_flops(dtype) * efficiency)
                   + (self.philox * PHILOX_OPS + self.simt) / spec.simt_ops)
        return max(compute, self.bytes / spec.bandwidth) + spec.launch_s


@dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int
    e: int  # bytes per element
    dropout: bool
    tiling: Tiling = DEFAULT_TILING

    def tiles(self, rows: int, cols: int) -> int:
        return math.ceil(rows / self.tiling.block_m) * math.ceil(cols / self.tiling.block_n)


def _gemm(name: str, s: Shape, rows: int, cols: int, inner: int, extra_flops: float = 0.0,
          extra_bytes: float = 0.0, philox: float = 0.0, c_read: bool = False) -> Launch:
    """C (rows, cols) = P (rows, inner) Qᵀ: reads P and Q once, writes C (reads it too for beta=1)."""
    e = s.e
    bytes_ = e * (rows * inner + cols * inner + rows * cols * (2 if c_read else 1)) + extra_bytes
    return Launch(name, 2.0 * rows * cols * inner + extra_flops, bytes_, philox, s.tiles(rows, cols))


def _thin(name: str, s: Shape, rows: int, long: int, r: int, bytes_: float, philox: float = 0.0,
          products: int = 1) -> Launch:
    """A memory-bound rank-r pass over a (rows, long) operand: ``products`` thin products of 2·rows·long·r."""
    return Launch(name, 2.0 * products * rows * long * r, bytes_, philox)


# The g pass of the "g_pass" backward (triton_ops._g_pass): one program per G_PASS_ROWS rows and
# split of N, with as many splits (of at least G_PASS_SPLIT columns) as fill the GPU.
G_PASS_ROWS, G_PASS_SPLIT = 32, 128
# The kernels' rank limits (triton_ops; test_cost_model keeps them equal): the fused forward holds
# xa for r <= FUSED_MAX_RANK, and above RANK_CHUNK the backward goes by rank chunks with g from the
# g pass, dx or not. The choices below pick among the plans that can run.
FUSED_MAX_RANK, RANK_CHUNK = 64, 64


def g_pass_splits(M: int, N: int, sms: int = DEVICES[DEFAULT_DEVICE].sms) -> int:
    """Splits of N of the g pass: one unless its row blocks alone leave SMs idle."""
    return max(1, min(math.ceil(N / G_PASS_SPLIT), sms // math.ceil(M / G_PASS_ROWS)))


def _dropout_calls(s: Shape) -> float:
    return s.M * s.K / 4 if s.dropout else 0.0


def forward_launches(plan: str, s: Shape) -> list[Launch]:
    """The launches of one forward under ``plan`` (see :data:`PLANS`; not ``"auto"``)."""
    M, K, N, r, e = s.M, s.K, s.N, s.r, s.e
    col_blocks = math.ceil(N / s.tiling.block_n)
    if plan == "frozen":
        return [_gemm("y = x W0ᵀ", s, M, N, K)]
    if plan == "fused":
        # xa accumulated from the x tiles of the main loop, redundantly in every column block.
        return [_gemm("y = x W0ᵀ + s·(x⊙D)Aᵀ Bᵀ (xa in the main loop)", s, M, N, K,
                      extra_flops=2.0 * M * K * r * col_blocks + 2.0 * M * N * r,
                      extra_bytes=e * (K * r + N * r + M * r), philox=_dropout_calls(s) * col_blocks)]
    if plan == "two_pass":
        return [_thin("xa = s·(x⊙D)Aᵀ", s, M, K, r, e * (M * K + K * r + M * r), _dropout_calls(s)),
                _gemm("y = x W0ᵀ + xa Bᵀ", s, M, N, K, extra_flops=2.0 * M * N * r,
                      extra_bytes=e * (M * r + N * r))]
    if plan in ("unsloth", "peft"):
        out = []
        if s.dropout:  # native_dropout: reads x, writes x⊙D and the bool mask
            out.append(Launch("x⊙D (native_dropout)", 0.0, M * K * (2 * e + 1), M * K / 4))
        out.append(_gemm("y = x W0ᵀ", s, M, N, K))
        out.append(_thin("xa = (x⊙D) Aᵀ", s, M, K, r, e * (M * K + K * r + M * r)))
        if plan == "unsloth":
            out.append(_gemm("y.addmm_(xa, Bᵀ, alpha=s)", s, M, N, r, c_read=True))
        else:
            out.append(_gemm("t = xa Bᵀ", s, M, N, r))
            out.append(Launch("t * s", 0.0, 2 * e * M * N))
            out.append(Launch("y + t", 0.0, 3 * e * M * N))
        return out
    raise ValueError(f"unknown plan {plan!r}; expected one of {PLANS[1:]}")


BACKWARD_PLANS = ("fused", "g_pass")


def backward_launches(plan: str, s: Shape, need_grad_x: bool = True, backward: str = "fused") -> list[Launch]:
    """The launches of one backward (gradients of x when ``need_grad_x``, A and B; W0 frozen).

    For our plans, ``backward`` picks how the dx launch gets g = s·dy B: ``"fused"`` (recomputed
    in the dx GEMM's main loop, in every column block of dx; two launches) or ``"g_pass"`` (a thin
    pass over dy first; three launches). Without dx both are the same one pass, except above
    RANK_CHUNK, where g comes from the g pass whatever the plan (three launches).
    """
    if backward not in BACKWARD_PLANS:
        raise ValueError(f"unknown backward plan {backward!r}; expected one of {BACKWARD_PLANS}")
    M, K, N, r, e = s.M, s.K, s.N, s.r, s.e
    if plan == "frozen":
        return [_gemm("dx = dy W0", s, M, K, N)] if need_grad_x else []
    if plan in ("auto", "fused", "two_pass"):
        row_blocks = math.ceil(M / s.tiling.block_m)
        runs = math.ceil(row_blocks / s.tiling.run_length)
        partials = BYTES_FP32 * runs * (N + K) * r
        reduce = Launch("dA, dB = ordered sum of the partials", 0.0, partials + e * (N + K) * r)
        if not need_grad_x and r > RANK_CHUNK:
            # Rank chunks: g from the g pass, then one pass over the rows for the dB partials from dy
            # and xa and the dA partials from x and g (triton_ops.backward_plan; dx or not).
            g_parts = BYTES_FP32 * g_pass_splits(M, N) * M * r
            return [_thin("g = s·dy B (thin pass over dy)", s, M, N, r, e * (M * N + N * r) + g_parts),
                    Launch("dA, dB partials, g from the g pass (no dx)", 2.0 * (M * N * r + M * K * r),
                           e * (M * N + M * K + M * r) + g_parts + partials, _dropout_calls(s)),
                    reduce]
        if not need_grad_x:
            # One thin pass over the rows: g and the dB partials from dy, the dA partials from x.
            return [Launch("g = s·dy B; dA, dB partials (no dx)", 2.0 * (2 * M * N * r + M * K * r),
                           e * (M * N + M * K + M * r + N * r) + partials, _dropout_calls(s)),
                    reduce]
        if backward == "g_pass":
            # A thin pass over dy writes fp32 partials of g over S splits of N (S = 1 from ~4200
            # tokens on an H100); the dx GEMM sums them, takes the dB partials from its dy tiles as
            # the fused plan does, and the dA partials from x's tile.
            # NOTE: S assumes an H100's SM count (backward_launches knows no device); S·M·r·4 bytes
            # are ~1 MB at most, so the device hardly matters.
            g_parts = BYTES_FP32 * g_pass_splits(M, N) * M * r
            return [_thin("g = s·dy B (thin pass over dy)", s, M, N, r, e * (M * N + N * r) + g_parts),
                    _gemm("dx = dy W0 + (gA)⊙D; dA and dB partials", s, M, K, N,
                          extra_flops=2.0 * 2 * M * K * r + 2.0 * M * N * r,
                          extra_bytes=e * (M * K + M * r + N * r + K * r) + g_parts + partials,
                          philox=_dropout_calls(s)),
                    reduce]
        # g is recomputed from the dy tiles in every column block of dx; x is read once, for dA and the mask.
        col_blocks = math.ceil(K / s.tiling.block_n)
        dx = _gemm("dx = dy W0 + (gA)⊙D; g, dA and dB partials", s, M, K, N,
                   extra_flops=2.0 * M * N * r * col_blocks + 2.0 * 2 * M * K * r + 2.0 * M * N * r,
                   extra_bytes=e * (M * K + M * r + N * r + K * r) + partials, philox=_dropout_calls(s))
        return [dx, reduce]
    if plan in ("unsloth", "peft"):
        xd = "x⊙D" if s.dropout else "x"
        out = []
        if plan == "peft":
            out.append(Launch("dt = dy * s", 0.0, 2 * e * M * N))
        out += [_thin("dB = dyᵀ xa", s, M, N, r, e * (M * N + M * r + N * r)),
                _thin("g = dy B", s, M, N, r, e * (M * N + N * r + M * r)),
                _thin(f"dA = gᵀ {xd}", s, M, K, r, e * (M * r + M * K + K * r))]
        if not need_grad_x:
            return out
        out.append(_gemm("dx = dy W0", s, M, K, N))
        if plan == "unsloth" and not s.dropout:
            out.append(_gemm("dx.addmm_(g, A, alpha=s)", s, M, K, r, c_read=True))
            return out
        out.append(_gemm("g A", s, M, K, r))
        if s.dropout:
            out.append(Launch("(g A) ⊙ mask", 0.0, M * K * (2 * e + 1)))
        out.append(Launch("dx += lora term", 0.0, 3 * e * M * K))
        return out
    raise ValueError(f"unknown plan {plan!r}; expected one of {PLANS}")


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one plan in one mode, and its ratio to the frozen layer in the same mode."""

    plan: str
    mode: str
    seconds: float
    frozen_seconds: float
    launches: tuple[Launch, ...] = field(repr=False)

    @property
    def ratio(self) -> float:
        return self.seconds / self.frozen_seconds

    @property
    def launch_count(self) -> int:
        return len(self.launches)


def _shape(M, K, N, r, dtype, dropout_p, tiling) -> Shape:
    for name, v in (("M", M), ("K", K), ("N", N), ("r", r)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return Shape(M, K, N, r, torch.empty((), dtype=dtype).element_size(), dropout_p > 0.0, tiling)


def dora_launches(plan: str, s: Shape, mode: str) -> list[Launch]:
    """What DoRA adds to a LoRA layer's launches (``plan`` ``"dora"``: ours; ``"peft_dora"``: PEFT's).

    Ours: the row norms ``‖W0ᵢ‖² + 2s·Bᵢ(W0 Aᵀ)ᵢ + s²·Bᵢ G Bᵢᵀ`` (``‖W0ᵢ‖²`` cached: one thin pass
    over W0 for ``W0 Aᵀ``), ``y = c ⊙ z + b`` (one elementwise pass; z is the fused layer's output),
    and in the backward ``c ⊙ dy`` and ``dm = Σ dy ⊙ z / n`` (z saved: M·N elements).
    PEFT's (peft/tuners/lora/dora.py): ``B A`` through an identity (K×K), ``W0 + s·B A`` and its
    norms (N×K each), then the base GEMM's output rescaled and the LoRA term added in elementwise
    passes; its backward runs those passes' gradients.
    """
    M, K, N, r, e = s.M, s.K, s.N, s.r, s.e
    if plan == "dora":
        out = [_thin("n: W0 Aᵀ (‖W0ᵢ‖² cached)", s, N, K, r, e * (N * K + K * r) + BYTES_FP32 * N * r),
               Launch("y = c ⊙ z + b (addcmul)", 0.0, 2 * e * M * N)]
        if mode == "fwd+bwd":
            out += [Launch("dz = c ⊙ dy", 0.0, 2 * e * M * N), Launch("dm = Σ dy ⊙ z / n", 0.0, 2 * e * M * N)]
        if s.dropout:  # PEFT's formula: y = (x − x_d) W0ᵀ + b + c ⊙ z(x_d): a second frozen GEMM each way
            out += [Launch("x_d = dropout(x)", 0.0, M * K * (2 * e + 1), M * K / 4),
                    Launch("x − x_d", 0.0, 3 * e * M * K), _gemm("(x − x_d) W0ᵀ + b", s, M, N, K, c_read=True)]
            if mode == "fwd+bwd":
                out += [_gemm("d(x − x_d) = dy W0", s, M, K, N), Launch("dx from x, x_d", 0.0, 4 * e * M * K)]
        return out
    if plan == "peft_dora":
        out = [Launch("eye(K)", 0.0, e * K * K),
               _thin("lora_A(eye)", s, K, K, r, e * (K * K + K * r)),
               _gemm("B A = lora_B(·)", s, K, N, r),
               Launch("s · B A", 0.0, 2 * e * N * K), Launch("W0 + s·B A", 0.0, 3 * e * N * K),
               Launch("row norms of W0 + s·B A", 0.0, e * N * K),
               Launch("(c − 1) · base", 0.0, 2 * e * M * N), Launch("c · lora · s", 0.0, 4 * e * M * N),
               Launch("sum of the two", 0.0, 3 * e * M * N)]
        if mode == "fwd+bwd":
            out += [Launch("gradients of the elementwise passes", 0.0, 10 * e * M * N),
                    Launch("dm = Σ dy ⊙ (base + lora s) / n", 0.0, 3 * e * M * N)]
        if s.dropout:  # with dropout PEFT computes x_d W0ᵀ again (base_result=None), and its gradient
            out.append(_gemm("x_d W0ᵀ", s, M, N, K))
            if mode == "fwd+bwd":
                out.append(_gemm("dy W0 (for x_d)", s, M, K, N))
        return out
    raise ValueError(f"unknown DoRA plan {plan!r}; expected one of {DORA_PLANS}")


def _steps(plan: str, s: Shape, mode: str, need_grad_x: bool, backward: str = "fused") -> list[Launch]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    out = forward_launches(plan, s)
    if mode == "fwd+bwd":
        out += backward_launches(plan, s, need_grad_x, backward)
    return out


def _seconds(launches: Sequence[Launch], spec: DeviceSpec, dtype: torch.dtype, host_s: float) -> float:
    gpu = sum(l.time(spec, dtype) for l in launches)
    return max(gpu, host_s * len(launches))


def predict(M: int, K: int, N: int, r: int, dtype: torch.dtype = torch.bfloat16, dropout_p: float = 0.0,
            mode: str = "fwd", plan: str = "auto", device=None, *, need_grad_x: bool = True,
            host_s: float = 0.0, tiling: Tiling = DEFAULT_TILING, backward: str = "auto") -> Prediction:
    """Predicted time of ``plan`` for x (M, K) through a (N, K) layer of rank ``r``, and its ratio
    to the frozen layer (``plan="frozen"``) in the same mode on the same device.

    ``plan``: ``"auto"`` (ours, with the forward plan :func:`choose_forward_plan` picks),
    ``"fused"``/``"two_pass"`` (ours, that forward plan forced), ``"frozen"``, ``"unsloth"``
    (cuBLAS + ``addmm_``), ``"peft"`` (PEFT's layer; also the eager formula), ``"dora"`` / ``"peft_dora"``
    (DoRA, ours and PEFT's: :func:`dora_launches`). ``host_s``: host
    cost per launch; a step takes the longer of its GPU and host times. ``backward``: how our
    backward gets g (:func:`backward_launches`); ``"auto"``: :func:`choose_backward_plan`'s choice.
    """
    if plan not in PLANS + DORA_PLANS:
        raise ValueError(f"unknown plan {plan!r}; expected one of {PLANS + DORA_PLANS}")
    dora = plan if plan in DORA_PLANS else None
    if dora:
        plan = "auto" if dora == "dora" else "peft"
    spec = device_spec(device)
    s = _shape(M, K, N, r, dtype, dropout_p, tiling)
    if plan == "auto":
        plan = _choose(s, spec, dtype)
    if backward == "auto":
        backward = _choose_backward(s, spec, dtype, need_grad_x)
    if plan.startswith("qlora"):
        plan, launches = _qlora_steps(plan, s, spec, dtype, mode, need_grad_x, backward)
    else:
        launches = _steps(plan, s, mode, need_grad_x, backward)
    if dora:
        # NOTE: ours runs the fused layer without dropout on x_d (dropout goes through dora_launches)
        inner = _steps(plan, replace(s, dropout=False), mode, need_grad_x, backward) if dora == "dora" else launches
        launches = inner + dora_launches(dora, s, mode)
        plan = dora
    frozen = _steps("frozen", s, mode, need_grad_x)
    return Prediction(plan, mode, _seconds(launches, spec, dtype, host_s), _seconds(frozen, spec, dtype, host_s),
                      tuple(launches))


def _choose(s: Shape, spec: DeviceSpec, dtype: torch.dtype) -> str:
    # The backward does not depend on the forward plan (both save x and xa): the forward decides.
    # Ties go to "fused" (one launch: less host work).
    if s.r > FUSED_MAX_RANK:
        return "two_pass"
    times = {p: _seconds(forward_launches(p, s), spec, dtype, 0.0) for p in FORWARD_PLANS}
    return min(FORWARD_PLANS, key=lambda p: (times[p], p != "fused"))


def _choose_backward(s: Shape, spec: DeviceSpec, dtype: torch.dtype, need_grad_x: bool) -> str:
    # Ties go to "fused" (two launches, not three).
    if s.r > RANK_CHUNK:
        return "g_pass"
    if not need_grad_x:
        return "fused"
    times = {p: _seconds(backward_launches("auto", s, True, p), spec, dtype, 0.0) for p in BACKWARD_PLANS}
    return min(BACKWARD_PLANS, key=lambda p: (times[p], p != "fused"))


_FORCED_PLAN: Optional[str] = None


@contextlib.contextmanager
def forced_forward_plan(plan: Optional[str]) -> Iterator[None]:
    """Make :func:`choose_forward_plan` return ``plan`` inside the block (tests, benchmarks)."""
    global _FORCED_PLAN
    if plan is not None and plan not in FORWARD_PLANS:
        raise ValueError(f"unknown forward plan {plan!r}; expected one of {FORWARD_PLANS}")
    before, _FORCED_PLAN = _FORCED_PLAN, plan
    try:
        yield
    finally:
        _FORCED_PLAN = before


def choose_forward_plan(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout_p: float,
                        device=None) -> str:
    """``"fused"`` or ``"two_pass"``: the forward plan the model predicts faster on ``device``
    (H100 numbers on a CPU or an unknown device; ``"two_pass"`` above FUSED_MAX_RANK, the only plan
    that runs there). Cheap: cached on its arguments."""
    if _FORCED_PLAN is not None:
        return _FORCED_PLAN
    return _choose_cached(M, K, N, r, dtype, float(dropout_p), device, emulated_target())


# NOTE: the emulated target (or None) is part of each cached choice's key: device_spec reads it.
@functools.lru_cache(maxsize=4096)
def _choose_cached(M, K, N, r, dtype, dropout_p, device, emulated=None) -> str:
    return _choose(_shape(max(M, 1), K, N, r, dtype, dropout_p, DEFAULT_TILING), device_spec(device), dtype)


def choose_backward_plan(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout_p: float,
                         need_grad_x: bool = True, device=None) -> str:
    """``"fused"`` or ``"g_pass"``: the backward plan the model predicts faster on ``device``
    (``"fused"`` without ``need_grad_x``; ``"g_pass"`` above RANK_CHUNK, the only plan that runs
    there). Cheap: cached on its arguments."""
    return _choose_backward_cached(M, K, N, r, dtype, float(dropout_p), bool(need_grad_x), device, emulated_target())


@functools.lru_cache(maxsize=4096)
def _choose_backward_cached(M, K, N, r, dtype, dropout_p, need_grad_x, device, emulated=None) -> str:
    s = _shape(max(M, 1), max(K, 1), max(N, 1), max(r, 1), dtype, dropout_p, DEFAULT_TILING)
    return _choose_backward(s, device_spec(device), dtype, need_grad_x)


# --------------------------------------------------------------------------- #
# A 4-bit base (QLoRA: lora_kernels.nf4), against the frozen 16-bit layer
# --------------------------------------------------------------------------- #

# Bytes per element of W0 in bitsandbytes' NF4 with double quantisation (QLoRA's default): ½ for
# the code, 1/64 for a uint8 absmax per 64 elements, 4/(64·256) for an fp32 absmax per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# SIMT instructions to dequantise one element: nibble shift and mask, the code and scale gathers,
# the multiply, the conversion (the nested scale's multiply-add shared by 64 elements).
# NOTE: an estimate, not yet measured on a GPU.
DEQUANT_OPS = 6
QLORA_VARIANTS = ("fused", "dequant")  # what lora_kernels.nf4.triton_ops runs per call


def _dequant(s: Shape) -> Launch:
    """W0 dequantised once into a 16-bit copy (lora_kernels' kernel, Unsloth's, bitsandbytes')."""
    return Launch("W0 = deq(W0₄) (a 16-bit copy)", 0.0, s.N * s.K * (NF4_BYTES + s.e), simt=s.N * s.K * DEQUANT_OPS)


def _reads_4bit(launch: Launch, s: Shape) -> Launch:
    """``launch`` (a GEMM over W0) reading W0 in 4 bits and dequantising each tile once per row block."""
    row_blocks = math.ceil(s.M / s.tiling.block_m)
    return replace(launch, name=launch.name.replace("W0", "deq(W0₄)"),
                   bytes=launch.bytes - s.N * s.K * (s.e - NF4_BYTES),
                   simt=launch.simt + s.N * s.K * row_blocks * DEQUANT_OPS)


def qlora_forward_launches(variant: str, s: Shape, spec: DeviceSpec, dtype: torch.dtype) -> list[Launch]:
    """Our forward on a 4-bit W0: ``"fused"`` (dequantised in the GEMM's main loop) or ``"dequant"``
    (dequantise once, then the 16-bit kernels); either way the 16-bit forward plan the model picks."""
    launches = forward_launches(_choose(s, spec, dtype), s)
    if variant == "dequant":
        return [_dequant(s)] + launches
    return launches[:-1] + [_reads_4bit(launches[-1], s)]


def qlora_backward_launches(variant: str, s: Shape, need_grad_x: bool, backward: str) -> list[Launch]:
    """Our backward on a 4-bit W0 (``variant`` as in :func:`qlora_forward_launches`); without dx W0 is not read."""
    launches = backward_launches("auto", s, need_grad_x, backward)
    if not need_grad_x:
        return launches
    if variant == "dequant":
        return [_dequant(s)] + launches
    i = 1 if backward == "g_pass" else 0  # the dx GEMM
    return launches[:i] + [_reads_4bit(launches[i], s)] + launches[i + 1:]


def _qlora_steps(plan: str, s: Shape, spec: DeviceSpec, dtype: torch.dtype, mode: str, need_grad_x: bool,
                 backward: str) -> tuple[str, list[Launch]]:
    """``(plan, launches)`` of a 4-bit plan; ``"qlora"`` takes the faster variant for the forward and,
    separately, for the backward (as the launcher does), and names the forward's."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    bwd = mode == "fwd+bwd"
    if plan in ("qlora_unsloth", "qlora_peft"):  # dequantise, then the 16-bit peer (again for dx)
        peer = plan.split("_")[1]
        out = [_dequant(s)] + forward_launches(peer, s)
        if plan == "qlora_peft":  # PEFT's Linear4bit clones the base output ("defensively")
            out.insert(2, Launch("result.clone()", 0.0, 2 * s.e * s.M * s.N))
        if bwd:
            out += ([_dequant(s)] if need_grad_x else []) + backward_launches(peer, s, need_grad_x)
        return plan, out
    if plan == "qlora":
        fwd = min(QLORA_VARIANTS, key=lambda v: _seconds(qlora_forward_launches(v, s, spec, dtype), spec, dtype, 0.0))
        bwd_v = min(QLORA_VARIANTS, key=lambda v: _seconds(qlora_backward_launches(v, s, need_grad_x, backward),
                                                           spec, dtype, 0.0))
    else:
        fwd = bwd_v = plan.split("_")[1]
    out = qlora_forward_launches(fwd, s, spec, dtype)
    if bwd:
        out += qlora_backward_launches(bwd_v, s, need_grad_x, backward)
    return f"qlora_{fwd}", out


def choose_qlora_variant(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout_p: float, backward: bool,
                         need_grad_x: bool = True, device=None) -> str:
    """``"fused"`` or ``"dequant"``: how the 4-bit launcher runs this forward (or backward), the faster
    by the model on ``device``. Cheap: cached on its arguments."""
    return _choose_qlora_cached(M, K, N, r, dtype, float(dropout_p), bool(backward), bool(need_grad_x), device,
                                emulated_target())


@functools.lru_cache(maxsize=4096)
def _choose_qlora_cached(M, K, N, r, dtype, dropout_p, backward, need_grad_x, device, emulated=None) -> str:
    s = _shape(max(M, 1), max(K, 1), max(N, 1), max(r, 1), dtype, dropout_p, DEFAULT_TILING)
    spec = device_spec(device)
    if not backward:
        times = {v: _seconds(qlora_forward_launches(v, s, spec, dtype), spec, dtype, 0.0) for v in QLORA_VARIANTS}
    else:
        plan = _choose_backward(s, spec, dtype, need_grad_x)
        times = {v: _seconds(qlora_backward_launches(v, s, need_grad_x, plan), spec, dtype, 0.0)
                 for v in QLORA_VARIANTS}
    return min(QLORA_VARIANTS, key=lambda v: (times[v], v != "fused"))


QLORA_TABLE_TOKENS = (16, 128, 512, 2048, 8192)


def qlora_table(device=DEFAULT_DEVICE, dtype: torch.dtype = torch.bfloat16, r: int = 16) -> str:
    """Markdown: predicted ratios of the 4-bit plans to the frozen 16-bit layer (docs/cost_model.md)."""
    spec = device_spec(device)
    lines = [f"Predicted × frozen {str(dtype).replace('torch.', '')} layer on {spec.name}, r = {r}, p = 0, NF4 with "
             "double quantisation.", "",
             "| K→N | M | fwd variant | bwd variant | ours fwd | ours fwd+bwd | fused-deq fwd | dequant-first fwd | "
             "16-bit ours fwd+bwd | unsloth-4bit fwd+bwd | peft+bnb fwd | peft+bnb fwd+bwd |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, n in TABLE_LAYERS:
        for m in QLORA_TABLE_TOKENS:
            def f(plan, mode):
                return predict(m, k, n, r, dtype, 0.0, mode, plan, spec).ratio
            cells = [f"{k}→{n}", str(m), choose_qlora_variant(m, k, n, r, dtype, 0.0, False, True, spec),
                     choose_qlora_variant(m, k, n, r, dtype, 0.0, True, True, spec)]
            cells += [f"{f(pl, md):.3f}" for pl, md in
                      (("qlora", "fwd"), ("qlora", "fwd+bwd"), ("qlora_fused", "fwd"), ("qlora_dequant", "fwd"),
                       ("auto", "fwd+bwd"), ("qlora_unsloth", "fwd+bwd"), ("qlora_peft", "fwd"),
                       ("qlora_peft", "fwd+bwd"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The table of docs/cost_model.md
# --------------------------------------------------------------------------- #

TABLE_TOKENS = (512, 2048, 4096, 8192)
TABLE_LAYERS = ((4096, 4096), (4096, 14336))
TABLE_RANKS = (16, 64)
TABLE_DROPOUTS = (0.0, 0.1)
TABLE_BEGIN = "<!-- cost-model-table: generated by `python -m lora_kernels.cost_model --table`; do not edit -->"
TABLE_END = "<!-- cost-model-table end -->"


def table(device=DEFAULT_DEVICE, dtype: torch.dtype = torch.bfloat16) -> str:
    """Markdown: predicted ratios to the frozen layer for the default benchmark shapes."""
    spec = device_spec(device)
    lines = [
        f"Predicted × frozen layer on {spec.name}, {str(dtype).replace('torch.', '')}; "
        "frozen ms = the floor's predicted time.",
        "",
        "| K→N | M | r | p | plan | bwd plan | fused fwd | two_pass fwd | ours fwd | ours fwd+bwd | unsloth fwd | "
        "unsloth fwd+bwd | peft fwd | peft fwd+bwd | frozen fwd ms | frozen fwd+bwd ms |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, n in TABLE_LAYERS:
        for m in TABLE_TOKENS:
            for r in TABLE_RANKS:
                for p in TABLE_DROPOUTS:
                    def f(plan, mode):
                        return predict(m, k, n, r, dtype, p, mode, plan, spec)
                    ours = f("auto", "fwd")
                    cells = [f"{k}→{n}", str(m), str(r), f"{p:g}", ours.plan,
                             choose_backward_plan(m, k, n, r, dtype, p, True, spec)]
                    cells += [f"{f(pl, md).ratio:.3f}" for pl, md in
                              (("fused", "fwd"), ("two_pass", "fwd"), ("auto", "fwd"), ("auto", "fwd+bwd"),
                               ("unsloth", "fwd"), ("unsloth", "fwd+bwd"), ("peft", "fwd"), ("peft", "fwd+bwd"))]
                    cells += [f"{ours.frozen_seconds * 1e3:.4f}", f"{f('auto', 'fwd+bwd').frozen_seconds * 1e3:.4f}"]
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def launches_text(M: int, K: int, N: int, r: int, dtype: torch.dtype = torch.bfloat16, dropout_p: float = 0.0,
                  device=DEFAULT_DEVICE) -> str:
    """Every launch of every plan for one shape: FLOPs, bytes, Philox calls and predicted µs."""
    spec = device_spec(device)
    s = _shape(M, K, N, r, dtype, dropout_p, DEFAULT_TILING)
    out = [f"M={M} K={K} N={N} r={r} {dtype} p={dropout_p:g} on {spec.name}"]
    runs = [(plan, mode, launches) for plan in PLANS[1:] if not plan.startswith("qlora")
            for mode, launches in (("fwd", forward_launches(plan, s)), ("bwd", backward_launches(plan, s)))]
    runs.append(("g_pass", "bwd", backward_launches("auto", s, backward="g_pass")))
    for v in QLORA_VARIANTS:  # a 4-bit W0
        runs += [(f"4bit {v}", "fwd", qlora_forward_launches(v, s, spec, dtype)),
                 (f"4bit {v}", "bwd", qlora_backward_launches(v, s, True, "fused"))]
    for plan, mode, launches in runs:
        for l in launches:
            out.append(f"  {plan:8} {mode}  {l.name:48} {l.flops / 1e9:9.2f} GFLOP {l.bytes / 1e6:9.2f} MB "
                       f"{l.philox / 1e6:7.2f} M philox {l.time(spec, dtype) * 1e6:9.1f} µs")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="the Markdown table of docs/cost_model.md")
    p.add_argument("--qlora-table", action="store_true", help="the 4-bit base's table of docs/cost_model.md")
    p.add_argument("--device", default=DEFAULT_DEVICE, choices=list(DEVICES))
    p.add_argument("--launches", metavar="M,K,N,r[,p]", help="every launch of every plan for one shape")
    args = p.parse_args(argv)
    if args.launches:
        vals = args.launches.split(",")
        M, K, N, r = (int(v) for v in vals[:4])
        print(launches_text(M, K, N, r, dropout_p=float(vals[4]) if len(vals) > 4 else 0.0, device=args.device))
    if args.qlora_table:
        print(qlora_table(args.device))
    if args.table or not (args.launches or args.qlora_table):
        print(table(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
