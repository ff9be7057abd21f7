"""Decorrelation of an SAE's latents on held-out rows: what the dyncorr penalty is for.

Every number is computed fresh from the split's latents in float64 (never from a run's EMA
statistics), for every architecture, so TopK, baseline and dyncorr are comparable:

* ``Sigma`` is the population covariance of the latents over the ``n`` rows, ``R`` its
  correlation. A pair ``i < j`` is *co-active* when both latents fire (> 0) in at least one
  common row. ``mean_sq_corr_coactive`` is the mean of ``R_ij^2`` over the co-active pairs:
  the penalty's ``L_corr`` (docs/sae-math.md) with the whole split as one batch, ``beta = 1``
  and ``eps = 0`` (then ``S = Q - m m^T`` is exactly this covariance).
* ``decoder_redundancy``: mean over latents of the largest cosine similarity between its
  decoder direction and another one (signed: an opposite direction is not redundant).

Scale. Nothing ``d_sae x d_sae`` is held. The latents are kept sparse (CSR, float64 values:
``28 n L0`` bytes with the by-latent index and each entry's row end); the co-active Gram ``Q[lo, hi]`` is built one
block of ``lo`` latents at a time into a float64 ``(block, d_sae)`` buffer of at most
``block_bytes`` (default 128 MiB: 1024 latents at d_sae 16384), each entry summed over rows
in row order (so the numbers do not depend on the block size or the thread count), then
reduced to the pair statistics and cleared. Work: ``n L0 (L0 - 1) / 2`` products plus one
scan of the upper triangle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numba
import numpy as np
import torch
from numba import njit, prange

from trainer.saes.base import SAE
from trainer.saes.fused_pairs import kernel_threads

CORR_THRESHOLD = 0.5  # the |R| above which a co-active pair counts as strongly correlated
BLOCK_BYTES = 128 * 2**20  # the float64 (block, d_sae) Gram buffer
ENCODE_ROWS = 1024  # rows encoded at once: a dense (rows, d_sae) float32 latent block


@dataclass(frozen=True)
class DecorrelationMetrics:
    n_rows: int
    n_alive_latents: int  # fired on at least one row of the split
    n_coactive_pairs: int  # pairs i < j firing together in a row, with both variances > 0
    n_undefined_pairs: int  # co-active pairs with a zero-variance latent (fires on every row, one value)
    coactive_pair_fraction: float  # n_coactive_pairs / (n_alive_latents choose 2)
    mean_sq_corr_coactive: float  # mean R_ij^2 over the co-active pairs
    mean_abs_corr_coactive: float
    frac_coactive_abs_corr_gt_0_5: float  # share of co-active pairs with |R_ij| > 0.5
    decoder_redundancy: float  # mean over latents of max_{j != i} cos(W_dec_i, W_dec_j)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LatentCodes:
    """The firing latents of ``n_rows`` rows, CSR: row ``b`` holds ``cols[indptr[b]:indptr[b+1]]``
    (ascending) with ``vals`` (float64, > 0)."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    cols: np.ndarray  # (nnz,) int32
    vals: np.ndarray  # (nnz,) float64
    d_sae: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, batches: Iterable[torch.Tensor], d_sae: int) -> LatentCodes:
        """From dense latent batches ``(rows, d_sae)``; a value counts when it is > 0."""
        counts, cols, vals = [], [], []
        for z in batches:
            mask = z > 0
            counts.append(mask.sum(1).cpu().numpy())
            cols.append(mask.nonzero()[:, 1].to(torch.int32).cpu().numpy())  # row-major: ascending per row
            vals.append(z[mask].double().cpu().numpy())
        indptr = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(indptr, cat(cols, np.int32), cat(vals, np.float64), d_sae)


@njit(cache=True, parallel=True, nogil=True)
def _block_gram(lat_ptr, lat_pos, row_end, cols, vals, a, out):
    """``out[r, hi] += v_lo v_hi`` over the rows where ``lo = a + r`` and ``hi > lo`` fire,
    rows in ascending order; each ``lo`` writes only its own row of ``out`` (no races)."""
    for r in prange(out.shape[0]):
        lo = a + r
        for t in range(lat_ptr[lo], lat_ptr[lo + 1]):
            e = lat_pos[t]
            v = vals[e]
            for f in range(e + 1, row_end[e]):
                out[r, cols[f]] += v * vals[f]


@njit(cache=True, parallel=True, nogil=True)
def _block_stats(out, a, n, mean, std, thr, acc):
    """Per ``lo`` row of the block: [pairs, undefined, sum R^2, sum |R|, count |R| > thr] into
    ``acc``; clears the visited entries of ``out`` for the next block."""
    d = out.shape[1]
    for r in prange(out.shape[0]):
        lo = a + r
        pairs = undefined = above = 0.0
        sq = ab = 0.0
        for hi in range(lo + 1, d):
            q = out[r, hi]
            if q != 0.0:  # a sum of products of positive values: non-zero iff co-active
                out[r, hi] = 0.0
                den = std[lo] * std[hi]
                if den == 0.0:
                    undefined += 1.0
                    continue
                R = (q / n - mean[lo] * mean[hi]) / den
                pairs += 1.0
                sq += R * R
                ab += abs(R)
                if abs(R) > thr:
                    above += 1.0
        acc[lo, 0] = pairs
        acc[lo, 1] = undefined
        acc[lo, 2] = sq
        acc[lo, 3] = ab
        acc[lo, 4] = above


def _moments(codes: LatentCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per latent: firing count, mean and standard deviation over all rows (zeros included),
    the variance in two passes (no ``E[z^2] - m^2`` cancellation)."""
    n, d = codes.n_rows, codes.d_sae
    fires = np.bincount(codes.cols, minlength=d)
    mean = np.bincount(codes.cols, weights=codes.vals, minlength=d) / n
    centred = np.bincount(codes.cols, weights=(codes.vals - mean[codes.cols]) ** 2, minlength=d)
    var = (centred + (n - fires) * mean**2) / n
    return fires, mean, np.sqrt(var)


def latent_correlations(codes: LatentCodes, *, threshold: float = CORR_THRESHOLD,
                        block_bytes: int = BLOCK_BYTES) -> dict[str, float]:
    """The co-active-pair statistics of :class:`DecorrelationMetrics` (all but the decoder's)."""
    n, d = codes.n_rows, codes.d_sae
    if n == 0:
        raise ValueError("no rows to measure latent correlations on")
    fires, mean, std = _moments(codes)
    # By latent: the CSR positions of each latent's entries, rows ascending (stable sort).
    lat_pos = np.argsort(codes.cols, kind="stable").astype(np.int64)
    lat_ptr = np.zeros(d + 1, dtype=np.int64)
    np.cumsum(fires, out=lat_ptr[1:])
    row_end = np.repeat(codes.indptr[1:], np.diff(codes.indptr))  # end of each entry's row
    rows = max(1, min(d, block_bytes // (8 * d)))
    out = np.zeros((rows, d), dtype=np.float64)
    acc = np.zeros((d, 5), dtype=np.float64)
    numba.set_num_threads(kernel_threads())
    for a in range(0, d, rows):
        block = out[:min(rows, d - a)]
        _block_gram(lat_ptr, lat_pos, row_end, codes.cols, codes.vals, a, block)
        _block_stats(block, a, float(n), mean, std, float(threshold), acc)
    pairs, undefined, sq, ab, above = acc.sum(0)
    alive = int((fires > 0).sum())
    possible = alive * (alive - 1) / 2
    ratio = lambda x: float(x / pairs) if pairs else math.nan  # noqa: E731
    return {"n_rows": n, "n_alive_latents": alive, "n_coactive_pairs": int(pairs), "n_undefined_pairs": int(undefined),
            "coactive_pair_fraction": float(pairs / possible) if possible else math.nan,
            "mean_sq_corr_coactive": ratio(sq), "mean_abs_corr_coactive": ratio(ab),
            "frac_coactive_abs_corr_gt_0_5": ratio(above)}


@torch.no_grad()
def decoder_redundancy(W_dec: torch.Tensor, *, block_bytes: int = BLOCK_BYTES) -> float:
    """Mean over the ``d_sae`` rows of ``W_dec`` of the largest cosine similarity to another row,
    float64, in blocks of rows; a zero row has cosine 0 with everything. NaN when d_sae < 2."""
    d = W_dec.shape[0]
    if d < 2:
        return math.nan
    W = W_dec.detach().double()
    W = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-300)
    rows = max(1, min(d, block_bytes // (8 * d)))
    total = 0.0
    for a in range(0, d, rows):
        G = W[a:a + rows] @ W.T
        G[torch.arange(len(G)), torch.arange(a, a + len(G))] = -math.inf
        total += G.max(1).values.sum().item()
    return total / d


@torch.no_grad()
def decorrelation_metrics(sae: SAE, batches: Iterable[torch.Tensor], k: int | None = None, *,
                          threshold: float = CORR_THRESHOLD, block_bytes: int = BLOCK_BYTES) -> DecorrelationMetrics:
    """Encode ``batches`` (raw rows, as :func:`~trainer.evaluation.reconstruction.evaluate`) at
    ``k`` and measure the latents' correlations and the decoder's redundancy."""
    was_training = sae.training
    sae.eval()
    try:
        dense = (sae.encode(x, k) for batch in batches for x in batch.split(ENCODE_ROWS))
        codes = LatentCodes.from_dense(dense, sae.cfg.d_sae)
    finally:
        sae.train(was_training)
    stats = latent_correlations(codes, threshold=threshold, block_bytes=block_bytes)
    return DecorrelationMetrics(**stats, decoder_redundancy=decoder_redundancy(sae.W_dec, block_bytes=block_bytes))
