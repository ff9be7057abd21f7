"""Decorrelation metrics: a tiny case derived by hand, synthetic latents with a known correlation
structure against a brute-force float64 numpy computation, the tie to the dyncorr penalty, the
decoder redundancy, and eval.json / sae compare."""

import math

import numpy as np
import pytest
import torch

from trainer.config import SAEConfig
from trainer.evaluation.decorrelation import (LatentCodes, decoder_redundancy, decorrelation_metrics,
                                              latent_correlations)
from trainer.saes import build_sae
from trainer.saes.corr_penalty import dense_correlation_penalty


def _codes(z: np.ndarray, rows: int = 3) -> LatentCodes:
    t = torch.from_numpy(z)
    return LatentCodes.from_dense(t.split(rows), z.shape[1])


def brute_force(z: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Dense float64: np.corrcoef over all rows, pairs i < j with (z > 0)^T (z > 0) > 0."""
    fired = (z > 0).astype(np.float64)
    co = np.triu(fired.T @ fired > 0, k=1)
    std = z.std(0)
    co &= (std[:, None] * std[None, :]) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.corrcoef(z, rowvar=False)[co]
    alive = int((fired.sum(0) > 0).sum())
    return {"n_coactive_pairs": int(co.sum()), "n_alive_latents": alive,
            "coactive_pair_fraction": co.sum() / (alive * (alive - 1) / 2),
            "mean_sq_corr_coactive": float(np.mean(R ** 2)), "mean_abs_corr_coactive": float(np.mean(np.abs(R))),
            "frac_coactive_abs_corr_gt_0_5": float(np.mean(np.abs(R) > threshold))}


def test_tiny_case_by_hand():
    # a, b co-fire in row 0 only and are uncorrelated (E[ab] = 1/4 = E[a] E[b]); c co-fires with both,
    # R_ac = R_bc = 0.125 / sqrt(0.25 * 0.1875) = 1/sqrt(3); d never co-fires (its R_ad = -1/sqrt(3)
    # must not count), e never fires.
    z = np.array([[1, 1, 1, 0, 0],
                  [1, 0, 1, 0, 0],
                  [0, 1, 1, 0, 0],
                  [0, 0, 0, 1, 0]], dtype=np.float64)
    m = latent_correlations(_codes(z, rows=2))
    assert m["n_rows"] == 4 and m["n_alive_latents"] == 4 and m["n_coactive_pairs"] == 3
    assert m["n_undefined_pairs"] == 0 and m["coactive_pair_fraction"] == pytest.approx(3 / 6, abs=1e-15)
    assert m["mean_sq_corr_coactive"] == pytest.approx(2 / 9, abs=1e-15)  # (0 + 1/3 + 1/3) / 3
    assert m["mean_abs_corr_coactive"] == pytest.approx(2 / (3 * math.sqrt(3)), abs=1e-15)
    assert m["frac_coactive_abs_corr_gt_0_5"] == pytest.approx(2 / 3, abs=1e-15)


P_FIRE = 0.2


def planted_r(rho: float, p: float = P_FIRE) -> float:
    """Population R of z0 = f b, z1 = f (rho b + (1 - rho) e), f ~ Bernoulli(p), b, e ~ Exp(1)."""
    return (p * (1 + rho) - p * p) / math.sqrt((2 * p - p * p) * (p * (2 * rho * rho - 2 * rho + 2) - p * p))


def _structured(n=3000, d=40, seed=0) -> np.ndarray:
    """Latents with a known structure: pairs (2i, 2i+1), i < 4, share a firing event and carry
    values mixed with rho = (i + 1) / 4 (R from 0.66 to 1); the others fire independently (R ~ 0);
    38 and 39 never fire."""
    rng = np.random.default_rng(seed)
    z = np.where(rng.random((n, d)) < 0.1, rng.exponential(1.0, (n, d)), 0.0)
    for i in range(4):
        fire = rng.random(n) < P_FIRE
        base = rng.exponential(1.0, n)
        rho = (i + 1) / 4
        z[:, 2 * i] = np.where(fire, base, 0.0)
        z[:, 2 * i + 1] = np.where(fire, rho * base + (1 - rho) * rng.exponential(1.0, n), 0.0)
    z[:, 38:] = 0.0
    return z


def test_synthetic_structure_matches_brute_force_and_is_seen():
    z = _structured()
    want = brute_force(z)
    for block in (8 * 40, 8 * 40 * 7, 2**27):  # one latent per block, 7, all: the same numbers
        got = latent_correlations(_codes(z, rows=256), block_bytes=block)
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-12, abs=1e-15), (key, block)
    assert got["n_alive_latents"] == 38
    # The planted structure is what is measured: the planted pairs near their population R, the
    # independent latents near 0, and exactly the 4 planted pairs above 0.5.
    for i in range(4):
        assert np.corrcoef(z[:, 2 * i], z[:, 2 * i + 1])[0, 1] == pytest.approx(planted_r((i + 1) / 4), abs=0.05)
    rest = latent_correlations(LatentCodes.from_dense([torch.from_numpy(z[:, 8:])], 32))
    assert rest["frac_coactive_abs_corr_gt_0_5"] == 0.0 and rest["mean_sq_corr_coactive"] < 0.01
    assert got["frac_coactive_abs_corr_gt_0_5"] == pytest.approx(4 / want["n_coactive_pairs"], rel=1e-15)


def test_it_is_the_penalty_with_the_split_as_one_batch():
    """L_corr of docs/sae-math.md with beta = 1, eps = 0 and no history is the same number."""
    z = _structured(n=500, d=24, seed=3)
    zero = torch.zeros(24, 24, dtype=torch.float64)
    ref = dense_correlation_penalty(zero, zero[0], torch.from_numpy(z), beta=1.0, eps=0.0).item()
    assert latent_correlations(_codes(z))["mean_sq_corr_coactive"] == pytest.approx(ref, rel=1e-12)


def test_undefined_and_empty_cases():
    z = np.array([[2.0, 1.0, 0.0], [2.0, 3.0, 0.0], [2.0, 0.0, 1.0]])  # latent 0: constant, variance 0
    m = latent_correlations(_codes(z))
    assert m["n_undefined_pairs"] == 2 and m["n_coactive_pairs"] == 0 and math.isnan(m["mean_sq_corr_coactive"])
    none = latent_correlations(_codes(np.array([[1.0, 0.0], [0.0, 1.0]])))
    assert none["n_coactive_pairs"] == 0 and math.isnan(none["frac_coactive_abs_corr_gt_0_5"])


def test_decoder_redundancy_by_hand_and_brute_force():
    s = 1 / math.sqrt(2)
    W = torch.tensor([[1.0, 0.0], [0.0, 3.0], [s, s], [-2.0, 0.0]])  # norms do not matter
    # e1 -> 1/sqrt2, e2 -> 1/sqrt2, (e1+e2)/sqrt2 -> 1/sqrt2, -e1 -> 0 (with e2): mean 3 / (4 sqrt2)
    assert decoder_redundancy(W) == pytest.approx(3 / (4 * math.sqrt(2)), abs=1e-15)
    W = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    Wn = W.double().numpy()
    Wn /= np.linalg.norm(Wn, axis=1, keepdims=True)
    G = Wn @ Wn.T
    np.fill_diagonal(G, -np.inf)
    want = G.max(1).mean()
    assert decoder_redundancy(W, block_bytes=8 * 300 * 7) == pytest.approx(want, rel=1e-13)
    assert decoder_redundancy(W) == pytest.approx(want, rel=1e-13)


def test_through_a_topk_sae():
    sae = build_sae(SAEConfig(arch="topk", d_in=12, d_sae=48, k=4))
    x = torch.randn(700, 12, generator=torch.Generator().manual_seed(1))
    m = decorrelation_metrics(sae, [x[:300], x[300:]], 4)
    with torch.no_grad():
        z = sae.encode(x, 4).double().numpy()
    want = brute_force(z)
    assert m.n_rows == 700 and m.n_coactive_pairs == want["n_coactive_pairs"]
    assert m.mean_sq_corr_coactive == pytest.approx(want["mean_sq_corr_coactive"], rel=1e-12)
    assert np.isfinite(m.decoder_redundancy) and -1 <= m.decoder_redundancy <= 1


@pytest.mark.parametrize("arch", ["baseline", "topk", "dyncorr"])
def test_eval_json_has_the_section_for_every_arch(tmp_path, arch):
    """sae eval's decorrelation section is the brute-force numbers of the held-out latents."""
    from synthetic import sparse_data, write_store
    from trainer.config import RunConfig
    from trainer.evaluation import evaluate_run
    from trainer.evaluation.data import select_split
    from trainer.evaluation.loading import load_run
    from trainer.train import train

    x, _ = sparse_data(n=16 * 16 * 6, d=16, n_features=24, k=3, seed=4)
    store = write_store(tmp_path / "s.zarr", x * 7.0)
    flat = dict(store=str(store), out=str(tmp_path / "run"), arch=arch, d_sae=32, k=3, k_start=6, k_end=3,
                batch_size=64, n_tokens=64 * 12, lr=3e-3, device="cpu", checkpoint_every=1000)
    train(RunConfig.from_flat(flat))
    r = evaluate_run(tmp_path / "run", splice=False, device="cpu")
    dec = r["eval_result_metrics"]["decorrelation"]
    run = load_run(tmp_path / "run")
    rows = torch.cat(list(select_split(run).batches()))
    with torch.no_grad():
        z = run.sae.encode(rows, run.k).double().numpy()
    want = brute_force(z)
    assert dec["n_rows"] == len(rows) == r["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"]
    assert dec["n_coactive_pairs"] == want["n_coactive_pairs"] > 0
    for key in ("mean_sq_corr_coactive", "frac_coactive_abs_corr_gt_0_5", "mean_abs_corr_coactive"):
        assert dec[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    assert dec["decoder_redundancy"] == pytest.approx(decoder_redundancy(run.sae.W_dec), rel=1e-12)
