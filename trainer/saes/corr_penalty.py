"""The correlation penalty of the dyncorr SAE against its running statistics (docs/sae-math.md).

``L_corr`` is the mean of ``R_ij^2`` over the co-active pairs of the batch, ``R`` the
correlation of ``S = (1 - beta) M_{t-1} + beta (Q_t + eps I) - mu~ mu~^T``. The batch's
distinct pairs and their sums ``B Q_t[i, j]`` are exactly what the running statistics'
update scatters next, so :func:`penalty_and_moments` hands them over (:class:`PairMoments`)
and ``LatentStatistics.update(..., moments=...)`` skips rebuilding them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.saes import fused_pairs
from trainer.saes.fused_pairs import DensePairs, build_pairs, fused_pairs_supported, latent_terms, sort_rows
from trainer.saes.pairs import PairMoments, check_topk, empty, latent_sums, sorted_rows, unique_pairs

if TYPE_CHECKING:
    from trainer.saes.covariance import LatentStatistics

__all__ = ["correlation_penalty", "dense_correlation_penalty", "penalty_and_moments"]

DIAGNOSTICS = ("n_pairs", "mean_abs_R", "max_abs_R", "min_var", "nonfinite")


def correlation_penalty(stats: LatentStatistics, idx: Tensor, val: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_corr`` of the batch against ``stats`` at step t-1, differentiable w.r.t. ``val``.

    Call it BEFORE ``stats.update(idx, val)`` for the same batch. Cost O(B k^2 log(B k^2) +
    d_sae) time and O(B k^2 + d_sae) memory: the B k (k-1) / 2 per-row pairs are keyed
    ``lo * d_sae + hi``, merged by a sort (:func:`~trainer.saes.pairs.unique_pairs`), and only
    those entries of ``M_{t-1}`` are gathered. Nothing B x d_sae is built, nothing d_sae x d_sae
    either except on CPU when its upper triangle holds at most 4x as many entries as the batch has
    row pairs (the dense path of :mod:`trainer.saes.fused_pairs`: O(B k^2) memory still). The
    gradient is written out by hand (:class:`_CorrPenalty`): autograd through the pair arrays
    cost twice the forward.

    Returns the scalar loss (buffer dtype) and diagnostics as detached 0-d tensors on the
    buffers' device (``.item()`` them only when logging): ``n_pairs`` (co-active unordered
    pairs), ``mean_abs_R``, ``max_abs_R``, ``min_var`` (smallest ``S_ii`` among the latents of
    those pairs) and ``nonfinite`` (number of non-finite ``R_ij``). With eps = 0, ``S_ii = 0``
    gives inf/NaN (no clamping, no exception): check ``torch.isfinite(loss)``.
    """
    loss, diag, _ = penalty_and_moments(stats, idx, val)
    return loss, diag


def penalty_and_moments(stats: LatentStatistics, idx: Tensor, val: Tensor
                        ) -> tuple[Tensor, dict[str, Tensor], PairMoments]:
    """:func:`correlation_penalty` plus the batch's :class:`PairMoments` (detached), for
    ``stats.update(idx, val, moments=...)`` after the optimiser step."""
    check_topk(idx, val, stats.d_sae)
    dt, dev, d = stats.dtype, stats.device, stats.d_sae
    idx = idx.to(device=dev, dtype=torch.int64)
    v = val.to(device=dev, dtype=dt)  # autograd casts the gradient back to val's dtype
    if idx.shape[1] < 2:
        m, q_diag = latent_sums(idx, v.detach(), d)
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return (v * 0).sum(), _no_pairs(dt, dev), PairMoments(empty, v.new_zeros(0), m, q_diag, idx.shape[0])
    box: list[PairMoments] = []
    fn = _FusedCorrPenalty if fused_pairs_supported(idx.shape[0], idx.shape[1], d, dev) else _CorrPenalty
    loss, *diag = fn.apply(v, idx, stats, box)
    return loss, dict(zip(DIAGNOSTICS, diag)), box[0]


class _CorrPenalty(torch.autograd.Function):
    """Forward and hand-written backward of ``L_corr`` (docs/sae-math.md), gradient w.r.t. ``v`` only.

    With ``P = |P_t|``, per pair ``a_ij = dL/dS_ij = 2 R_ij / (P sqrt(S_ii S_jj))`` and per latent
    ``c_i = dL/dS_ii = -sum_j R_ij^2 / (P S_ii)``; ``g_mu = dL/dmu~`` collects ``-a_ij mu~_j``
    and ``-2 c_i mu~_i``. The batch's moments enter ``S`` with gradient weight 1, not beta (the
    batch-gradient convention), so for entry ``(b, p)`` of latent ``l`` with value ``v``::

        dL/dv = (1 / B) (g_mu_l + 2 c_l v + sum_q a_{l, idx[b, q]} v_q)

    the last sum being a (k x k) @ (k) product per row. Pairs with ``Q_t[i, j] = 0`` (a zero
    value) are masked, not dropped: they keep their slot in the unique array but weigh 0.
    """

    @staticmethod
    def forward(ctx, v: Tensor, idx: Tensor, stats: LatentStatistics, box: list):
        B, k = idx.shape
        d, beta = stats.d_sae, stats.beta
        m, q_diag, mu_t, s_diag = _latent_terms(stats, idx, v)
        rs = s_diag.rsqrt()

        s, perm, vs = sorted_rows(idx, v)
        uniq, inv, pos = unique_pairs(s, d)
        U, dev = uniq.numel(), v.device
        # U- and n-sized buffers come from `empty`: on CPU their page faults cost as much as the
        # arithmetic. Each is written in place where the maths allows.
        # The row pairs' products v_p v_q, read from the (B, k, k) outer products at pos.
        outer = torch.mul(vs.unsqueeze(2), vs.unsqueeze(1), out=empty(B * k * k, v.dtype, dev).view(B, k, k))
        prods = torch.index_select(outer.view(-1), 0, pos, out=empty(pos.numel(), v.dtype, dev))
        del outer
        q_pair = empty(U, v.dtype, dev).zero_().index_add_(0, inv, prods)  # B * Q_t[lo, hi]
        del prods
        box.append(PairMoments(uniq, q_pair, m, q_diag, B))
        i, j = _split(uniq, d)
        keep = torch.ne(q_pair, 0, out=empty(U, torch.bool, dev))  # co-active; i != j (idx distinct per row)
        n_pairs = keep.sum()
        # S_ij = (1 - beta) M_{t-1}[i, j] + beta Q_t[i, j] - mu~_i mu~_j
        s_ij = torch.index_select(stats.M_buf.view(-1), 0, uniq, out=empty(U, v.dtype, dev))
        s_ij.mul_((1.0 - beta) * stats.scale).add_(q_pair, alpha=beta / B)
        x_i = torch.index_select(mu_t, 0, i, out=empty(U, v.dtype, dev))
        x_j = torch.index_select(mu_t, 0, j, out=empty(U, v.dtype, dev))
        s_ij.addcmul_(x_i, x_j, value=-1.0)
        # rr = 1 / sqrt(S_ii S_jj), 0 on masked pairs; S_ii <= 0 -> inf / NaN on a kept pair, on purpose.
        rr = torch.index_select(rs, 0, i, out=x_i).mul_(torch.index_select(rs, 0, j, out=x_j))
        rr.masked_fill_(keep.logical_not_(), 0.0)
        del x_j, keep
        R = s_ij.mul_(rr)
        P = n_pairs.clamp(min=1).to(v.dtype)  # no pair: every R is 0, loss 0, gradient 0
        loss = torch.dot(R, R) / P
        ctx.d = d
        ctx.save_for_backward(v, idx, perm, vs, inv, pos, i, j, mu_t, s_diag, R, rr, P)
        ctx.mark_non_differentiable(*(diag := _diagnostics(loss, R, P, n_pairs, s, vs, s_diag)))
        return (loss, *diag)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        v, idx, perm, vs, inv, pos, i, j, mu_t, s_diag, R, rr, P = ctx.saved_tensors
        d = ctx.d
        B, k = idx.shape
        go = grad_loss / P
        U, dev = R.numel(), R.device
        a = torch.mul(R, rr, out=empty(U, R.dtype, dev)).mul_(2.0 * go)  # dL/dS_ij, 0 on masked pairs
        tmp = torch.mul(R, R, out=empty(U, R.dtype, dev))
        num = v.new_zeros(d).index_add_(0, i, tmp).index_add_(0, j, tmp)  # sum_j R_ij^2 per latent
        c = torch.where(num != 0, -go * num / s_diag, v.new_zeros(()))  # dL/dS_ii; 0 outside the pairs
        g_mu = v.new_zeros(d).index_add_(0, i, torch.index_select(mu_t, 0, j, out=tmp).mul_(a))
        g_mu.index_add_(0, j, torch.index_select(mu_t, 0, i, out=tmp).mul_(a))
        del tmp
        g_mu = -g_mu - 2.0 * c * mu_t
        # sum_q a_{pq} v_q per row: each row pair's weight into a (B, k, k) matrix A (upper
        # triangle), then (A + A^T) v per row as two batched matmuls.
        a_rows = torch.index_select(a, 0, inv, out=empty(inv.numel(), a.dtype, dev))
        del a
        A = empty(B * k * k, v.dtype, dev).zero_().index_copy_(0, pos, a_rows).view(B, k, k)
        del a_rows
        x = vs.unsqueeze(2)
        g_sorted = torch.bmm(A, x).add_(torch.bmm(A.transpose(1, 2), x)).squeeze(2)
        del A
        g = v.new_zeros(B, k).scatter_(1, perm, g_sorted)
        flat_idx = idx.reshape(-1)
        g += g_mu.index_select(0, flat_idx).view(B, k) + 2.0 * c.index_select(0, flat_idx).view(B, k) * v
        return g / B, None, None, None  # no factor beta: the batch-gradient convention (docs/sae-math.md)


class _FusedCorrPenalty(torch.autograd.Function):
    """:class:`_CorrPenalty` on CPU with the O(B k^2) passes fused (:mod:`trainer.saes.fused_pairs`:
    sorted pairs, or a dense triangle for a small d_sae): the same maths and outputs; with the
    update, ~2.7x less wall time at d_sae 16384, k 64, B 4096 (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, v: Tensor, idx: Tensor, stats: LatentStatistics, box: list):
        B, k = idx.shape
        d, beta = stats.d_sae, stats.beta
        dense = fused_pairs.dense_triangle(B, k, d, v.element_size())  # through the module: tests patch it
        got = DensePairs.forward(idx, v, stats.M_buf, stats.mu, beta, stats.scale, stats.diag_extra, stats.eps,
                                 with_grad=ctx.needs_input_grad[0]) if dense else None
        ctx.grad = None
        if got is not None:  # the dense path in one kernel call: the same steps as below, and the gradient
            pairs, t, m, q_diag, mu_t, s_diag, perm, min_var, ctx.grad = got
        else:
            m, q_diag, mu_t, s_diag, rs = latent_terms(idx, v, stats.M_buf.diagonal(), stats.mu, beta, stats.scale,
                                                       stats.diag_extra, stats.eps)  # _latent_terms' bits
            rows = sort_rows(idx, v, s_diag, with_cuts=dense)  # and min_var, and the dense path's cuts
            if rows is None:  # a row repeats a latent or holds one out of range: as the torch path does
                s, perm, vs = sorted_rows(idx, v)
                rows = (s, perm, vs, _min_var(s, vs, s_diag), None)
            s, perm, vs, min_var, cut = rows
            pairs = build_pairs(s, vs, d, cut=cut)
            t = pairs.terms(stats.M_buf.view(-1), (1.0 - beta) * stats.scale, beta / B, mu_t, rs)
        box.append(PairMoments(t.keys, t.q, m, q_diag, B, t.triangle))
        n_pairs = torch.tensor(t.kept)
        P = n_pairs.clamp(min=1).to(v.dtype)
        loss = torch.tensor(t.sums[0], dtype=v.dtype) / P
        ctx.pairs = pairs if ctx.grad is None else None
        if ctx.grad is None:  # else the backward only scales ctx.grad
            ctx.save_for_backward(v, idx, perm, mu_t, s_diag, P)
        diag = (n_pairs, torch.tensor(t.sums[1], dtype=v.dtype) / P, torch.tensor(t.sums[2], dtype=v.dtype), min_var,
                torch.tensor(t.bad))
        ctx.mark_non_differentiable(*diag)
        return (loss, *diag)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grad is not None:  # computed in the forward for dL/dloss = 1: linear in it
            return ctx.grad * grad_loss, None, None, None
        v, idx, perm, mu_t, s_diag, P = ctx.saved_tensors
        pairs = ctx.pairs
        if pairs is None:
            raise RuntimeError("the correlation penalty's backward ran twice (retain_graph): not supported on CPU")
        g = pairs.gradient(grad_loss / P, mu_t, s_diag, idx, perm, v)
        ctx.pairs = None
        pairs.release()  # the pairs' arrays go back to the scratch pool for the next batch
        return g, None, None, None  # no factor beta (docs/sae-math.md)


def _latent_terms(stats: LatentStatistics, idx: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The O(d) vectors: ``B m_t``, ``B diag(Q_t)``, ``mu~`` and ``diag(S)``."""
    B, beta = idx.shape[0], stats.beta
    m, q_diag = latent_sums(idx, v, stats.d_sae)
    mu_t = (1.0 - beta) * stats.mu + (beta / B) * m
    s_diag = ((1.0 - beta) * (stats.M_buf.diagonal() * stats.scale + stats.diag_extra)
              + beta * (q_diag / B + stats.eps) - mu_t * mu_t)
    return m, q_diag, mu_t, s_diag


def _min_var(s: Tensor, vs: Tensor, s_diag: Tensor) -> Tensor:
    """Smallest ``S_ii`` among the latents of the co-active pairs, found on (B, k): entry p of a
    row is in one iff its product with the row's largest other |value| is non-zero (rounding is
    monotone, val >= 0)."""
    inf = torch.full((), math.inf, dtype=s_diag.dtype, device=s_diag.device)
    av = vs.detach().abs()
    top = av.topk(2, dim=1).values
    other = torch.where(av == top[:, :1], top[:, 1:], top[:, :1])
    in_pair = (av * other) != 0
    return torch.where(in_pair, s_diag.index_select(0, s.reshape(-1)).view_as(vs), inf).min()


def _diagnostics(loss: Tensor, R: Tensor, P: Tensor, n_pairs: Tensor, s: Tensor, vs: Tensor,
                 s_diag: Tensor) -> tuple[Tensor, ...]:
    """``n_pairs, mean_abs_R, max_abs_R, min_var, nonfinite`` as 0-d tensors (no host sync on GPU)."""
    min_var = _min_var(s, vs, s_diag)
    # A finite loss (a sum of squares) means every R_ij is finite: on CPU, where reading it
    # costs nothing, the count is skipped then.
    if R.device.type == "cpu" and math.isfinite(loss.item()):
        nonfinite = torch.zeros((), dtype=torch.int64)
    else:
        nonfinite = R.isfinite().logical_not_().sum()
    return (n_pairs, torch.linalg.vector_norm(R, 1) / P, torch.linalg.vector_norm(R, math.inf), min_var, nonfinite)


def _split(keys: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """``keys // d, keys % d`` as int32 (index ops take it; half the bytes of int64)."""
    if d * d - 1 <= 2**31 - 1:
        keys = keys.to(torch.int32)  # then every pass below moves 4-byte integers
    i, j = empty(keys.numel(), keys.dtype, keys.device), empty(keys.numel(), keys.dtype, keys.device)
    if d & (d - 1) == 0:  # power of two (the usual d_sae): shift and mask, no integer division
        torch.bitwise_right_shift(keys, d.bit_length() - 1, out=i)
        torch.bitwise_and(keys, d - 1, out=j)
    else:
        torch.floor_divide(keys, d, out=i)
        torch.remainder(keys, d, out=j)
    return i, j


def _no_pairs(dt: torch.dtype, dev: torch.device) -> dict[str, Tensor]:
    zero = torch.zeros((), dtype=dt, device=dev)
    return {"n_pairs": torch.zeros((), dtype=torch.int64, device=dev), "mean_abs_R": zero, "max_abs_R": zero.clone(),
            "min_var": torch.full((), math.inf, dtype=dt, device=dev),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=dev)}


def dense_correlation_penalty(M_prev: Tensor, mu_prev: Tensor, z: Tensor, beta: float, eps: float) -> Tensor:
    """Reference ``L_corr`` on dense ``z`` (autograd through ``z`` only): the mean of ``R_ij^2``
    over the unordered pairs ``i < j`` with ``Q_t[i, j] != 0``; 0 when there is none. For tests
    and benchmarks (run it in float64).

    The batch-gradient convention written literally: ``m_t`` and ``Q_t`` keep their EMA weight
    ``beta`` in the value and enter with weight 1 in the gradient (``beta x + (x - sg(x))``)."""
    B, d = z.shape
    Q = z.T @ z / B
    m = z.mean(0)
    mu_t = (1.0 - beta) * mu_prev.detach() + _batch_grad(m, beta)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    S = (1.0 - beta) * M_prev.detach() + _batch_grad(Q, beta) + beta * eps * eye - torch.outer(mu_t, mu_t)
    i, j = torch.nonzero(torch.triu(Q.detach() != 0, diagonal=1), as_tuple=True)
    if i.numel() == 0:
        return (z * 0).sum()
    D = torch.diagonal(S)
    R = S[i, j] / (D[i].sqrt() * D[j].sqrt())
    return (R * R).mean()


def _batch_grad(x: Tensor, beta: float) -> Tensor:
    """Value ``beta x``, gradient that of ``x``."""
    return beta * x.detach() + (x - x.detach())
