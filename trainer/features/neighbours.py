"""Correlation neighbours of a latent: the latents with the largest ``|R_ij|``.

Two sources: the dyncorr run's own EMA statistics ``(mu, M)`` (its checkpoint; ``Sigma = M - mu
mu^T``, the very matrix its penalty reads, docs/sae-math.md) and, for every architecture, the
Pearson correlation of the latents over the evaluated split (:mod:`trainer.features.scan`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from trainer import artifacts as A
from trainer.config import SAEConfig
from trainer.saes.covariance import LatentStatistics

log = logging.getLogger(__name__)
_COV_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def top_neighbours(corr_row: np.ndarray, latent: int, n: int) -> list[dict[str, float | int]]:
    """The ``n`` other latents with the largest finite ``|corr|`` (ties: lower index first)."""
    r = np.asarray(corr_row, dtype=np.float64).copy()
    r[latent] = np.nan
    ok = np.flatnonzero(np.isfinite(r) & (r != 0))
    order = ok[np.lexsort((ok, -np.abs(r[ok])))][:n]
    return [{"latent": int(j), "corr": float(r[j])} for j in order]


def sigma_statistics(run_dir: Path, sae_cfg: SAEConfig) -> LatentStatistics | None:
    """The dyncorr run's latent statistics from its last checkpoint; None for other archs or
    when the run has no checkpoint (e.g. imported with ``sae import``)."""
    if sae_cfg.arch != "dyncorr":
        return None
    ckpt = A.run_paths(run_dir).checkpoint
    try:
        state = json.loads((ckpt / A.CKPT_STATE).read_text())
        extra = state["module_extra_state"]["stats._extra_state"]
        with safe_open(str(ckpt / A.CKPT_MODEL), framework="pt") as f:
            tensors = {"M_buf": f.get_tensor("stats.M_buf"), "mu": f.get_tensor("stats.mu")}
    except (OSError, KeyError, ValueError) as e:
        log.warning("no latent statistics in %s (%s): Sigma neighbours left out", ckpt, e)
        return None
    stats = LatentStatistics(sae_cfg.d_sae, beta=sae_cfg.beta, eps=sae_cfg.eps, dtype=_COV_DTYPES[sae_cfg.cov_dtype])
    stats.load_state_dict({**tensors, "_extra_state": extra})
    return stats


def sigma_correlations(stats: LatentStatistics, latents: np.ndarray) -> np.ndarray:
    """``R[latents, :]`` of ``Sigma = M - mu mu^T`` (float64): ``(len(latents), d_sae)``;
    NaN where a variance is <= 0 (a latent that never fired, with eps = 0)."""
    rows = torch.as_tensor(latents, dtype=torch.int64)
    M = stats.second_moment(rows, None, dtype=torch.float64)
    mu = stats.mean().double()
    var = stats.variance(dtype=torch.float64)
    cov = M - mu[rows, None] * mu[None, :]
    denom = (var[rows, None] * var[None, :]).sqrt()
    corr = cov / denom
    corr[~(denom > 0)] = float("nan")
    return corr.numpy()
