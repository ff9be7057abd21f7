"""Reconstruction metrics of an SAE on a split of the store, accumulated in float64."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from trainer.saes.base import SAE


@dataclass(frozen=True)
class ReconstructionMetrics:
    n_tokens: int
    mse: float  # mean over tokens and dimensions
    explained_variance: float  # 1 - SSE / SST around the split's mean
    cosine_similarity: float  # mean over tokens of cos(x, x_hat)
    l0: float
    l1: float
    dead_fraction: float  # latents that never fired on the split
    frac_alive_gt_1pct: float  # latents firing on more than 1% of tokens
    frac_alive_gt_10pct: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(sae: SAE, batches: Iterable[torch.Tensor], *, k: int | None = None) -> ReconstructionMetrics:
    """One pass over ``batches`` (already normalised like the training data)."""
    was_training = sae.training
    sae.eval()
    n = 0
    sse = l0 = l1 = cos = 0.0
    sum_x = sum_x2 = None
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    for x in batches:
        z = sae.encode(x, k)
        x_hat = sae.decode(z)
        xd = x.double()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_x2 = xd.pow(2).sum(0) if sum_x2 is None else sum_x2 + xd.pow(2).sum(0)
        sse += (x_hat.double() - xd).pow(2).sum().item()
        active = z > 0
        l0 += active.sum().item()
        l1 += z.double().sum().item()
        fires += active.sum(0).double()
        cos += torch.nn.functional.cosine_similarity(x_hat.double(), xd, dim=-1).sum().item()
        n += x.shape[0]
    sae.train(was_training)
    if n == 0:
        raise ValueError("evaluation split is empty")
    sst = (sum_x2 - sum_x.pow(2) / n).sum().item()
    rate = fires / n
    return ReconstructionMetrics(
        n_tokens=n, mse=sse / (n * sae.cfg.d_in), explained_variance=1.0 - sse / sst if sst > 0 else float("nan"),
        cosine_similarity=cos / n, l0=l0 / n, l1=l1 / n, dead_fraction=(fires == 0).double().mean().item(),
        frac_alive_gt_1pct=(rate > 0.01).double().mean().item(), frac_alive_gt_10pct=(rate > 0.1).double().mean().item())
