"""Per-step cost of dyncorr's covariance update: the dense EMA of M against ``LatentStatistics``'
lazy update (O(B d_sae^2) against O(B k^2 + d_sae) plus the fold-back every
``ceil(log(fold_threshold) / log(1 - beta))`` steps, amortised)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from profiling.model import COV_DTYPES, TrainSpec, key_bytes, n_pairs


def fold_threshold() -> float:
    """``LatentStatistics``' default fold threshold, read from its signature (one source of truth)."""
    from trainer.saes.covariance import LatentStatistics

    return float(inspect.signature(LatentStatistics.__init__).parameters["fold_threshold"].default)


@dataclass(frozen=True)
class CovarianceCost:
    """Per-step cost of the EMA second-moment update (dyncorr), dense vs lazy."""

    dense_flops: int  # z^T z (2 B d_sae^2) + the EMA of M (3 d_sae^2)
    dense_bytes: int  # read z twice, write/read Q, read+write M
    lazy_flops: int  # per-pair product and scaled scatter-add, mu's index_add and EMA, + amortised fold
    lazy_bytes: int  # keys + products written and read, M entries read+written, mu; + amortised fold
    fold_every: int  # steps between fold-backs (M_buf *= scale), O(d_sae^2) each
    pairs: int  # B k (k+1) / 2 entries scattered per step


def covariance_cost(s: TrainSpec) -> CovarianceCost:
    B, n, k = s.batch_size, s.d_sae, s.k
    c, kb = COV_DTYPES[s.cov_dtype], key_bytes(n)
    a = 2 if s.effective_dtype == "bfloat16" else 4
    fold = math.ceil(math.log(fold_threshold()) / math.log(1.0 - s.beta)) if s.beta < 1 else 1
    P1 = n_pairs(B, k, diagonal=True)
    dense_flops = 2 * B * n * n + 3 * n * n
    dense_bytes = 2 * B * n * a + 2 * n * n * c + 2 * n * n * c
    lazy_flops = 3 * P1 + 2 * B * k + 3 * n + n * n // fold
    lazy_bytes = P1 * (2 * kb + 2 * c + 2 * c) + B * k * (8 + c) + 3 * n * c + 2 * n * n * c // fold
    return CovarianceCost(dense_flops, dense_bytes, lazy_flops, lazy_bytes, fold, P1)
