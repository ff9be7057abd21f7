"""Row-wise top-k of the encoder's pre-activations on CPU (numba), and AuxK's selection among
the dead latents (:func:`aux_code`).

``torch.topk`` on a ``(4096, 16384)`` float32 block takes ~90 ms on two cores, ~3 GB/s: far
from the memory bound of one pass (``benchmarks/bench_kernels.py`` times both). Here each row is
read once from memory, then worked on in L1/L2:

1. Each value becomes an order-preserving unsigned key (flip every bit of a negative float, the
   sign bit of a positive one), and the row's k-th largest key is narrowed bit by bit from the
   top: one counting pass per bit (:func:`_refine`), which vectorises and never branches on the
   data, until at most 1/8 of the row (and at least 2k keys, :func:`narrow_limit`) reaches the
   bound: the sign and exponent bits, and a few more.
2. The keys that reach it are compacted with their positions, and the remaining bits are found
   on those alone; one last pass over them keeps the keys above the k-th, then those equal to
   it from the lowest index, in ascending index order.

A row holding NaN takes a size-k min-heap over the whole row instead, in which NaN counts as the
largest value, as in ``torch.topk``, so a non-finite pre-activation still reaches the loss and
the step is skipped. The result is the same set of values as ``torch.topk``; among exactly equal
values at the k-th place the lower index is kept (``torch.topk`` leaves that choice unspecified;
here -0.0 ranks just below +0.0, which only ever picks between zeros that ReLU makes equal).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


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


@njit(inline="always")
def _refine(keys, k, bit_masks, t, top, n_ge, limit):
    """Narrow ``t``, a lower bound reached by ``n_ge`` >= k of ``keys`` (unsigned), towards the
    k-th largest key, bit ``top`` downwards, while more than ``limit`` keys reach it. One counting
    pass per bit, which vectorises and never branches on the data. Returns ``t, top, n_ge`` where
    ``top`` is the next bit to try, -1 once t is final: the k-th largest key itself, or a bound
    exactly k keys reach. Either way the keys above t, then those equal to it, are the k largest."""
    while top >= 0 and n_ge > limit:
        cand = t | bit_masks[top]
        c = 0
        for key in keys:  # iterated, not indexed: a signed index's wrap-around check stops LLVM vectorising
            c += key >= cand
        if c >= k:
            t, n_ge = cand, c
            if c == k:  # exactly k keys reach it: no tie to break
                return t, -1, n_ge
        top -= 1
    return t, top, n_ge


@njit(cache=True, parallel=True, nogil=True)
def topk_rows(pre, bits, k, bit_masks, limit, val, idx):
    """``val, idx`` (B, k): the k largest entries of each row of ``pre`` (B, S), in ascending index
    order (module docstring). ``bits``: ``pre`` viewed as unsigned integers of its width,
    ``bit_masks[i] = 1 << i`` in that type; ``limit``: at most this many keys reaching the bound
    before the rest of the search runs on them alone."""
    B, S = pre.shape
    sign = bit_masks[-1]
    ones = ~(sign ^ sign)
    n_blocks = min(B, 64)
    for blk in prange(n_blocks):
        keys = np.empty(S, dtype=bits.dtype)
        sub = np.empty(S, dtype=bits.dtype)
        cand = np.empty(S, dtype=np.int64)
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            row, brow, vb, ib = pre[b], bits[b], val[b], idx[b]
            nan = False
            for j in range(S):
                u = brow[j]
                keys[j] = u ^ (ones if u & sign else sign)
                nan |= row[j] != row[j]
            if nan:
                for j in range(S):
                    cand[j] = j
                _heap_select(row, cand, S, k, vb, ib)
                order = np.argsort(ib)  # the heap's order, put in ascending index order
                hv, hi = vb[order], ib[order]
                vb[:] = hv
                ib[:] = hi
                continue
            # The top bits over the whole row, until few keys reach the bound; the rest over those
            # keys alone, which alone go through the final selection.
            t, top, _ = _refine(keys, k, bit_masks, sign ^ sign, bit_masks.shape[0] - 1, S, limit)
            n = 0
            for j in range(S):  # branch-free compaction
                kj = keys[j]
                sub[n] = kj
                cand[n] = j
                n += kj >= t
            t = _refine(sub[:n], k, bit_masks, t, top, n, 0)[0]
            ties = k
            for q in range(n):
                ties -= sub[q] > t
            p = 0
            for q in range(n):
                kq = sub[q]
                if kq > t or (kq == t and ties > 0):
                    ties -= kq == t
                    vb[p] = row[cand[q]]
                    ib[p] = cand[q]
                    p += 1


_MASKS32 = np.left_shift(np.ones(32, dtype=np.uint32), np.arange(32, dtype=np.uint32))


def narrow_limit(S: int, k: int) -> int:
    """Keys reaching the bound (at most) before :func:`topk_rows` compacts them: 1/8 of the row,
    and at least 2k. At B 512 / 4096 rows, k 64 (d_sae 1152 / 4608 / 16384): 0.48 / 10.9 / 36.5 ms,
    against 0.62 / 11.0 / 36.0 ms at 1/32 and 0.50 / 11.0 / 36.1 ms at 1/4; compacting at 2k keys
    instead costs 58 ms at d_sae 16384 (docs/benchmarks.md)."""
    return max(2 * k, S // 8)


def topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values, indices`` of each row's k largest entries, like ``torch.topk(pre, k, sorted=False)``
    (the same set, here in ascending index order): the numba kernel for a contiguous float32 CPU
    block, ``torch.topk`` otherwise."""
    if pre.device.type != "cpu" or pre.dtype != torch.float32 or pre.dim() != 2 or not pre.is_contiguous() \
            or pre.requires_grad or not 0 < k <= pre.shape[1]:
        return torch.topk(pre, k, dim=-1, sorted=False)
    val = torch.empty(pre.shape[0], k, dtype=pre.dtype)
    idx = torch.empty(pre.shape[0], k, dtype=torch.int64)
    p = pre.numpy()
    topk_rows(p, p.view(np.uint32), k, _MASKS32, narrow_limit(pre.shape[1], k), val.numpy(), idx.numpy())
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
            t = _refine(keys, k_aux, bit_masks, none, bit_masks.shape[0] - 1, n, 0)[0]
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
