"""The latent pairs of a TopK batch: keys, products and their merge into distinct pairs.

Shared by the running statistics (:mod:`trainer.saes.covariance`) and the correlation penalty
(:mod:`trainer.saes.corr_penalty`). The latents arrive sparse: ``idx`` (B, k) int64 or int32
and ``val`` (B, k) >= 0, i.e. row ``b`` of the dense ``z`` (B, d_sae) is ``val[b]`` at columns
``idx[b]`` and 0 elsewhere; indices are distinct within a row (TopK guarantees it) and in
``0..d_sae-1``. A pair ``(lo, hi)``, ``lo < hi``, is keyed ``lo * d_sae + hi``: its flat position
in the upper triangle of a d_sae x d_sae matrix.

Merging the B k (k - 1) / 2 row pairs into distinct ones is a sort: :func:`unique_pairs` calls
``torch.unique`` (any device). On CPU the penalty takes the fused path instead
(:mod:`trainer.saes.fused_pairs`), which the tests hold to this one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int32: np.int32, torch.int64: np.int64,
          torch.bool: np.bool_}


class PairMoments(NamedTuple):
    """Sums over the rows of a batch, what one step of the running statistics needs.

    ``keys`` (U,) int64: the distinct row pairs' keys ``lo * d_sae + hi``, ascending; ``q`` (U,):
    ``sum_b z_b,lo z_b,hi`` (= B Q_t[lo, hi], may be 0 where a value is 0); ``m`` (d_sae,):
    ``sum_b z_b`` (= B m_t); ``q_diag`` (d_sae,): ``sum_b z_b^2`` (= B diag Q_t); ``rows``: B.
    ``triangle``: instead of ``keys`` and ``q`` (both None then), the pair sums left in a dense
    array of the upper triangle (``fused_pairs.DenseSums``: ``add_to(flat, scale)`` adds them into
    the statistics' buffer, ``pairs()`` reads the keys and sums out). Read them with :meth:`pairs`.
    A ``triangle`` is consumed by the update that adds it (its array goes back to a pool for the
    next batch): call :meth:`pairs` before it to keep the keys and sums, which the update then
    takes instead.
    """

    keys: Tensor | None
    q: Tensor | None
    m: Tensor
    q_diag: Tensor
    rows: int
    triangle: Any = None

    def pairs(self) -> tuple[Tensor, Tensor]:
        """The distinct keys and their sums, whichever form they came in."""
        return self.triangle.pairs() if self.triangle is not None else (self.keys, self.q)


def empty(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(n)``; on CPU from numpy's allocator, which asks for transparent huge pages
    for large arrays: the fresh 30-70 MB temporaries here then cost ~400 page faults instead of
    ~16,000 (torch's 4 KiB pages), half the time of a pass over them on a VM."""
    if device.type == "cpu" and dtype in _NUMPY:
        return torch.from_numpy(np.empty(n, dtype=_NUMPY[dtype]))
    return torch.empty(n, dtype=dtype, device=device)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """``torch.zeros(shape)``; on CPU from numpy (huge pages, as :func:`empty`): the d_sae x d_sae
    buffer, read and scattered at random every step, then needs 512x fewer TLB entries."""
    device = torch.device(device or "cpu")
    if device.type == "cpu" and dtype in _NUMPY:
        return torch.from_numpy(np.zeros(shape, dtype=_NUMPY[dtype]))
    return torch.zeros(shape, dtype=dtype, device=device)


def check_topk(idx: Tensor, val: Tensor, d_sae: int) -> None:
    if idx.dim() != 2 or idx.shape != val.shape:
        raise ValueError(f"idx and val must both be (B, k); got {tuple(idx.shape)} and {tuple(val.shape)}")
    if idx.shape[0] == 0:
        raise ValueError("empty batch (B = 0)")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be int64 or int32, got {idx.dtype}")
    if not val.is_floating_point():
        raise TypeError(f"val must be floating point, got {val.dtype}")
    if idx.shape[1] > d_sae:
        raise ValueError(f"k = {idx.shape[1]} > d_sae = {d_sae}")


def latent_sums(idx: Tensor, v: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """``sum_b z_b`` and ``sum_b z_b^2`` (each (d,)): the batch mean and diag(Q_t) times B."""
    flat_idx, flat_v = idx.reshape(-1), v.reshape(-1)
    m = v.new_zeros(d).index_add_(0, flat_idx, flat_v)
    return m, v.new_zeros(d).index_add_(0, flat_idx, flat_v * flat_v)


def sorted_rows(idx: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's indices sorted (so every pair ``p < q`` of a row is ``lo, hi``), the sorting
    permutation, and the values in that order."""
    s, perm = idx.sort(dim=1)
    return s, perm, v.gather(1, perm)


def _triu(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``p, q`` of the k (k - 1) / 2 pairs ``p < q`` of a row, in row-major order."""
    return torch.triu_indices(k, k, 1, device=device)


def row_pairs(s: Tensor, vs: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Keys ``lo * d + hi`` (int64) and products ``v_lo * v_hi`` of every row's pairs ``p < q``
    (sorted rows ``s``, values ``vs``), flattened row by row, duplicates across rows kept. A few
    whole-batch ops (no loop over p: under load every parallel op can wait a time slice)."""
    p, q = _triu(s.shape[1], s.device)
    keys = (s * d).index_select(1, p).add_(s.index_select(1, q)).reshape(-1)
    return keys, vs.index_select(1, p).mul_(vs.index_select(1, q)).reshape(-1)


class UniquePairs(NamedTuple):
    """The distinct pairs of a batch. ``keys`` (U,) int64 ascending; for every row pair, in one
    common order (n = B k (k - 1) / 2 entries): ``inv``, the position of its key in ``keys``, and
    ``pos = b k^2 + p k + q``, its entry in a (B, k, k) matrix of the sorted rows."""

    keys: Tensor
    inv: Tensor
    pos: Tensor


def unique_pairs(s: Tensor, d: int) -> UniquePairs:
    """Merge the row pairs of the sorted rows ``s`` into distinct pairs with ``torch.unique``."""
    B, k = s.shape
    dev = s.device
    p, q = _triu(k, dev)
    row = (torch.arange(B, device=dev) * (k * k)).unsqueeze(1)
    keys = (s * d).index_select(1, p).add_(s.index_select(1, q)).reshape(-1)
    if d * d - 1 <= _INT32_MAX:
        keys = keys.to(torch.int32)  # the sort moves half the bytes
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    return UniquePairs(uniq.to(torch.int64), inv, (row + (p * k + q)).reshape(-1))
