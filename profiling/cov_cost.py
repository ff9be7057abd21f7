"""Per-step cost of dyncorr's covariance update: the dense EMA of M against ``LatentStatistics``'
lazy update (O(B d_sae^2) against O(U + d_sae) plus the fold-back every
``ceil(log(fold_threshold) / log(1 - beta))`` steps, amortised).

The lazy update scatters the U distinct pairs that the correlation penalty has already built
(``penalty_and_moments`` hands them over as ``PairMoments``), so building the B k (k-1) / 2 row
pairs and merging them is the penalty's cost, not counted here."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from profiling.model import COV_DTYPES, TrainSpec, unique_pairs


def fold_threshold() -> float:
    """``LatentStatistics``' default fold threshold, read from its signature (one source of truth)."""
    from trainer.saes.covariance import LatentStatistics

    return float(inspect.signature(LatentStatistics.__init__).parameters["fold_threshold"].default)


@dataclass(frozen=True)
class CovarianceCost:
    """Per-step cost of the EMA second-moment update (dyncorr), dense vs lazy."""

    dense_flops: int  # z^T z (2 B d_sae^2) + the EMA of M (3 d_sae^2)
    dense_bytes: int  # read z twice, write/read Q, read+write M
    lazy_flops: int  # scale the pair sums, scatter-add them and the diagonal, mu's EMA, + amortised fold
    lazy_bytes: int  # keys + sums read, scaled sums written and read, M entries read+written, diagonal, mu; + fold
    fold_every: int  # steps between fold-backs (M_buf *= scale), O(d_sae^2) each
    pairs: int  # U distinct off-diagonal pairs scattered per step (+ the d_sae diagonal entries)


def covariance_cost(s: TrainSpec) -> CovarianceCost:
    B, n = s.batch_size, s.d_sae
    c = COV_DTYPES[s.cov_dtype]
    a = 2 if s.effective_dtype == "bfloat16" else 4
    fold = math.ceil(math.log(fold_threshold()) / math.log(1.0 - s.beta)) if s.beta < 1 else 1
    U = unique_pairs(s)
    dense_flops = 2 * B * n * n + 3 * n * n
    dense_bytes = 2 * B * n * a + 2 * n * n * c + 2 * n * n * c
    lazy_flops = 2 * U + 2 * n + 3 * n + n * n // fold
    lazy_bytes = U * (8 + c + 2 * c + 2 * c) + n * (8 + c + 2 * c + 2 * c) + 3 * n * c + 2 * n * n * c // fold
    return CovarianceCost(dense_flops, dense_bytes, lazy_flops, lazy_bytes, fold, U)
