"""The 4-bit base (QLoRA): bitsandbytes' NF4/FP4 storage dequantised inside the kernels.

Against bitsandbytes' own ``dequantize_4bit`` (bit for bit) and the float64 reference on the
dequantised weight (by relative error), for every backend of the 4-bit ops; ``LoRALinear.from_linear``
on a ``Linear4bit``; a PEFT QLoRA model (transformers' ``BitsAndBytesConfig`` on the CPU) accelerated in
one call. Without bitsandbytes the non-nested weights are quantised here in plain PyTorch (bnb's
algorithm), so the kernels are still tested; what needs bitsandbytes itself skips with the reason.
"""

import os
import sys

import pytest
import torch

from lora_kernels import triton_ops
from lora_kernels.nf4 import reference as q4
from lora_kernels.nf4.functional import qlora_linear
from lora_kernels.nf4.ops import resolve
from lora_kernels.reference import lora_linear_reference

from conftest import DEVICE, TOLERANCE, backend_param, extended, relative_error

HAS_BNB = q4.bitsandbytes_available()
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'lora_kernels[qlora]')")
BACKENDS = [backend_param("reference"), backend_param("triton")]

# NF4: bitsandbytes' get_4bit_type("nf4"), the values its kernels use.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def quantize_torch(w: torch.Tensor, blocksize: int = 64) -> q4.QuantWeight:
    """Non-nested NF4 as bitsandbytes' PyTorch quantiser computes it (backends/default/ops.py)."""
    code = torch.tensor(NF4, device=w.device)
    flat = w.reshape(-1, blocksize).float()
    absmax = flat.abs().amax(1)
    scaled = torch.clamp(flat / absmax.clamp(min=1e-38)[:, None], -1, 1).reshape(-1)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    empty = absmax.new_empty(0)
    q = q4.QuantWeight((idx[::2] << 4) | idx[1::2], absmax, code, empty, empty, empty, blocksize, 0,
                       tuple(w.shape), w.dtype)
    q4.check(q)
    return q


def quantize(w: torch.Tensor, nested: bool, quant_type: str = "nf4", blocksize: int = 64) -> q4.QuantWeight:
    if not HAS_BNB:
        if nested or quant_type != "nf4":
            pytest.skip("double quantisation and FP4 are quantised by bitsandbytes here, which is not installed")
        return quantize_torch(w, blocksize)
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return q4.QuantWeight.from_quant_state(packed, state)


@requires_bnb
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_matches_bitsandbytes(nested, quant_type, dtype):
    import bitsandbytes.functional as F

    for shape in [(8, 64), (5, 192), (33, 256)]:
        w = torch.randn(*shape, dtype=dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        expected = F.dequantize_4bit(packed, state)
        q = q4.QuantWeight.from_quant_state(packed, state)
        # NOTE: torch.equal compares values (FP4's -0 and bnb's +0 are equal): every other bit must match.
        assert torch.equal(q4.dequantize_torch(q), expected)
        assert torch.equal(q4.dequantize(q), expected)


def test_quantize_torch_helper_is_bitsandbytes():
    if not HAS_BNB:
        pytest.skip("needs bitsandbytes to compare with")
    import bitsandbytes.functional as F

    w = torch.randn(6, 128)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = quantize_torch(w)
    assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.code, state.code)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_dequantises_bit_for_bit(backend, nested, dtype):
    """y = I · deq(W0)ᵀ is exact in any dtype (sums of one product and zeros): the tile the GEMM
    dequantised is bitsandbytes' weight converted to x's dtype, every bit of it."""
    K, N = 128, 40
    q = quantize(torch.randn(N, K, device=DEVICE), nested)
    x = torch.eye(K, dtype=dtype, device=DEVICE)
    zero_a, zero_b = torch.zeros(1, K, dtype=dtype, device=DEVICE), torch.zeros(N, 1, dtype=dtype, device=DEVICE)
    y = qlora_linear(x, q, None, zero_a, zero_b, 1.0, backend=backend)
    assert torch.equal(y.t(), q4.dequantize(q, dtype))
    if backend == "triton":  # the "dequant" variant's kernel
        from lora_kernels.nf4 import triton_ops as nf4_triton

        assert torch.equal(nf4_triton.dequantize(q, dtype), q4.dequantize(q, dtype))


CASES = [  # (dtype, nested, plan, 4-bit variant, dropout, bias, x layout)
    (torch.float32, False, "fused", "fused", 0.0, True, "2d"),
    (torch.float32, True, "two_pass", "fused", 0.25, False, "3d"),
    (torch.bfloat16, True, "fused", "fused", 0.25, True, "noncontig"),
    (torch.bfloat16, False, "two_pass", "fused", 0.0, True, "3d"),
    (torch.float16, True, "fused", "fused", 0.0, False, "2d"),
    (torch.float64, True, "fused", "fused", 0.1, True, "3d"),
    (torch.bfloat16, True, "fused", "dequant", 0.25, True, "3d"),
    (torch.float32, False, "two_pass", "dequant", 0.0, False, "noncontig"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,nested,plan,variant,dropout,bias,layout", CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else None)
def test_forward_and_gradients_vs_float64(backend, dtype, nested, plan, variant, dropout, bias, layout, monkeypatch):
    if backend == "reference" and variant != "fused":
        pytest.skip("the 4-bit variants are the Triton launcher's")
    if backend == "triton":
        from lora_kernels.nf4 import triton_ops as nf4_triton

        monkeypatch.setattr(nf4_triton, "QLORA_VARIANT", variant)
    monkeypatch.setattr(triton_ops, "FORWARD_PLAN", plan)
    monkeypatch.setattr(triton_ops, "BACKWARD_PLAN", "fused" if plan == "fused" else "g_pass")
    M, K, N, r = 37, 192, 70, 5  # awkward: no tile divides M, N or r
    q = quantize(torch.randn(N, K, device=DEVICE), nested)
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    if layout == "3d":
        x = mk(3, M // 3 + 1, K)
    elif layout == "noncontig":
        x = mk(K, M).t()
    else:
        x = mk(M, K)
    x.requires_grad_()
    A, B = (mk(r, K) * 0.1).requires_grad_(), (mk(N, r) * 0.1).requires_grad_()
    b = mk(N).requires_grad_() if bias else None
    y = qlora_linear(x, q, b, A, B, 0.75, dropout_p=dropout, backend=backend, seed=7)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, A, B, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, A64, B64 = leaves64[:3]
    w64 = q4.dequantize(q, dtype).double()  # W0 as the layer sees it in x's dtype
    y64 = lora_linear_reference(x64, w64, leaves64[3] if bias else None, A64, B64, 0.75, dropout, seed=7)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    tol = TOLERANCE[dtype]
    assert relative_error(y, y64) < tol
    for name, g, g64 in zip(["dx", "dA", "dB", "db"], grads, grads64):
        assert relative_error(g, g64) < tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_gradients_of_factors_only(backend):
    q = quantize(torch.randn(48, 128, device=DEVICE), True)
    x = torch.randn(9, 128, device=DEVICE)
    A = (torch.randn(4, 128, device=DEVICE) * 0.1).requires_grad_()
    B = (torch.randn(48, 4, device=DEVICE) * 0.1).requires_grad_()
    y = qlora_linear(x, q, None, A, B, 2.0, dropout_p=0.2, backend=backend, seed=3)
    dA, dB = torch.autograd.grad(y.square().sum(), (A, B))
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y64 = lora_linear_reference(x.double(), q4.dequantize(q).double(), None, A64, B64, 2.0, 0.2, seed=3)
    dA64, dB64 = torch.autograd.grad(y64.square().sum(), (A64, B64))
    assert relative_error(dA, dA64) < 1e-5 and relative_error(dB, dB64) < 1e-5


@pytest.mark.parametrize("backend", [extended(b) if b.id == "triton" else b for b in BACKENDS])
def test_gradcheck_fp64(backend):
    q = quantize(torch.randn(4, 64, device=DEVICE), True)
    f64 = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    x, A, B, b = torch.randn(3, 64, **f64), torch.randn(1, 64, **f64), torch.randn(4, 1, **f64), torch.randn(4, **f64)
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: qlora_linear(x, q, b, A, B, 0.5, dropout_p=0.3, backend=backend, seed=5), (x, A, B, b))


def _op_args(backend, dtype=torch.float32, dropout=0.0):
    q = quantize(torch.randn(24, 64, device=DEVICE), True)
    x = torch.randn(10, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    A = torch.randn(3, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    B = torch.randn(24, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, device=DEVICE, requires_grad=True)
    seed = torch.tensor(11, device=DEVICE)
    return (x, *q.tensors, q.blocksize, q.blocksize2, 24, q.dtype, bias, A, B, 0.5, dropout, seed, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = _op_args(backend, dropout=0.25)
    torch.library.opcheck(torch.ops.lora_kernels.qlora_forward.default, args)
    x, bias, A, B = args[0], args[11], args[12], args[13]
    _, xa = torch.ops.lora_kernels.qlora_forward(*args)
    dy = torch.randn(10, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.qlora_backward.default,
                          (dy, x.detach(), *args[1:11], A.detach(), B.detach(), xa.detach(), 0.5, 0.25,
                           args[16], True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    args = _op_args(backend)
    x, q_args, bias, A, B = args[0], args[1:11], args[11], args[12], args[13]
    q = q4.quant_weight(*q_args[:9], 64, q_args[9])

    def step(x, A, B):
        return qlora_linear(x, q, bias, A, B, 0.5, backend=backend).square().sum()

    eager = torch.autograd.grad(step(x, A, B), (x, A, B))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    got = torch.autograd.grad(compiled(x, A, B), (x, A, B))
    for g, e in zip(got, eager):
        assert relative_error(g, e) < 1e-6


def test_variant_choice_follows_the_cost_model():
    from lora_kernels import cost_model as cm

    # Few tokens: reading 4 bits in the GEMM beats writing a 16-bit copy first; many: the reverse.
    assert cm.choose_qlora_variant(16, 4096, 4096, 16, torch.bfloat16, 0.0, False) == "fused"
    assert cm.choose_qlora_variant(8192, 4096, 4096, 16, torch.bfloat16, 0.0, True) == "dequant"


def test_bad_input_is_refused_clearly():
    q = quantize(torch.randn(16, 64), False)
    A, B = torch.zeros(2, 64), torch.zeros(16, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=64\)"):
        qlora_linear(torch.randn(3, 32), q, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        qlora_linear(torch.randn(3, 64), q, None, A[:, :32], B, 1.0)
    with pytest.raises(Exception, match="no kernels for a 4-bit base"):
        resolve("cuda", torch.device("cpu"))
    with pytest.raises(TypeError, match="4-bit weight"):
        qlora_linear(torch.randn(3, 64), torch.randn(16, 64), None, A, B, 1.0)
    # in_features not a multiple of the blocksize: bnb's blocks would span rows.
    bad = q4.QuantWeight(torch.zeros(7 * 96 // 2, dtype=torch.uint8), torch.ones(7 * 96 // 64 + 1), q.code,
                         q.absmax2, q.code2, q.offset, 64, 0, (7, 96), torch.float32)
    with pytest.raises(ValueError, match=r"in_features \(96\) must be a multiple of the 4-bit blocksize \(64\)"):
        qlora_linear(torch.randn(3, 96), bad, None, torch.zeros(2, 96), torch.zeros(7, 2), 1.0)


def test_without_bitsandbytes_the_reference_dequantises_alone(monkeypatch):
    q = quantize(torch.randn(16, 64), False)
    expected = q4.dequantize(q)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    assert not q4.bitsandbytes_available()
    assert torch.equal(q4.dequantize(q), expected)
    with pytest.raises(ImportError, match=r"pip install 'lora_kernels\[qlora\]'"):
        q4.require_bitsandbytes("LoRALinear4bit")


# --------------------------------------------------------------------------- #
# LoRALinear on a bitsandbytes Linear4bit
# --------------------------------------------------------------------------- #


def linear4bit(K=128, N=48, nested=True, dtype=torch.float32):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    return bnb.nn.Linear4bit(K, N, compute_dtype=dtype, quant_type="nf4", compress_statistics=nested).to(DEVICE)


@requires_bnb
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_from_linear4bit(backend, tmp_path):
    import lora_kernels as lk

    base = linear4bit()
    layer = lk.LoRALinear.from_linear(base, r=4, alpha=8, backend=backend)
    assert isinstance(layer, lk.LoRALinear4bit) and layer.weight is base.weight
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 128, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    w = q4.dequantize(q4.QuantWeight.from_param(base.weight)).double()
    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.weight.detach().double().requires_grad_()
    B64 = layer.lora_B.weight.detach().double().requires_grad_()
    y64 = lora_linear_reference(x64, w, base.bias.double(), A64, B64, layer.scaling)
    y64.square().sum().backward()
    assert relative_error(y, y64) < 1e-5
    for got, ref in ((x.grad, x64.grad), (layer.lora_A.weight.grad, A64.grad), (layer.lora_B.weight.grad, B64.grad)):
        assert relative_error(got, ref) < 1e-5
    # The base alone, as bitsandbytes computes it.
    with lk.adapters_disabled(torch.nn.Sequential(layer)):
        assert torch.allclose(layer(x.detach()), base(x.detach()))
    # Save and load the adapter.
    torch.save(lk.lora_state_dict(layer), tmp_path / "adapter.pt")
    again = lk.LoRALinear.from_linear(base, r=4, alpha=8, backend=backend)
    again.load_state_dict(torch.load(tmp_path / "adapter.pt"), strict=False)
    assert torch.equal(again(x.detach()), layer(x.detach()))
    assert {"weight", "weight.absmax", "weight.quant_map", "lora_A.weight"} <= set(layer.state_dict())


@requires_bnb
def test_merge_on_a_4bit_base_is_refused_and_changes_nothing():
    import lora_kernels as lk

    model = torch.nn.Sequential(torch.nn.Linear(128, 128), linear4bit())
    lk.apply_lora(model, ["0", "1"], r=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="merge\\(\\) on a 4-bit base is refused"):
        model[1].merge()
    with pytest.raises(RuntimeError, match="refused"):
        lk.merge_and_unload(model)
    assert not model[0].merged and isinstance(model[1], lk.LoRALinear4bit)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


@requires_bnb
def test_apply_lora_refuses_a_4bit_layer_it_cannot_read():
    import bitsandbytes as bnb

    import lora_kernels as lk

    model = torch.nn.Sequential(bnb.nn.Linear4bit(96, 8, quant_type="nf4").to(DEVICE))
    with pytest.raises(ValueError, match="in_features \\(96\\) must be a multiple"):
        lk.apply_lora(model, ["0"])
    assert isinstance(model[0], bnb.nn.Linear4bit)


@requires_bnb
def test_dora_on_a_4bit_base_is_refused_and_changes_nothing():
    import lora_kernels as lk

    model = torch.nn.Sequential(linear4bit(), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    with pytest.raises(ValueError, match="use_dora=True on a bitsandbytes Linear4bit"):
        lk.apply_lora(model, ["0", "2"], use_dora=True)
    assert type(model[2]) is torch.nn.Linear and model[2].weight.requires_grad
    with pytest.raises(ValueError, match="use_dora=True on a bitsandbytes Linear4bit"):
        lk.LoRALinear.from_linear(model[0], use_dora=True)


# --------------------------------------------------------------------------- #
# A PEFT QLoRA model, accelerated in one call
# --------------------------------------------------------------------------- #

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def qlora_checkpoint(tmp_path_factory):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    if not HAS_BNB:
        pytest.skip("needs bitsandbytes (pip install 'lora_kernels[qlora]')")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def qlora_model(path, nested=True):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                             device_map=str(DEVICE))
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return model.train()  # as QLoRA trains (bitsandbytes repacks a CPU weight for inference otherwise)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nested", [False, extended(True)], ids=["plain", "double-quant"])
def test_peft_qlora_model_accelerated_matches_peft(qlora_checkpoint, nested, backend):
    import lora_kernels as lk

    model = qlora_model(qlora_checkpoint, nested)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    logits0, grads0 = _loss_and_grads(model, ids)
    report = lk.accelerate_peft(model, backend=backend)
    assert len(report.accelerated) == 14 and not report.skipped, str(report)
    assert set(report.current().values()) == {"fused"}
    logits1, grads1 = _loss_and_grads(model, ids)
    assert relative_error(logits1, logits0) < 1e-5
    for n, g in grads0.items():
        assert relative_error(grads1[n], g) < 1e-5, n


@pytest.mark.extended  # (a whole training run under the interpreter)
def test_peft_qlora_model_trains_saves_and_loads(qlora_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import lora_kernels as lk

    model = qlora_model(qlora_checkpoint)
    lk.accelerate_peft(model, backend="triton" if "triton" in lk.available_backends(DEVICE) else "auto")
    ids = torch.randint(0, 64, (4, 12), device=DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="4-bit base is refused"):
        layer.merge()
    model.save_pretrained(tmp_path / "adapter")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(qlora_checkpoint, quantization_config=config, dtype=torch.float32,
                                            device_map=str(DEVICE))
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # accelerated
        peft_own = loaded(input_ids=ids).logits  # PEFT's forward on the loaded adapter
        lk.accelerate_peft(loaded)
        got = loaded(input_ids=ids).logits
    assert relative_error(peft_own, expected) < 1e-5
    assert relative_error(got, expected) < 1e-5


def test_peft_qlora_cuda_backend_leaves_the_4bit_layers_to_peft(qlora_checkpoint):
    import lora_kernels as lk

    if DEVICE.type != "cuda":
        pytest.skip("backend='cuda' needs a CUDA GPU")
    report = lk.accelerate_peft(qlora_model(qlora_checkpoint), backend="cuda")
    assert all("no 4-bit kernels" in why for why in report.skipped.values()) and len(report.skipped) == 14


def test_cost_model_rows_of_the_4bit_base():
    """W0 at about ½ byte per element: at few tokens the 4-bit layer beats even the frozen 16-bit
    layer; at 8192 tokens it comes within the issue's 1.2× and near the 16-bit fused ratio; it beats
    dequantise-then-cuBLAS and PEFT + bitsandbytes at every tabulated shape."""
    from lora_kernels import cost_model as cm

    bf16 = torch.bfloat16
    assert cm.predict(16, 4096, 4096, 16, bf16, 0.0, "fwd", "qlora").ratio < 1.0
    big = cm.predict(8192, 4096, 4096, 16, bf16, 0.0, "fwd+bwd", "qlora").ratio
    assert big <= 1.2 and big - cm.predict(8192, 4096, 4096, 16, bf16, 0.0, "fwd+bwd").ratio < 0.1
    for K, N in cm.TABLE_LAYERS:
        for M in cm.QLORA_TABLE_TOKENS:
            for mode in cm.MODES:
                ours = cm.predict(M, K, N, 16, bf16, 0.0, mode, "qlora")
                assert ours.plan in ("qlora_fused", "qlora_dequant")
                for peer in ("qlora_unsloth", "qlora_peft"):
                    assert ours.ratio < cm.predict(M, K, N, 16, bf16, 0.0, mode, peer).ratio, (M, K, N, mode, peer)


def test_the_4bit_table_in_the_docs_is_current():
    import pathlib

    from lora_kernels import cost_model as cm

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "cost_model.md").read_text()
    assert cm.qlora_table() in doc, "regenerate: python -m lora_kernels.cost_model --qlora-table"


@pytest.mark.extended  # (the 4-bit layer's fullgraph compile is in the default tier: test_compile_fullgraph)
def test_peft_qlora_model_compiles_fullgraph(qlora_checkpoint):
    import lora_kernels as lk

    model = qlora_model(qlora_checkpoint)
    lk.accelerate_peft(model)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    logits, grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    logits_c, grads_c = _loss_and_grads(compiled, ids)
    assert relative_error(logits_c, logits) < 1e-5
    grads_c = {n.removeprefix("_orig_mod."): g for n, g in grads_c.items()}  # the compiled wrapper's names
    for n, g in grads.items():
        assert relative_error(grads_c[n], g) < 1e-5, n


def test_the_package_works_without_bitsandbytes():
    """In a fresh interpreter where `import bitsandbytes` fails: the package, its 16-bit layers and
    accelerate_peft work, and a 4-bit weight (quantised here in PyTorch) runs on the reference path."""
    import pathlib
    import subprocess
    import textwrap

    code = textwrap.dedent('''
        import sys
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError
        import torch
        import lora_kernels as lk
        from lora_kernels.nf4 import reference as q4
        from test_nf4 import quantize_torch
        assert not q4.bitsandbytes_available()
        layer = lk.LoRALinear(64, 8, r=2)
        layer(torch.randn(3, 64)).sum().backward()
        q = quantize_torch(torch.randn(8, 64))
        y = lk.qlora_linear(torch.randn(3, 64), q, None, torch.randn(2, 64), torch.randn(8, 2), 0.5, backend="reference")
        assert y.shape == (3, 8)
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), LoraConfig(r=2, target_modules=["0"]))
        assert lk.accelerate_peft(model).accelerated == ["base_model.model.0"]
        model(torch.randn(3, 64)).sum().backward()
        try:
            q4.require_bitsandbytes("LoRALinear4bit")
        except ImportError as e:
            assert "pip install" in str(e)
        else:
            raise AssertionError("no ImportError")
        print("ok")
    ''')
    here = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=here, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
