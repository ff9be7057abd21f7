"""SAE models: interface, decoder constraint, and recovery of a known sparse dictionary."""

import numpy as np
import pytest
import torch

from synthetic import sparse_data, write_store
from trainer.config import RunConfig, SAEConfig
from trainer.saes import ARCHS, StepContext, build_sae
from trainer.train import train

TRAINABLE = [a for a, cls in ARCHS.items() if getattr(cls, "trainable", True)]  # not jumprelu (sae import)


@pytest.mark.parametrize("arch", TRAINABLE)
def test_interface_shapes_and_unit_decoder(arch):
    sae = build_sae(SAEConfig(arch=arch, d_in=16, d_sae=32, k=4, k_start=8, k_end=4))
    x = torch.randn(64, 16)
    out = sae(x, StepContext(k=6 if arch == "dyncorr" else 4, sparsity_coef=0.1, lam=0.5))
    assert out.x_hat.shape == x.shape and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.fired.shape == (32,) and out.fired.dtype == torch.bool
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach())  # W_enc initialised as W_dec^T
    out.loss.backward()
    sae.project_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    z = sae.encode(x)
    assert z.shape == (64, 32) and (z >= 0).all()
    if arch != "baseline":
        assert ((z > 0).sum(1) <= (4 if arch == "topk" else 4)).all()


def test_baseline_loss_is_mse_plus_weighted_l1():
    sae = build_sae(SAEConfig(arch="baseline", d_in=8, d_sae=8))
    x = torch.randn(10, 8, dtype=torch.float32)
    out = sae(x, StepContext(sparsity_coef=0.5))
    z = torch.relu((x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc)
    mse = ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    l1 = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.loss, mse + 0.5 * l1)


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory):
    x, D = sparse_data(n=16 * 16 * 24, d=32, n_features=32, k=3, seed=0)
    return write_store(tmp_path_factory.mktemp("syn") / "s.zarr", x), D


@pytest.mark.parametrize("arch", ["topk", "dyncorr"])
def test_recovers_a_known_sparse_dictionary(sparse_store, tmp_path, arch):
    store, D = sparse_store
    cfg = RunConfig.from_flat(dict(store=str(store), out=str(tmp_path / arch), arch=arch, d_sae=48, k=3, k_start=8,
                                   k_end=3, lambda_max=0.05, batch_size=256, n_tokens=256 * 400, epochs=40, lr=5e-3,
                                   dead_after_tokens=10_000, heldout_chunks=2, device="cpu", log_every=50,
                                   checkpoint_every=10_000))
    summary = train(cfg)
    from safetensors.torch import load_file

    W_dec = load_file(tmp_path / arch / "sae.safetensors")["W_dec"].double().numpy()
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    best = (D @ W_dec.T).max(axis=1)  # best cosine of each true feature with any latent
    # Random unit directions in 32 dims reach ~0.5 at best: 0.9 means the feature was found.
    assert np.mean(best > 0.9) >= 0.8, np.sort(best)
    assert summary["heldout"]["explained_variance"] > 0.9
    assert summary["heldout"]["l0"] <= 3.0


@pytest.mark.parametrize("arch", TRAINABLE)
def test_training_steps_under_bf16_autocast(arch):
    """CUDA training runs the forward under bf16 autocast; CPU autocast takes the same code path."""
    sae = build_sae(SAEConfig(arch=arch, d_in=16, d_sae=64, k=4, k_start=6, k_end=4, k_aux=8, dead_after_tokens=1))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # dead_after_tokens=1: from step 1 on every silent latent is dead (AuxK runs)
        x = torch.randn(32, 16, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, StepContext(step=step, k=5 if arch == "dyncorr" else 4, sparsity_coef=0.1, lam=0.5))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        sae.project_decoder_grad()
        for name, p in sae.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
        opt.step()
        sae.normalize_decoder()
        sae.after_step(out)
    if arch != "baseline":
        assert out.terms["auxk_loss"] > 0


def test_fired_mask_marks_latents_with_a_positive_entry():
    from trainer.saes.base import SAE

    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(50, generator=g)[:6] for _ in range(9)])
    val = torch.randn(9, 6, generator=g).clamp(min=0)  # about half exactly 0: not fired
    val[0, 0] = float("nan")
    ref = torch.zeros(50, dtype=torch.bool)
    for b in range(9):
        for p in range(6):
            if val[b, p] > 0:
                ref[idx[b, p]] = True
    got = SAE.fired_mask(idx, val, 50)
    assert got.dtype == torch.bool and torch.equal(got, ref) and 0 < int(got.sum()) < 50
    assert not SAE.fired_mask(idx[:0], val[:0], 50).any()
