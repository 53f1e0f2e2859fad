"""The providers compared by the suite, each built from one shared set of weights per case.

Every provider computes ``y = x W0ᵀ + s · (dropout(x) Aᵀ) Bᵀ`` for the same
``W0`` (frozen), ``A`` and ``B`` (trainable, both random: ``B`` is never zero,
so the low-rank path really computes), ``s = alpha / r``:

========  ==================================================================
base      frozen ``nn.Linear``: the floor every ratio is taken against
merged    ``LoRALinear`` after ``merge()`` (backend ``auto``), in eval mode
peft      HuggingFace PEFT's ``lora.Linear`` (``get_peft_model`` + ``LoraConfig``)
eager     the formula in eager PyTorch: ``F.linear`` + dropout + two matmuls
compile   the same formula under ``torch.compile``
unsloth   an Unsloth-style ``autograd.Function``: cuBLAS GEMMs, scale folded
          into ``addmm_``, saves ``x`` and ``x Aᵀ``, hand-written backward
triton    ``LoRALinear(backend="triton")``
cuda      ``LoRALinear(backend="cuda")``
qlora_triton   ``LoRALinear.from_linear(Linear4bit)``: the 4-bit kernels (lora_kernels.nf4), backend triton
qlora_peft     PEFT's ``lora.bnb.Linear4bit`` on bitsandbytes' ``Linear4bit`` (QLoRA as users run it)
qlora_unsloth  dequantise W0 with bitsandbytes, then the Unsloth-style cuBLAS Function (again in backward)
reference ``LoRALinear(backend="reference")`` (not run by default)
dora      ``LoRALinear(use_dora=True)`` (backend ``auto``; not run by default)
peft_dora PEFT's DoRA layer (``LoraConfig(use_dora=True)``; not run by default)
========  ==================================================================

The ``qlora_*`` providers hold W0 as bitsandbytes NF4 with double quantisation (QLoRA's
default) and are checked against the formula on the dequantised W0 (``Built.weight``); their
ratios are still to the frozen 16-bit ``base``. They have no merge modes.
The DoRA providers start with the magnitude equal to the row norms of ``W0 + s·B A``, so
their output is the plain LoRA formula's and the suite's correctness check applies to them;
the time is DoRA's all the same (norms, column scale, ``dm``).

In the merge modes each provider folds ``s · B A`` into (or out of) a weight;
``base`` there is ``W.copy_(W0)``, one copy of the frozen weight.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels import LoRALinear, backends
from lora_kernels.dora import dora_weight_norm

from .shapes import Case

PROVIDERS = ("base", "merged", "peft", "eager", "compile", "unsloth", "triton", "cuda",
             "qlora_triton", "qlora_peft", "qlora_unsloth", "reference", "dora", "peft_dora")
# Not run by default: the reference path, and DoRA (asked for by name)
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p not in ("reference", "dora", "peft_dora"))
OURS = ("triton", "cuda")  # the package's kernels: the targets apply to these
COMPETITORS = ("peft", "eager", "compile", "unsloth")  # "faster than every other provider"
LORA_ALPHA = 16.0

DESCRIPTIONS = {
    "base": "frozen nn.Linear (the floor; in merge modes: one copy of W0)",
    "merged": "LoRALinear after merge(), backend auto (inference only)",
    "peft": "HuggingFace PEFT lora.Linear (get_peft_model, LoraConfig)",
    "eager": "eager formula: F.linear + dropout + two matmuls",
    "compile": "the eager formula under torch.compile",
    "unsloth": "Unsloth-style autograd.Function (addmm_ with folded scale, hand-written backward)",
    "triton": "LoRALinear(backend='triton')",
    "cuda": "LoRALinear(backend='cuda')",
    "qlora_triton": "LoRALinear on a bitsandbytes NF4 Linear4bit, backend triton (lora_kernels.nf4)",
    "qlora_peft": "PEFT lora.bnb.Linear4bit on bitsandbytes NF4 (QLoRA as users run it)",
    "qlora_unsloth": "bitsandbytes dequantise + the Unsloth-style Function (W0 dequantised again in backward)",
    "reference": "LoRALinear(backend='reference'), plain PyTorch",
    "dora": "LoRALinear(use_dora=True), backend auto: DoRA on the fused kernels",
    "peft_dora": "HuggingFace PEFT lora.Linear with use_dora=True",
}
QLORA = ("qlora_triton", "qlora_peft", "qlora_unsloth")


@dataclass
class Setup:
    """The tensors one case shares among all providers."""

    case: Case
    weight: nn.Parameter  # W0 (N, K), frozen
    lora_A: Tensor  # (r, K)
    lora_B: Tensor  # (N, r)
    scaling: float

    @property
    def dropout(self) -> float:
        return self.case.dropout


def make_setup(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Setup:
    """Random weights scaled so that ``y`` and the LoRA term are both of order one."""
    torch.manual_seed(seed)
    k, n, r = case.layer.in_features, case.layer.out_features, case.r
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    a = torch.randn(r, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, r, device=device, dtype=dtype) / r**0.5
    return Setup(case, nn.Parameter(w, requires_grad=False), a, b, LORA_ALPHA / r)


@dataclass
class Built:
    """A provider ready to run one case.

    ``forward(x)`` for the activation modes; ``merge(w)`` / ``unmerge(w)`` fold
    the adapter into the given weight (one of the suite's rotating copies of W0).
    ``trainable`` get their ``.grad`` reset between repetitions; ``params``
    (trainable and frozen) do not count as saved activations.
    """

    forward: Optional[Callable[[Tensor], Tensor]] = None
    merge: Optional[Callable[[Tensor], None]] = None
    unmerge: Optional[Callable[[Tensor], None]] = None
    trainable: list[Tensor] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    weight: Optional[Tensor] = None  # the W0 it computes with, where not the case's (a 4-bit W0, dequantised)


def _linear(weight: nn.Parameter) -> nn.Linear:
    """An ``nn.Linear`` without bias (as in Llama) around an existing weight."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = weight
    return lin


def _frozen(s: "Setup") -> nn.Parameter:
    """A Parameter of its own over W0's storage: swapping its ``.data`` leaves other providers alone."""
    return nn.Parameter(s.weight.data, requires_grad=False)


def _trainable_copy(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=True)


# --- the providers -----------------------------------------------------------------------


def _build_base(s: Setup) -> Built:
    lin = _linear(_frozen(s))
    src = s.weight.detach()
    return Built(forward=lin, merge=lambda w: w.copy_(src), unmerge=lambda w: w.copy_(src), params=[s.weight])


def _lora_module(s: Setup, backend: str, weight: nn.Parameter) -> LoRALinear:
    m = LoRALinear.from_linear(_linear(weight), r=s.case.r, alpha=LORA_ALPHA, dropout=s.dropout, backend=backend)
    with torch.no_grad():
        m.lora_A.weight.copy_(s.lora_A)
        m.lora_B.weight.copy_(s.lora_B)
    return m.train()


def _module_merge_fns(m: LoRALinear):
    """``m.merge()`` / ``m.unmerge()`` (the public methods) on the weight passed in."""

    def merge(w: Tensor) -> None:
        m.weight.data, m.merged = w, False
        m.merge()

    def unmerge(w: Tensor) -> None:
        m.weight.data, m.merged = w, True
        m.unmerge()

    return merge, unmerge


def _build_lora(backend: str) -> Callable[[Setup], Built]:
    def build(s: Setup) -> Built:
        m = _lora_module(s, backend, _frozen(s))
        merge, unmerge = _module_merge_fns(m)
        trainable = [m.lora_A.weight, m.lora_B.weight]
        return Built(m, merge, unmerge, trainable, trainable + [s.weight])

    return build


def _build_merged(s: Setup) -> Built:
    weight = nn.Parameter(s.weight.detach().clone(), requires_grad=False)  # merge() writes it
    m = _lora_module(s, "auto", weight)
    merge, unmerge = _module_merge_fns(m)
    params = [weight, m.lora_A.weight, m.lora_B.weight]
    m.merge()
    m.eval()
    return Built(m, merge, unmerge, [], params)


class _Wrapper(nn.Module):
    """The smallest model PEFT can wrap: one projection called ``proj``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _build_peft(s: Setup) -> Built:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=["proj"], r=s.case.r, lora_alpha=LORA_ALPHA, lora_dropout=s.dropout)
    # NOTE: autocast_adapter_dtype=False keeps the adapter in the model's dtype (bf16), as every
    # other provider is; PEFT's default would upcast it to fp32.
    model = get_peft_model(_Wrapper(_linear(_frozen(s))), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj  # peft.tuners.lora.Linear: the layer itself is timed
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(s.lora_A)
        b.copy_(s.lora_B)
    layer.train()

    def merge(w: Tensor) -> None:
        layer.base_layer.weight.data = w
        layer.merged_adapters = []
        layer.merge()

    def unmerge(w: Tensor) -> None:
        layer.base_layer.weight.data = w
        layer.merged_adapters = ["default"]
        layer.unmerge()

    return Built(layer, merge, unmerge, [a, b], [a, b, s.weight])


def _build_dora(s: Setup) -> Built:
    m = LoRALinear.from_linear(_linear(_frozen(s)), r=s.case.r, alpha=LORA_ALPHA, dropout=s.dropout,
                               use_dora=True)
    with torch.no_grad():
        m.lora_A.weight.copy_(s.lora_A)
        m.lora_B.weight.copy_(s.lora_B)
        m.lora_magnitude_vector.copy_(dora_weight_norm(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling))
    merge, unmerge = _module_merge_fns(m)
    trainable = m._adapter_params()
    return Built(m.train(), merge, unmerge, trainable, trainable + [s.weight])


def _build_peft_dora(s: Setup) -> Built:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=["proj"], r=s.case.r, lora_alpha=LORA_ALPHA, lora_dropout=s.dropout,
                        use_dora=True)
    model = get_peft_model(_Wrapper(_linear(_frozen(s))), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        a.copy_(s.lora_A)
        b.copy_(s.lora_B)
        mag.copy_(dora_weight_norm(s.weight, a, b, layer.scaling["default"]))
    layer.train()
    return Built(layer, None, None, [a, b, mag], [a, b, mag, s.weight])


def _eager_parts(s: Setup):
    a, b = _trainable_copy(s.lora_A), _trainable_copy(s.lora_B)
    w, p, scale = s.weight, s.dropout, s.scaling

    def forward(x: Tensor) -> Tensor:
        xd = F.dropout(x, p, training=True) if p > 0 else x
        return F.linear(x, w) + F.linear(F.linear(xd, a), b) * scale

    # NOTE: not add_(b @ a, alpha=scale): under torch.compile on the CPU (torch 2.14), an add
    # with alpha of a matmul result computes a wrong sum; the suite's merge check caught it.
    def merge(t: Tensor) -> None:
        t.add_((b @ a) * scale)

    def unmerge(t: Tensor) -> None:
        t.sub_((b @ a) * scale)

    return forward, merge, unmerge, [a, b], [a, b, w]


def _build_eager(s: Setup) -> Built:
    return Built(*_eager_parts(s))


def _build_compile(s: Setup) -> Built:
    forward, merge, unmerge, trainable, params = _eager_parts(s)
    # dynamic=False: one static graph per shape, the best case for the compiler. The
    # runner calls torch._dynamo.reset() between cases so no recompile limit is reached.
    compiled = [torch.compile(f, dynamic=False) for f in (forward, merge, unmerge)]
    return Built(*compiled, trainable, params)


class UnslothStyleLoRA(torch.autograd.Function):
    """LoRA as Unsloth's ``fast_lora`` writes it: cuBLAS GEMMs, the scale folded into ``addmm_``.

    With ``D = mask / (1 - p)`` (``D = 1`` when ``p = 0``) and ``x_d = x ⊙ D``::

        y  = x W0ᵀ;   xa = x_d Aᵀ;   y += s · xa Bᵀ          (addmm_, alpha=s)
        dB = s · dyᵀ xa
        g  = dy B
        dA = s · gᵀ x_d
        dx = dy W0 + s · (g A) ⊙ D                          (addmm_ when p = 0)

    Saves ``x`` and ``xa`` when ``p = 0``; with dropout ``x_d``, ``xa`` and the
    boolean keep-mask. ``W0`` is frozen (no ``dW0``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, p: float):
        mask = None
        xd = x
        if p > 0:
            xd, mask = torch.ops.aten.native_dropout(x, p, True)
        y = torch.mm(x, weight.t())
        xa = torch.mm(xd, lora_A.t())
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(xd, xa, weight, lora_A, lora_B, mask)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xd, xa, weight, lora_A, lora_B, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        d_b = torch.empty_like(lora_B).addmm_(dy.t(), xa, beta=0, alpha=s)
        g = torch.mm(dy, lora_B)
        d_a = torch.empty_like(lora_A).addmm_(g.t(), xd, beta=0, alpha=s)
        dx = torch.mm(dy, weight)
        if mask is None:
            dx.addmm_(g, lora_A, alpha=s)
        else:
            dx.add_(torch.mm(g, lora_A).mul_(mask), alpha=s / (1.0 - p))
        return dx, None, d_a, d_b, None, None


def _build_unsloth(s: Setup) -> Built:
    a, b = _trainable_copy(s.lora_A), _trainable_copy(s.lora_B)
    w, p, scale = s.weight, s.dropout, s.scaling

    def forward(x: Tensor) -> Tensor:
        return UnslothStyleLoRA.apply(x, w, a, b, scale, p)

    def merge(t: Tensor) -> None:
        t.addmm_(b, a, alpha=scale)

    def unmerge(t: Tensor) -> None:
        t.addmm_(b, a, alpha=-scale)

    return Built(forward, merge, unmerge, [a, b], [a, b, w])


# --- a 4-bit W0 (QLoRA) -------------------------------------------------------------------


def _linear4bit(s: Setup):
    """W0 as bitsandbytes' NF4 ``Linear4bit`` with double quantisation (quantised on its device)."""
    import bitsandbytes as bnb

    n, k = s.weight.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=s.weight.dtype, compress_statistics=True,
                            quant_type="nf4", device="cpu")
    lin.weight = bnb.nn.Params4bit(s.weight.detach().cpu(), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4")
    return lin.to(s.weight.device).train()


def _dequantized(lin) -> Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)


def _build_qlora_triton(s: Setup) -> Built:
    lin = _linear4bit(s)
    m = LoRALinear.from_linear(lin, r=s.case.r, alpha=LORA_ALPHA, dropout=s.dropout, backend="triton")
    with torch.no_grad():
        m.lora_A.weight.copy_(s.lora_A)
        m.lora_B.weight.copy_(s.lora_B)
    trainable = [m.lora_A.weight, m.lora_B.weight]
    return Built(m.train(), trainable=trainable, params=trainable + [lin.weight], weight=_dequantized(lin))


def _build_qlora_peft(s: Setup) -> Built:
    from peft import LoraConfig, get_peft_model

    lin = _linear4bit(s)
    wrapper = _Wrapper(lin)
    wrapper.is_loaded_in_4bit = True  # what PEFT reads off a transformers model loaded in 4 bits
    config = LoraConfig(target_modules=["proj"], r=s.case.r, lora_alpha=LORA_ALPHA, lora_dropout=s.dropout)
    layer = get_peft_model(wrapper, config, autocast_adapter_dtype=False).base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(s.lora_A)
        b.copy_(s.lora_B)
    return Built(layer.train(), trainable=[a, b], params=[a, b, lin.weight], weight=_dequantized(lin))


class DequantizeThenUnsloth(torch.autograd.Function):
    """The Unsloth approach on a 4-bit W0: dequantise it to a 16-bit copy (bitsandbytes' kernel), run
    :class:`UnslothStyleLoRA`'s cuBLAS GEMMs, and dequantise again in backward for ``dx = dy W0``
    (the copy is not kept between forward and backward)."""

    @staticmethod
    def forward(ctx, x, lin, lora_A, lora_B, scaling, p):
        ctx.lin = lin
        with torch.enable_grad():  # the inner Function records its own graph, replayed in backward
            xd = x.detach().requires_grad_()
            a, b = lora_A.detach().requires_grad_(), lora_B.detach().requires_grad_()
            y = UnslothStyleLoRA.apply(xd, _dequantized(lin).to(x.dtype), a, b, scaling, p)
        ctx.inner = (xd, a, b, y)
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        xd, a, b, y = ctx.inner
        # NOTE: the inner graph saved its dequantised W0; Unsloth re-dequantises instead. Timed
        # alike (one dequantisation per pass either way), the memory mode counts the saved copy.
        dx, da, db = torch.autograd.grad(y, (xd, a, b), dy)
        return dx, None, da, db, None, None


def _build_qlora_unsloth(s: Setup) -> Built:
    lin = _linear4bit(s)
    a, b = _trainable_copy(s.lora_A), _trainable_copy(s.lora_B)

    def forward(x: Tensor) -> Tensor:
        return DequantizeThenUnsloth.apply(x, lin, a, b, s.scaling, s.dropout)

    return Built(forward, trainable=[a, b], params=[a, b, lin.weight], weight=_dequantized(lin))


BUILDERS: dict[str, Callable[[Setup], Built]] = {
    "base": _build_base,
    "merged": _build_merged,
    "peft": _build_peft,
    "eager": _build_eager,
    "compile": _build_compile,
    "unsloth": _build_unsloth,
    "triton": _build_lora("triton"),
    "cuda": _build_lora("cuda"),
    "qlora_triton": _build_qlora_triton,
    "qlora_peft": _build_qlora_peft,
    "qlora_unsloth": _build_qlora_unsloth,
    "reference": _build_lora("reference"),
    "dora": _build_dora,
    "peft_dora": _build_peft_dora,
}


def unavailable_reason(name: str, device: torch.device, allow_interpreter: bool = False) -> str:
    """Empty if provider ``name`` can run on ``device``; otherwise why not."""
    if name in ("peft", "qlora_peft", "peft_dora") and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if name in QLORA and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'lora_kernels[qlora]')"
    if name in ("triton", "cuda", "reference", "qlora_triton"):
        backend = "triton" if name == "qlora_triton" else name
        why = backends.unavailable_reason(backend, device)
        if why:
            return why
        if backend == "triton" and device.type != "cuda" and not allow_interpreter:
            return ("here Triton runs only under its CPU interpreter, which executes every program in Python: "
                    "a time would be the interpreter's, not the kernels' (the CPU run's check, saved-bytes and "
                    "host tables run the Triton path)")
    return ""


def skip_reason(name: str, mode: str, case: Case) -> str:
    """Why a provider does not apply to a mode/case (empty if it does)."""
    if name == "merged" and mode in ("fwd+bwd", "memory"):
        return "a merged layer is inference only: its adapter cannot be trained"
    if name == "merged" and case.dropout > 0:
        return "a merged layer runs in eval mode: no dropout"
    if name in QLORA and mode in ("merge", "unmerge"):
        return "a 4-bit base is not merged (requantising W0 + s·B A is lossy: lora_kernels refuses it)"
    if name in ("dora", "peft_dora") and mode in ("merge", "unmerge"):
        return "DoRA's merge (a row scale after the plain one) is not among the suite's merge providers"
    return ""


def build(name: str, setup: Setup) -> Built:
    return BUILDERS[name](setup)
