"""The latent pairs of a TopK batch: keys, products and their merge into distinct pairs.

Shared by the running statistics (:mod:`trainer.saes.covariance`) and the correlation penalty
(:mod:`trainer.saes.corr_penalty`). The latents arrive sparse: ``idx`` (B, k) int64 or int32
and ``val`` (B, k) >= 0, i.e. row ``b`` of the dense ``z`` (B, d_sae) is ``val[b]`` at columns
``idx[b]`` and 0 elsewhere; indices are distinct within a row (TopK guarantees it) and in
``0..d_sae-1``. A pair ``(lo, hi)``, ``lo < hi``, is keyed ``lo * d_sae + hi``: its flat position
in the upper triangle of a d_sae x d_sae matrix.

Merging the B k (k - 1) / 2 row pairs into distinct ones is a sort. On CPU, :func:`unique_pairs`
packs ``key << s | position`` into one int64 and sorts it with numpy's in-place sort (SIMD
quicksort on x86: 7x faster than ``torch.sort`` at 8.3M keys); elsewhere it calls
``torch.unique``. Both give the same distinct keys and the same row pair -> key map.
"""

from __future__ import annotations

from typing import NamedTuple

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
    """

    keys: Tensor
    q: Tensor
    m: Tensor
    q_diag: Tensor
    rows: int


def empty(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(n)``; on CPU from numpy's allocator, which asks for transparent huge pages
    for large arrays: the fresh 30-70 MB temporaries here then cost ~400 page faults instead of
    ~16,000 (torch's 4 KiB pages), half the time of a pass over them on a VM."""
    if device.type == "cpu" and dtype in _NUMPY:
        return torch.from_numpy(np.empty(n, dtype=_NUMPY[dtype]))
    return torch.empty(n, dtype=dtype, device=device)


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
    """Merge the row pairs of the sorted rows ``s`` into distinct pairs (the sort of the penalty).

    CPU: pack ``key << shift | pos`` into one int64 (two gathers and an add), sort it in place
    with numpy, then ``keys``, ``inv`` (ascending: the segment of each sorted entry) and ``pos``
    (where it came from) fall out with O(n) passes. Elsewhere: ``torch.unique`` on the keys."""
    B, k = s.shape
    n, dev = B * k * (k - 1) // 2, s.device
    p, q = _triu(k, dev)
    row = (torch.arange(B, device=dev) * (k * k)).unsqueeze(1)
    shift = max(1, (B * k * k - 1).bit_length())
    if dev.type != "cpu" or n > _INT32_MAX or d * d > 2**62 >> shift:
        keys = (s * d).index_select(1, p).add_(s.index_select(1, q)).reshape(-1)
        if d * d - 1 <= _INT32_MAX:
            keys = keys.to(torch.int32)  # the sort moves half the bytes
        uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
        return UniquePairs(uniq.to(torch.int64), inv, (row + (p * k + q)).reshape(-1))
    lo = ((s * d) << shift).add_(row).add_(torch.arange(k, device=dev) * k)  # (key_lo << shift) + b k^2 + p k
    hi = (s << shift).add_(torch.arange(k, device=dev))  # (key_hi << shift) + q
    packed = torch.index_select(lo, 1, p, out=empty(n, torch.int64, dev).view(B, -1))
    packed.add_(torch.index_select(hi, 1, q, out=empty(n, torch.int64, dev).view(B, -1)))
    pk = packed.view(-1).numpy()
    pk.sort()  # in place; the packed values are distinct, so any sort is the stable one
    pos = np.bitwise_and(pk, (1 << shift) - 1)
    pk >>= shift  # the keys, ascending
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(pk[1:], pk[:-1], out=first[1:])
    inv = np.cumsum(first, dtype=np.int32)
    inv -= 1
    return UniquePairs(torch.from_numpy(pk[first]), torch.from_numpy(inv), torch.from_numpy(pos))
