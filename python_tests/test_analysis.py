"""lora_kernels.analysis: Section 7 of the LoRA paper, checked against answers known by construction."""

import json
import math

import pytest
import torch

from lora_kernels.analysis import (
    adapter_similarity,
    amplification,
    delta_weight,
    load_adapter,
    lora_svd,
    pair_layers,
    projected_norm,
    random_orthonormal,
    random_subspace_similarity,
    subspace_similarity,
    top_singular_vectors,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def orthonormal(n, k, dtype=F64):
    return torch.linalg.qr(torch.randn(n, k, dtype=dtype))[0]


def factors_with_row_space(V, r, spectrum=None):
    """An ``A`` ``(r, d)`` whose ordered right singular vectors are the columns of ``V`` ``(d, r)``."""
    spectrum = torch.linspace(3.0, 1.0, r, dtype=V.dtype) if spectrum is None else spectrum
    return orthonormal(r, r, V.dtype) @ torch.diag(spectrum) @ V.T


# --- subspace similarity ------------------------------------------------------------------------


def test_identical_subspaces_give_one():
    d, r = 37, 6
    V = orthonormal(d, r)
    A1 = factors_with_row_space(V, r)
    A2 = factors_with_row_space(V, r, torch.linspace(5.0, 0.5, r, dtype=F64))  # same directions, other mix
    phi = adapter_similarity((A1, None), (A2, None), "A")
    assert phi.shape == (r, r)
    torch.testing.assert_close(phi.diagonal(), torch.ones(r, dtype=F64))
    torch.testing.assert_close(phi[-1], torch.ones(r, dtype=F64))  # i = r: span(U_r) contains every U_j
    torch.testing.assert_close(phi[:, -1], torch.ones(r, dtype=F64))


def test_orthogonal_subspaces_give_zero():
    d = 40
    Q = orthonormal(d, 16)
    A1 = factors_with_row_space(Q[:, :8], 8)
    A2 = factors_with_row_space(Q[:, 8:], 8)
    phi = adapter_similarity((A1, None), (A2, None), "A")
    assert phi.abs().max() < 1e-12


def test_planted_shared_direction_shows_at_one_one():
    d, r1, r2 = 64, 4, 8
    Q = orthonormal(d, r1 + r2)
    shared = Q[:, :1]
    V1 = torch.cat([shared, Q[:, 1:r1]], 1)  # the shared direction is the top one of both
    V2 = torch.cat([shared, Q[:, r1 : r1 + r2 - 1]], 1)
    A1, A2 = factors_with_row_space(V1, r1), factors_with_row_space(V2, r2)
    phi = adapter_similarity((A1, None), (A2, None), "A")
    assert phi.shape == (r1, r2)
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-12)
    # Everything else overlaps only in that one direction: ‖U_iᵀU_j‖² = 1, so phi = 1 / min(i, j).
    i = torch.arange(1, r1 + 1, dtype=F64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=F64)[None, :]
    torch.testing.assert_close(phi, 1.0 / torch.minimum(i, j))


def test_grid_matches_one_svd_per_cell():
    A1, A2 = torch.randn(5, 30, dtype=F64), torch.randn(7, 30, dtype=F64)
    phi = adapter_similarity((A1, None), (A2, None), "A")
    _, _, Vh1 = torch.linalg.svd(A1)
    _, _, Vh2 = torch.linalg.svd(A2)
    for i in range(1, 6):
        for j in range(1, 8):
            cell = torch.linalg.matrix_norm(Vh1[:i] @ Vh2[:j].T) ** 2 / min(i, j)
            assert phi[i - 1, j - 1] == pytest.approx(cell.item(), abs=1e-12)


def test_random_pairs_match_expected_overlap():
    # E[phi(i, j)] = max(i, j) / d for independent uniform subspaces. A Gaussian A's
    # right singular subspaces are uniform (A Q has A's law for orthogonal Q).
    # ‖U_iᵀU_j‖² is close to a (1/d)·χ²(ij): std sqrt(2ij)/d; averaged over n pairs.
    d, r1, r2, n = 128, 4, 16, 256
    phi = adapter_similarity((torch.randn(n, r1, d), None), (torch.randn(n, r2, d), None), "A")
    mean = phi.mean(0)
    expected = random_subspace_similarity(r1, r2, d)
    i = torch.arange(1, r1 + 1, dtype=F64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=F64)[None, :]
    std_of_mean = torch.sqrt(2 * i * j) / d / torch.minimum(i, j) / math.sqrt(n)
    assert ((mean - expected).abs() < 5 * std_of_mean).all()
    assert expected[0, 0] == pytest.approx(1 / d) and expected[-1, -1] == pytest.approx(r2 / d)


def test_factor_B_uses_left_singular_vectors():
    d_out, r = 33, 5
    U = orthonormal(d_out, r)
    B1 = U @ torch.diag(torch.linspace(4.0, 1.0, r, dtype=F64)) @ orthonormal(r, r)
    B2 = U @ torch.diag(torch.linspace(2.0, 0.1, r, dtype=F64)) @ orthonormal(r, r)
    phi = adapter_similarity((None, B1), (None, B2), "B")
    torch.testing.assert_close(phi.diagonal(), torch.ones(r, dtype=F64))
    torch.testing.assert_close(top_singular_vectors(B1, "left").abs(), U.abs())


@pytest.mark.parametrize("factor", ["dW_in", "dW_out"])
def test_delta_factors_match_dense_svd(factor):
    A1, B1 = torch.randn(4, 3, 29, dtype=F64), torch.randn(4, 23, 3, dtype=F64)
    A2, B2 = torch.randn(4, 6, 29, dtype=F64), torch.randn(4, 23, 6, dtype=F64)
    phi = adapter_similarity((A1, B1), (A2, B2), factor)
    side = "right" if factor == "dW_in" else "left"
    U1 = top_singular_vectors(delta_weight(A1, B1), side, k=3)
    U2 = top_singular_vectors(delta_weight(A2, B2), side, k=6)
    torch.testing.assert_close(phi, subspace_similarity(U1, U2))


# --- SVD of ΔW from QR factors -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(59, 97, 8), (97, 59, 8), (16, 40, 24), (5, 7, 3)])
def test_lora_svd_matches_dense(shape):
    d_out, d_in, r = shape
    A, B = torch.randn(2, r, d_in, dtype=F64), torch.randn(2, d_out, r, dtype=F64)
    scaling = torch.tensor([0.5, -2.0], dtype=F64)
    svd = lora_svd(A, B, scaling)
    dense = delta_weight(A, B, scaling)
    k = min(r, d_out, d_in)
    assert svd.U.shape == (2, d_out, k) and svd.S.shape == (2, k) and svd.Vh.shape == (2, k, d_in)
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(dense)[:, :k])
    torch.testing.assert_close(svd.U @ torch.diag_embed(svd.S) @ svd.Vh, dense)
    torch.testing.assert_close(svd.U.mT @ svd.U, torch.eye(k, dtype=F64).expand(2, k, k))
    torch.testing.assert_close(svd.Vh @ svd.Vh.mT, torch.eye(k, dtype=F64).expand(2, k, k))


def test_lora_svd_float32_input_and_compute():
    A, B = torch.randn(8, 300).bfloat16(), torch.randn(200, 8).bfloat16()
    svd32 = lora_svd(A, B, 2.0, dtype=torch.float32)
    svd64 = lora_svd(A, B, 2.0)
    assert svd32.S.dtype == torch.float32 and svd64.S.dtype == F64
    torch.testing.assert_close(svd32.S.double(), svd64.S, rtol=1e-5, atol=0)


# --- amplification ------------------------------------------------------------------------------


def planted_layer(d_out=48, d_in=40, r=4, scaling=2.0, decay=None):
    """``W = P diag(σ) Qᵀ`` and ``s·B A = P[:, idx] diag(c) Q[:, idx]ᵀ`` on weak directions ``idx`` of W."""
    k = min(d_out, d_in)
    P, Q = orthonormal(d_out, k), orthonormal(d_in, k)
    if decay is None:
        sigma = torch.linspace(10.0, 0.5, k, dtype=F64)
    else:
        sigma = 10.0 * decay ** torch.arange(k, dtype=F64)
    W = P @ torch.diag(sigma) @ Q.T
    idx = torch.tensor([k - 7, k - 5, k - 3, k - 1])[:r]
    c = torch.tensor([4.0, 3.0, 2.0, 1.5], dtype=F64)[:r]
    mix = torch.randn(r, r, dtype=F64) + 3 * torch.eye(r, dtype=F64)
    A = mix @ Q[:, idx].T
    B = P[:, idx] @ torch.diag(c) @ torch.linalg.inv(mix) / scaling
    return W, A, B, scaling, sigma, sigma[idx], c


def test_amplification_of_planted_update():
    W, A, B, s, sigma, sigma_idx, c = planted_layer()
    amp = amplification(W, A, B, s, generator=torch.Generator().manual_seed(0))
    assert amp.k == 4
    assert amp.weight_norm.item() == pytest.approx(sigma.norm().item(), rel=1e-12)
    assert amp.delta_norm.item() == pytest.approx(c.norm().item(), rel=1e-12)
    # U_ΔᵀWV_Δᵀ = diag(σ_idx) up to signs, so its norm is ‖σ_idx‖.
    assert amp.projected_delta.item() == pytest.approx(sigma_idx.norm().item(), rel=1e-10)
    assert amp.factor.item() == pytest.approx((c.norm() / sigma_idx.norm()).item(), rel=1e-10)
    assert amp.projected_weight.item() == pytest.approx(sigma[:4].norm().item(), rel=1e-12)
    torch.testing.assert_close(amp.delta_norm, torch.linalg.matrix_norm(delta_weight(A, B, s)))


def test_amplification_matches_dense_definition():
    W, A, B = torch.randn(30, 20, dtype=F64), torch.randn(3, 20, dtype=F64), torch.randn(30, 3, dtype=F64)
    amp = amplification(W, A, B, 0.7, generator=torch.Generator().manual_seed(1))
    U, S, Vh = torch.linalg.svd(delta_weight(A, B, 0.7))
    assert amp.projected_delta.item() == pytest.approx(torch.linalg.matrix_norm(U[:, :3].T @ W @ Vh[:3].T).item())
    Uw, _, Vhw = torch.linalg.svd(W)
    assert amp.projected_weight.item() == pytest.approx(projected_norm(W, Uw[:, :3], Vhw[:3]).item())
    g = torch.Generator().manual_seed(1)  # the random directions: U, then V, from the generator
    Ur, Vr = random_orthonormal(30, 3, generator=g), random_orthonormal(20, 3, generator=g)
    torch.testing.assert_close(Ur.T @ Ur, torch.eye(3, dtype=F64))
    assert amp.projected_random.item() == pytest.approx(projected_norm(W, Ur, Vr.T).item())
    # Projection onto W's own top directions is the largest possible.
    assert amp.projected_weight >= amp.projected_delta and amp.projected_weight >= amp.projected_random


def test_random_projection_matches_expectation():
    # E‖UᵀWV‖²_F = k²‖W‖²_F / (d_out d_in) for Haar-random U, V.
    n, d_out, d_in, r = 400, 24, 18, 3
    W = torch.randn(n, d_out, d_in, dtype=F64) * torch.linspace(0.1, 3, d_in, dtype=F64)
    A, B = torch.randn(n, r, d_in, dtype=F64), torch.randn(n, d_out, r, dtype=F64)
    amp = amplification(W, A, B, generator=torch.Generator().manual_seed(0))
    ratio = (amp.projected_random**2).mean() / (r**2 * (amp.weight_norm**2).mean() / (d_out * d_in))
    assert ratio.item() == pytest.approx(1.0, abs=0.1)


def test_lowrank_weight_svd_is_close_for_decaying_spectrum():
    W, A, B, s, sigma, *_ = planted_layer(d_out=120, d_in=100, decay=0.8)
    exact = amplification(W, A, B, s, weight_svd="exact")
    approx = amplification(W, A, B, s, weight_svd="lowrank")
    assert approx.projected_weight.item() == pytest.approx(exact.projected_weight.item(), rel=1e-6)


# --- reading adapters ---------------------------------------------------------------------------


def test_pair_layers_strips_prefixes():
    pairs, a1, a2 = pair_layers(
        ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.1.k_proj"],
        ["model.layers.1.q_proj", "transformer.model.layers.0.q_proj", "model.layers.1.v_proj"],
    )
    assert pairs == [("model.layers.0.q_proj", "transformer.model.layers.0.q_proj"),
                     ("model.layers.1.q_proj", "model.layers.1.q_proj")]
    assert a1 == ["model.layers.1.k_proj"] and a2 == ["model.layers.1.v_proj"]


# --- command line -------------------------------------------------------------------------------


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))


def test_cli_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    safetensors = pytest.importorskip("safetensors.torch")
    import matplotlib

    matplotlib.use("Agg")
    from lora_kernels import apply_lora, lora_state_dict
    from lora_kernels.analysis.cli import main

    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(base, tmp_path / "base.pt")

    # Adapter 1: this package's state dict, r=4, with a planted update on layer "0".
    apply_lora(model, ["0", "2"], r=4, alpha=8.0)
    sd = lora_state_dict(model)
    W, A, B, s, _, sigma_idx, c = planted_layer(d_out=32, d_in=24, r=4, scaling=8.0 / 4)
    base["0.weight"] = W.float()
    torch.save(base, tmp_path / "base.pt")
    sd["0.lora_A.weight"], sd["0.lora_B.weight"] = A.float(), B.float()
    sd["2.lora_B.weight"] = torch.randn(16, 4)
    safetensors.save_file(sd, str(tmp_path / "ours.safetensors"))

    # Adapter 2: PEFT layout, r=8, sharing adapter 1's top input direction on layer "0".
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    top = torch.linalg.svd(A.float())[2][0]
    A8 = torch.randn(8, 24)
    A8 -= torch.outer(A8 @ top, top)
    A8[0] = 50 * top
    peft = {
        "base_model.model.0.lora_A.weight": A8,
        "base_model.model.0.lora_B.weight": torch.randn(32, 8),
        "base_model.model.2.lora_A.weight": torch.randn(8, 32),
        "base_model.model.2.lora_B.weight": torch.randn(16, 8),
    }
    safetensors.save_file(peft, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "use_rslora": False}))

    out = tmp_path / "sim"
    assert main([str(tmp_path / "ours.safetensors"), str(peft_dir), "-o", str(out), "--alpha", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    layers = report["similarity"]["layers"]
    assert [r["layer"] for r in layers] == ["0", "2"]
    rec = layers[0]
    assert (rec["r_1"], rec["r_2"]) == (4, 8)
    assert set(rec["factors"]) == {"A", "B", "dW_in", "dW_out"}
    assert len(rec["factors"]["A"]["phi"]) == 4 and len(rec["factors"]["A"]["phi"][0]) == 8
    assert rec["factors"]["A"]["phi_1_1"] == pytest.approx(1.0, abs=1e-5)
    for name in ("report.md", "plots/0.png", "plots/2.png"):
        assert (out / name).stat().st_size > 0
    assert "## Subspace similarity" in (out / "report.md").read_text()

    amp_out = tmp_path / "amp"
    assert main([str(tmp_path / "ours.safetensors"), "--base", str(tmp_path / "base.pt"),
                 "-o", str(amp_out), "--alpha", "8"]) == 0
    amp = json.loads((amp_out / "report.json").read_text())["amplification"][0]["layers"]
    first = amp[0]
    assert first["layer"] == "0" and first["scaling"] == pytest.approx(2.0)
    assert first["delta_norm"] == pytest.approx(c.norm().item(), rel=1e-5)
    assert first["amplification"] == pytest.approx((c.norm() / sigma_idx.norm()).item(), rel=1e-4)
    assert "## Amplification" in (amp_out / "report.md").read_text()
    assert not (amp_out / "plots").exists()


def test_cli_scaling_from_peft_config_and_errors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    from lora_kernels.analysis.cli import main

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"q_proj": 2}})
    )
    sd = {f"base_model.model.layers.0.{m}.lora_{f}.weight": t
          for m in ("q_proj", "v_proj") for f, t in (("A", torch.randn(4, 12)), ("B", torch.randn(10, 4)))}
    safetensors.save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    adapter = load_adapter(str(tmp_path))
    assert adapter.layers["layers.0.q_proj"].scaling == pytest.approx(2 / 2)  # alpha_pattern, rsLoRA: 2/sqrt(4)
    assert adapter.layers["layers.0.v_proj"].scaling == pytest.approx(8 / 2)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])  # one adapter without --base
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path), "--factors", "C"])


def test_torch_save_and_peft_in_memory_names(tmp_path):
    from lora_kernels.analysis import BaseWeights
    from lora_kernels.analysis.cli import main

    A, B, W = torch.randn(2, 6), torch.randn(5, 2), torch.randn(6, 5)  # W stored transposed (Conv1D)
    torch.save({"h.0.attn.c_attn.lora_A.default.weight": A, "h.0.attn.c_attn.lora_B.default.weight": B,
                "h.0.attn.c_attn.base_layer.weight": W, "h.0.attn.c_attn.lora_A.other.weight": A},
               tmp_path / "inmem.pt")
    with pytest.raises(ValueError, match="several adapters"):
        load_adapter(str(tmp_path / "inmem.pt"))
    adapter = load_adapter(str(tmp_path / "inmem.pt"), adapter_name="default", scaling=0.5)
    layer = adapter.layers["h.0.attn.c_attn"]
    assert layer.scaling == 0.5 and torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
    weight, note = BaseWeights(str(tmp_path / "inmem.pt")).weight("h.0.attn.c_attn", (5, 6))
    assert torch.equal(weight, W.T) and "transposed" in note

    # A lone LoRALinear's state dict (keys without a path), compared with itself in float32.
    torch.save({"lora_A.weight": A, "lora_B.weight": B}, tmp_path / "lone.pt")
    out = tmp_path / "out"
    assert main([str(tmp_path / "lone.pt"), str(tmp_path / "lone.pt"), "-o", str(out), "--no-plots",
                 "--dtype", "float32", "--factors", "A,dW_out"]) == 0
    rec = json.loads((out / "report.json").read_text())["similarity"]["layers"][0]
    assert rec["layer"] == "" and rec["factors"]["A"]["phi_diag"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert "(root)" in (out / "report.md").read_text()


def test_cli_help(capsys):
    from lora_kernels.analysis.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "subspace similarity" in capsys.readouterr().out
