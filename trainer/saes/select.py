"""Row-wise top-k of the encoder's pre-activations on CPU (numba), in about one read of them,
and AuxK's selection among the dead latents (:func:`aux_code`).

``torch.topk`` on a ``(4096, 16384)`` float32 block takes ~90 ms on two cores, ~3 GB/s:
far from the memory bound of one pass (``benchmarks/bench_kernels.py`` times both). Here each
row is read once from memory into L2 and then, in part, once more from there:

1. The row is cut into about 4k groups (of 8 to 64 values, :func:`group_size`); each group's
   maximum is a vectorised reduction. ``tau``, the k-th largest group maximum, is a value at
   least k entries reach (the k groups whose maximum is at least ``tau`` each hold one), so
   every entry of the row's top k is ``>= tau``.
2. The entries ``>= tau``, looked for only in the groups whose maximum reaches it (about a
   quarter; for i.i.d. rows about 1.1 k entries in all), go through a size-k min-heap that keeps
   the largest, preferring the lower index on ties.

A row holding NaN or +-inf (read from the exponent bits while the maxima are formed) takes the
heap over the whole row instead, in which NaN counts as the largest value, as in ``torch.topk``,
so a non-finite pre-activation still reaches the loss and the step is skipped. The result is
the same set of values as ``torch.topk``; among exactly equal values at the k-th place the
lower index is kept (``torch.topk`` leaves that choice unspecified).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


def group_size(S: int, k: int) -> int:
    """Values per group: ~4k groups, so a quarter of them reach ``tau`` (the k-th of 4k maxima)."""
    return max(8, min(64, S // (4 * k)))


@njit(inline="always")
def _key(v):
    return np.inf if v != v else v


@njit(inline="always")
def _sift_down(hv, hi, i, k):
    """Restore the min-heap (on :func:`_key`, ties: the larger index on top, evicted first) below ``i``."""
    while True:
        c = 2 * i + 1
        if c >= k:
            return
        r = c + 1
        if r < k and (_key(hv[r]) < _key(hv[c]) or (_key(hv[r]) == _key(hv[c]) and hi[r] > hi[c])):
            c = r
        if _key(hv[c]) < _key(hv[i]) or (_key(hv[c]) == _key(hv[i]) and hi[c] > hi[i]):
            hv[i], hv[c] = hv[c], hv[i]
            hi[i], hi[c] = hi[c], hi[i]
            i = c
        else:
            return


@njit(cache=True, nogil=True)
def _heap_select(row, cand, n, k, hv, hi):
    """The k largest of ``row[cand[:n]]`` (``cand`` ascending) into the heap ``hv, hi``. No
    fastmath here: NaN must compare as the largest value."""
    for p in range(k):
        hv[p] = row[cand[p]]
        hi[p] = cand[p]
    for s in range(k // 2 - 1, -1, -1):
        _sift_down(hv, hi, s, k)
    for p in range(k, n):
        v = row[cand[p]]
        # Strictly larger only: an equal value at a higher index never displaces a lower one.
        if _key(v) > _key(hv[0]):
            hv[0] = v
            hi[0] = cand[p]
            _sift_down(hv, hi, 0, k)


_EXP = np.int32(0x7F800000)  # float32 exponent bits: all set for +-inf and NaN


@njit(cache=True, nogil=True, fastmath=True)
def _candidates(row, bits, k, group, maxima, cand):
    """The ascending positions of the entries ``>= tau`` into ``cand``, their count returned;
    -1 when the row holds a non-finite value. fastmath vectorises the group maxima; finiteness
    is read from the exponent bits (integer tests that fastmath cannot fold away)."""
    S = row.shape[0]
    n_groups = maxima.shape[0]
    bad = np.int32(0)
    for g in range(n_groups):
        g0 = g * group
        m = row[g0]
        for j in range(g0, min(g0 + group, S)):
            m = max(m, row[j])
            bad |= np.int32((bits[j] & _EXP) == _EXP)
        maxima[g] = m
    if bad:
        return -1
    tau = np.partition(maxima, n_groups - k)[n_groups - k]
    n = 0
    for g in range(n_groups):
        if maxima[g] >= tau:  # about a quarter of the groups: the others hold no candidate
            for j in range(g * group, min(g * group + group, S)):
                cand[n] = j  # branch-free compaction
                n += row[j] >= tau
    return n


@njit(cache=True, parallel=True, nogil=True)
def topk_rows(pre, k, group, val, idx):
    """``val, idx`` (B, k): the k largest entries of each row of ``pre`` (B, S), unsorted."""
    B, S = pre.shape
    n_groups = (S + group - 1) // group
    bits = pre.view(np.int32)
    n_blocks = min(B, 64)  # rows in blocks, so the scratch arrays are allocated once per block
    for blk in prange(n_blocks):
        cand = np.empty(S, dtype=np.int64)
        maxima = np.empty(n_groups, dtype=pre.dtype)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            n = -1
            if n_groups >= k:
                n = _candidates(pre[b], bits[b], k, group, maxima, cand)
            if n < 0:  # a non-finite row, or too few groups: every entry is a candidate
                for j in range(S):
                    cand[j] = j
                n = S
            _heap_select(pre[b], cand, n, k, val[b], idx[b])


def topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values, indices`` of each row's k largest entries, like ``torch.topk(pre, k, sorted=False)``:
    the numba kernel for a contiguous float32 CPU block, ``torch.topk`` otherwise."""
    if pre.device.type != "cpu" or pre.dtype != torch.float32 or pre.dim() != 2 or not pre.is_contiguous() \
            or pre.requires_grad or not 0 < k or -(-pre.shape[1] // group_size(pre.shape[1], k)) < 2 * k:
        # Elsewhere, and where k is a large share of the row (AuxK's k_aux), torch's own is as fast.
        return torch.topk(pre, k, dim=-1, sorted=False)
    val = torch.empty(pre.shape[0], k, dtype=pre.dtype)
    idx = torch.empty(pre.shape[0], k, dtype=torch.int64)
    topk_rows(pre.numpy(), k, group_size(pre.shape[1], k), val.numpy(), idx.numpy())
    return val, idx


@njit(cache=True, parallel=True, nogil=True)
def aux_code_rows(pre, bits, dead, k_aux, bit_masks, sign, out):
    """``out[b, j] = ReLU(pre[b, dead[j]])`` where that entry is among the row's ``k_aux`` largest
    over ``dead``, 0 elsewhere; among exactly equal values at the ``k_aux``-th place the lower
    ``j`` is kept. ``bits``: ``pre`` viewed as unsigned integers of its width, ``bit_masks[i] =
    1 << i`` and ``sign`` (the top bit) in that type.

    The threshold is found bit by bit on the values' order-preserving integer keys (flip every
    bit of a negative float, the sign bit of a positive one): one counting pass per bit, which
    vectorises and never branches on the data (a quickselect, which mispredicts about every
    other comparison on random rows, ran 2x slower here: docs/benchmarks.md). A row holding NaN keeps every entry (NaN passes
    ReLU, as in torch), so the AuxK loss turns non-finite and the step is skipped."""
    B = pre.shape[0]
    n = dead.shape[0]
    n_blocks = min(B, 64)
    zero = out.dtype.type(0.0)
    none = bit_masks[0] ^ bit_masks[0]
    ones = ~none
    for blk in prange(n_blocks):
        vals = np.empty(n, dtype=out.dtype)
        keys = np.empty(n, dtype=bits.dtype)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            row, brow, o = pre[b], bits[b], out[b]
            nan = False
            for j in range(n):
                v = row[dead[j]]
                vals[j] = v
                nan |= v != v
                u = brow[dead[j]]
                keys[j] = u ^ (ones if u & sign else sign)
            if k_aux >= n or nan:
                for j in range(n):
                    v = vals[j]
                    o[j] = zero if v <= zero else v
                continue
            # t: the k_aux-th largest key, built from the top bit down, or, once exactly k_aux
            # keys reach it, that bound: either way the keys above t, then those equal to it,
            # are the k_aux largest.
            t = none
            for i in range(bit_masks.shape[0] - 1, -1, -1):
                cand = t | bit_masks[i]
                c = 0
                for j in range(n):
                    c += keys[j] >= cand
                if c >= k_aux:
                    t = cand
                    if c == k_aux:  # exactly k_aux keys reach it: no tie to break
                        break
            ties = k_aux
            for j in range(n):
                ties -= keys[j] > t
            for j in range(n):
                kj = keys[j]
                keep = kj > t
                if kj == t and ties > 0:
                    keep = True
                    ties -= 1
                v = vals[j]
                o[j] = v if keep and v > zero else zero


_UINTS = {torch.float32: np.uint32, torch.float64: np.uint64}


def aux_code(pre: torch.Tensor, dead_idx: torch.Tensor, k_aux: int, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK's dense ``(B, n_dead)`` code in ``dtype`` (written into ``out`` when given): ReLU of
    each row's ``k_aux`` largest pre-activations among the latents ``dead_idx``, 0 elsewhere. The
    numba kernel for a contiguous float32 / float64 CPU block (one pass, no ``(B, n_dead)``
    temporaries), else ``index_select``, ``torch.topk`` and a scatter."""
    n = dead_idx.numel()
    k_aux = min(k_aux, n)
    if pre.device.type == "cpu" and pre.dtype == dtype and dtype in (torch.float32, torch.float64) \
            and pre.dim() == 2 and pre.is_contiguous() and not pre.requires_grad and k_aux > 0:
        dst = out if out is not None and out.is_contiguous() else torch.empty(pre.shape[0], n, dtype=dtype)
        u = _UINTS[dtype]
        width = 8 * np.dtype(u).itemsize
        masks = np.left_shift(np.ones(width, dtype=u), np.arange(width, dtype=u))
        p = pre.numpy()
        aux_code_rows(p, p.view(u), dead_idx.to(torch.int64).numpy(), k_aux, masks, masks[-1], dst.numpy())
        return dst if out is None or dst is out else out.copy_(dst)
    pre_dead = pre.index_select(1, dead_idx).to(dtype)
    pos = torch.topk(pre_dead, k_aux, dim=-1, sorted=False).indices
    code = torch.zeros_like(pre_dead).scatter_(1, pos, torch.relu(pre_dead.gather(1, pos)))
    return code if out is None else out.copy_(code)
