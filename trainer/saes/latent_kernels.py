"""The TopK SAE's sparse decoder and backward on CPU (numba).

Both weight gradients of a TopK step are products with the selection's by-latent pattern
(:class:`~trainer.saes.sparse_ops.ByLatent`): latent ``j``'s row of the gradient is a weighted
sum of the batch rows where ``j`` was selected. ``torch.sparse.mm`` computes it with MKL but
zero-fills a ``(d_sae, d_in)`` result first and copies it once more (two extra passes over
150 MB at d_sae 16,384, d_in 2,304), and the decoder's backward reads its ``grad_out`` rows
twice (``sampled_addmm`` for the values' gradient, ``sparse.mm`` for the weights'). Here:

* each gradient row is written once, its first group's sum initialising it;
* :data:`GROUP` rows are read side by side (the time goes to fetching 9 KB rows from memory in
  no predictable order: eight streams in flight instead of one);
* the decoder's two products share one read of each ``grad_out`` row;
* the latents are cut into blocks of about equal numbers of entries, so a frequent latent
  does not leave one thread with most of the work.

The decoder's forward (:func:`decode`) is the same gather row by row: ``x_hat[b]`` sums the k
decoder rows of its selection, eight read side by side (``embedding_bag`` reads one at a time).

Every row's sum is added in the same order (its entries in ascending batch row, or in the
selection's order for the decoder's forward, a group at a time), so the result does not
depend on the thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

BLOCKS = 64  # row / latent blocks of ~equal entry counts, shared out among the threads
GROUP = 8  # rows gathered side by side


@njit(inline="always")
def _group_sum(v, r, i):
    """``sum_g v[g] r[g][i]`` over a group of 8, as a balanced tree (a fixed order)."""
    return (((v[0] * r[0][i] + v[1] * r[1][i]) + (v[2] * r[2][i] + v[3] * r[3][i]))
            + ((v[4] * r[4][i] + v[5] * r[5][i]) + (v[6] * r[6][i] + v[7] * r[7][i])))


@njit(inline="always")
def _accumulate(o, v, r, first):
    """``o (=|+=) sum_g v[g] r[g]``: ``first`` writes instead of adding (no zero fill)."""
    if first:
        for i in range(o.size):
            o[i] = _group_sum(v, r, i)
    else:
        for i in range(o.size):
            o[i] += _group_sum(v, r, i)


@njit(inline="always")
def _gather_sum(o, vals, vsel, rows, rsel, e, e1):
    """``o = sum_{e <= p < e1} vals[vsel[p]] * rows[rsel[p]]``, a group of rows at a time, in
    that order (0 when the range is empty)."""
    first = True
    while e + GROUP <= e1:
        v = (vals[vsel[e]], vals[vsel[e + 1]], vals[vsel[e + 2]], vals[vsel[e + 3]],
             vals[vsel[e + 4]], vals[vsel[e + 5]], vals[vsel[e + 6]], vals[vsel[e + 7]])
        r = (rows[rsel[e]], rows[rsel[e + 1]], rows[rsel[e + 2]], rows[rsel[e + 3]],
             rows[rsel[e + 4]], rows[rsel[e + 5]], rows[rsel[e + 6]], rows[rsel[e + 7]])
        _accumulate(o, v, r, first)
        first = False
        e += GROUP
    if first:
        o[:] = rows.dtype.type(0.0)
    while e < e1:
        v1, r1 = vals[vsel[e]], rows[rsel[e]]
        for i in range(o.size):
            o[i] += v1 * r1[i]
        e += 1


@njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def _weight_grad(crow, cols, order, vals, dense, cuts, out):
    """``out[j] = sum_e vals[order[e]] * dense[cols[e]]`` over latent ``j``'s entries."""
    for blk in prange(cuts.size - 1):
        for j in range(cuts[blk], cuts[blk + 1]):
            _gather_sum(out[j], vals, order, dense, cols, crow[j], crow[j + 1])


@njit(cache=True, parallel=True, nogil=True, fastmath={"contract", "reassoc"})
def _decoder_grads(crow, cols, order, vals, W, grad_out, cuts, grad_vals, grad_W):
    """Per latent ``j`` and entry ``e`` (batch row ``b = cols[e]``): ``grad_vals[order[e]] =
    W[j] . grad_out[b]`` and ``grad_W[j] = sum_e vals[order[e]] grad_out[b]``, reading each
    ``grad_out[b]`` once for both. ``reassoc`` lets the dot products vectorise."""
    D = grad_out.shape[1]
    zero = grad_out.dtype.type(0.0)  # the dot products in the data's dtype, as sampled_addmm's
    for blk in prange(cuts.size - 1):
        for j in range(cuts[blk], cuts[blk + 1]):
            o, w = grad_W[j], W[j]
            e, e1 = crow[j], crow[j + 1]
            first = True
            while e + GROUP <= e1:
                p = (order[e], order[e + 1], order[e + 2], order[e + 3],
                     order[e + 4], order[e + 5], order[e + 6], order[e + 7])
                v = (vals[p[0]], vals[p[1]], vals[p[2]], vals[p[3]], vals[p[4]], vals[p[5]], vals[p[6]], vals[p[7]])
                r = (grad_out[cols[e]], grad_out[cols[e + 1]], grad_out[cols[e + 2]], grad_out[cols[e + 3]],
                     grad_out[cols[e + 4]], grad_out[cols[e + 5]], grad_out[cols[e + 6]], grad_out[cols[e + 7]])
                d0 = d1 = d2 = d3 = d4 = d5 = d6 = d7 = zero
                for i in range(D):
                    wi = w[i]
                    d0 += wi * r[0][i]
                    d1 += wi * r[1][i]
                    d2 += wi * r[2][i]
                    d3 += wi * r[3][i]
                    d4 += wi * r[4][i]
                    d5 += wi * r[5][i]
                    d6 += wi * r[6][i]
                    d7 += wi * r[7][i]
                _accumulate(o, v, r, first)
                first = False
                grad_vals[p[0]], grad_vals[p[1]], grad_vals[p[2]], grad_vals[p[3]] = d0, d1, d2, d3
                grad_vals[p[4]], grad_vals[p[5]], grad_vals[p[6]], grad_vals[p[7]] = d4, d5, d6, d7
                e += GROUP
            if first:
                o[:] = zero
            while e < e1:
                q = order[e]
                v1, r1 = vals[q], grad_out[cols[e]]
                d = zero
                for i in range(D):
                    d += w[i] * r1[i]
                    o[i] += v1 * r1[i]
                grad_vals[q] = d
                e += 1


@njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def _decode(idx, vals, W, bias, pos, out):
    """``out[b] = sum_p vals[b, p] W[idx[b, p]] + bias``, the bias added last (``idx``, ``vals``
    flat (B k,); ``pos`` = 0 .. B k - 1)."""
    B = out.shape[0]
    k = idx.size // B
    for blk in prange(BLOCKS):
        for b in range(B * blk // BLOCKS, B * (blk + 1) // BLOCKS):
            o = out[b]
            _gather_sum(o, vals, pos, W, idx, b * k, b * k + k)
            for i in range(o.size):  # the row is in L1 by now
                o[i] += bias[i]


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these: CPU tensors of one float dtype (float32 or float64)."""
    dt = tensors[0].dtype
    return dt in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dt for t in tensors)


def _cuts(crow: torch.Tensor) -> torch.Tensor:
    """Block boundaries over the latents, each block holding about nnz / BLOCKS entries."""
    nnz = int(crow[-1])
    targets = torch.linspace(0, nnz, BLOCKS + 1, dtype=torch.float64).round().to(crow.dtype)
    cuts = torch.searchsorted(crow, targets)
    cuts[0], cuts[-1] = 0, crow.numel() - 1
    return torch.unique_consecutive(cuts.clamp_(max=crow.numel() - 1))


def weight_grad(crow: torch.Tensor, cols: torch.Tensor, order: torch.Tensor, vals: torch.Tensor,
                dense: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(d_sae, D)``: row ``j`` is the sum of ``vals`` (B, k) times the ``dense`` (B, D) rows
    over latent ``j``'s entries of the pattern (``crow``, ``cols``, ``order``); every row of
    ``out`` (contiguous, when given) is written."""
    if out is None:
        out = torch.empty(crow.numel() - 1, dense.shape[1], dtype=dense.dtype)
    _weight_grad(crow.numpy(), cols.numpy(), order.numpy(), vals.detach().contiguous().view(-1).numpy(),
                 dense.detach().contiguous().numpy(), _cuts(crow).numpy(), out.numpy())
    return out


def decoder_grads(crow: torch.Tensor, cols: torch.Tensor, order: torch.Tensor, vals: torch.Tensor,
                  W: torch.Tensor, grad_out: torch.Tensor, grad_W: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse decoder's ``(grad_vals (B, k), grad_W (d_sae, d_in))`` for ``x_hat[b] = sum_p
    vals[b, p] W[idx[b, p]]``, given ``grad_out`` (B, d_in); every row of ``grad_W`` (contiguous,
    when given) is written."""
    vals, W = vals.detach().contiguous(), W.detach().contiguous()
    grad_vals = torch.empty_like(vals)
    if grad_W is None:
        grad_W = torch.empty_like(W)
    _decoder_grads(crow.numpy(), cols.numpy(), order.numpy(), vals.view(-1).numpy(), W.numpy(),
                   grad_out.detach().contiguous().numpy(), _cuts(crow).numpy(), grad_vals.view(-1).numpy(),
                   grad_W.numpy())
    return grad_vals, grad_W


def decode(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(B, d_in)``: ``sum_p vals[b, p] W[idx[b, p]] + bias`` (``embedding_bag``'s weighted sum
    plus ``b_dec``, added last as ``embedding_bag(...) + b_dec`` does)."""
    W = W.detach().contiguous()
    out = torch.empty(idx.shape[0], W.shape[1], dtype=W.dtype)
    _decode(idx.contiguous().view(-1).numpy(), vals.detach().contiguous().view(-1).numpy(), W.numpy(),
            bias.detach().contiguous().numpy(), np.arange(idx.numel(), dtype=np.int64), out.numpy())
    return out


@njit(cache=True, nogil=True)
def _by_latent(flat, k, d, order, crow, cols):
    """A counting sort of the selection's flat entries (uint64 latents) by latent, stable (each
    latent's entries in ascending position), into ``order``, ``crow``, ``cols``; False (the
    arrays unfinished) when a latent is not below d."""
    crow[:] = 0
    for lat in flat:
        if lat >= d:
            return False
        crow[lat + _U1] += 1
    for j in range(d):
        crow[j + 1] += crow[j]
    nxt = crow[:-1].copy()
    for e in range(flat.size):
        lat = flat[e]
        o = nxt[lat]
        nxt[lat] = o + 1
        order[o] = e
        cols[o] = e // k
    return True


_U1 = np.uint64(1)


def by_latent(idx: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``order, crow, cols`` of :class:`~trainer.saes.sparse_ops.ByLatent` for a (B, k) CPU int64
    selection, by one counting sort: what ``argsort(stable=True)``, ``bincount`` and ``cumsum``
    give, in two passes over the entries (0.1 vs 0.4 ms at B 512, k 64, d_sae 1,152; 1.1 vs 2.3 ms
    at B 4,096, d_sae 16,384: ``benchmarks/bench_kernels.py``, docs/benchmarks.md). None
    where it does not apply: another device or dtype, or an index outside ``0 .. d_sae - 1``."""
    if idx.device.type != "cpu" or idx.dtype != torch.int64 or idx.dim() != 2:
        return None
    n = idx.numel()
    order, cols = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    crow = torch.empty(d_sae + 1, dtype=torch.int64)
    # Unsigned: a negative index becomes a huge one, refused by the same bound check.
    flat = idx.contiguous().view(-1).numpy().view(np.uint64)
    if not _by_latent(flat, max(1, idx.shape[1]), np.uint64(d_sae), order.numpy(), crow.numpy(), cols.numpy()):
        return None
    return order, crow, cols


@njit(cache=True, parallel=True, nogil=True)
def _keep_positive(grad, code):
    n = grad.shape[0]
    zero = grad.dtype.type(0.0)
    for blk in prange(BLOCKS):
        # A slice per block: indexing the whole array with the block's (signed) positions keeps
        # numba's negative-index check in the loop, which then does not vectorise (16x slower).
        g = grad[n * blk // BLOCKS: n * (blk + 1) // BLOCKS]
        c = code[n * blk // BLOCKS: n * (blk + 1) // BLOCKS]
        for i in range(g.size):
            g[i] = g[i] if c[i] > zero else zero


def mask_to_positive_(grad: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``grad`` with 0 wherever ``code`` is not > 0 (NaN included), in place, without the bool
    mask and float copy of it that ``grad.mul_(code > 0)`` makes: AuxK's code gradient, which
    with every latent dead is a step's largest tensor. Kernel for contiguous CPU float32/64,
    ``masked_fill_`` otherwise."""
    if supported(grad, code) and grad.is_contiguous() and code.is_contiguous() and grad.shape == code.shape:
        _keep_positive(grad.view(-1).numpy(), code.view(-1).numpy())
        return grad
    return grad.masked_fill_(~(code > 0), 0)


__all__ = ["BLOCKS", "GROUP", "by_latent", "decode", "decoder_grads", "mask_to_positive_", "supported", "weight_grad"]
