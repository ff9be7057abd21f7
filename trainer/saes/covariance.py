"""Running latent statistics and the correlation penalty of the dyncorr SAE (docs/sae-math.md).

The latents of a TopK SAE arrive sparse: ``idx`` (B, k) int64 and ``val`` (B, k) >= 0, i.e.
row ``b`` of the dense ``z`` (B, d_sae) is ``val[b]`` at columns ``idx[b]`` and 0 elsewhere.
Indices must be distinct within a row (TopK guarantees it) and in ``0..d_sae-1``.

EMA statistics with rate ``beta`` and damping ``eps`` (``mu_0 = 0``, ``M_0 = eps I``)::

    mu_t = (1 - beta) mu_{t-1} + beta m_t             m_t = z.mean(0)
    M_t  = (1 - beta) M_{t-1}  + beta (Q_t + eps I)    Q_t = z^T z / B
    Sigma_t = M_t - mu_t mu_t^T                        (every eigenvalue >= eps)

``M`` is held *lazily* as ``M_t = scale * M_buf + diag_extra * I`` with only the upper
triangle (diagonal included) of ``M_buf`` written: a step multiplies the Python scalar
``scale`` by ``1 - beta`` and scatters the <= B k (k + 1) / 2 non-zeros of ``Q_t``'s upper
triangle, times ``beta / scale``, into ``M_buf``: O(B k^2 + d_sae), never O(d_sae^2). When
``scale`` drops below ``fold_threshold`` it is folded back (``M_buf *= scale; scale = 1``),
an O(d_sae^2) pass every ``log(fold_threshold) / log(1 - beta)`` steps (687 for beta=0.01).

The reference implementations :func:`dense_update` and :func:`dense_correlation_penalty` work
on dense ``z`` and are meant for tests and benchmarks (run them in float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LatentStatistics",
    "correlation_penalty",
    "dense_correlation_penalty",
    "dense_update",
    "topk_to_dense",
]

_INT32_MAX = 2**31 - 1


def _check_topk(idx: Tensor, val: Tensor, d_sae: int) -> None:
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


def topk_to_dense(idx: Tensor, val: Tensor, d_sae: int) -> Tensor:
    """Dense ``z`` (B, d_sae) from TopK ``(idx, val)``; differentiable w.r.t. ``val``."""
    z = val.new_zeros(idx.shape[0], d_sae)
    return z.scatter(1, idx.long(), val)


def _sorted_rows(idx: Tensor, v: Tensor, d: int, diagonal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's indices sorted (int32 when ``d^2 < 2^31``: half the memory traffic, faster
    sort), the sorting permutation, the values in that order, and ``tri``: the flat positions
    ``p * k + q`` of the pairs ``p < q`` (``p <= q`` with ``diagonal``) of a k x k matrix.
    Sorting first makes ``lo, hi`` of every pair fall out of the row order."""
    k = idx.shape[1]
    s, perm = idx.sort(dim=1)
    vs = v.gather(1, perm)
    if d * d - 1 <= _INT32_MAX:
        s = s.to(torch.int32)
    p, q = torch.triu_indices(k, k, 0 if diagonal else 1, device=idx.device)
    return s, perm, vs, p * k + q


def _pair_keys(s: Tensor, d: int, tri: Tensor) -> Tensor:
    """Keys ``lo * d + hi`` of the pairs ``tri`` of every sorted row, flattened: one (B, k, k)
    broadcast and one gather beat two gathers and a min / max."""
    B, k = s.shape
    return ((s * d).unsqueeze(2) + s.unsqueeze(1)).view(B, k * k).index_select(1, tri).reshape(-1)


def _row_pairs(idx: Tensor, v: Tensor, d: int, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Keys ``lo * d + hi`` and products ``v_lo * v_hi`` of the latent pairs within each row
    (``lo < hi``, or ``lo <= hi`` with ``diagonal``), flattened."""
    B, k = idx.shape
    s, _, vs, tri = _sorted_rows(idx, v, d, diagonal)
    # index_select: its backward is an index_add, much cheaper than advanced indexing's index_put.
    prods = (vs.unsqueeze(2) * vs.unsqueeze(1)).view(B, k * k).index_select(1, tri).reshape(-1)
    return _pair_keys(s, d, tri), prods


class LatentStatistics(torch.nn.Module):
    """EMA mean and uncentred second moment of the latents, kept lazily (module docstring).

    Buffers (moved by ``.to()``, saved by ``state_dict``): ``M_buf`` (d_sae, d_sae), upper
    triangle valid, lower triangle kept at 0; ``mu`` (d_sae,). The scalars ``step``,
    ``scale`` and ``diag_extra`` travel in the module's extra state (Python floats, no host
    sync per step). ``M_true = scale * M_buf + diag_extra * I``; ``diag_extra`` equals ``eps``
    at every step (it is the EMA of a constant started at ``eps``), kept as a recursion so the
    eps = 0 ablation gives ``M_0 = 0``.
    """

    def __init__(self, d_sae: int, beta: float, eps: float = 1e-6, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, *, fold_threshold: float = 1e-3):
        super().__init__()
        if d_sae <= 0:
            raise ValueError(f"d_sae must be > 0, got {d_sae}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not eps >= 0.0:  # also rejects NaN
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0.0 < fold_threshold < 1.0:
            raise ValueError(f"fold_threshold must be in (0, 1), got {fold_threshold}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {dtype}")
        self.d_sae, self.beta, self.eps, self.fold_threshold = int(d_sae), float(beta), float(eps), float(fold_threshold)
        self.register_buffer("M_buf", torch.zeros(d_sae, d_sae, dtype=dtype, device=device))
        self.register_buffer("mu", torch.zeros(d_sae, dtype=dtype, device=device))
        self.step = 0
        self.scale = 1.0
        self.diag_extra = self.eps  # M_0 = eps I
        self.n_folds = 0

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "scale": self.scale, "diag_extra": self.diag_extra, "n_folds": self.n_folds,
                "beta": self.beta, "eps": self.eps, "d_sae": self.d_sae}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name in ("beta", "eps", "d_sae"):
            if state[name] != getattr(self, name):
                raise ValueError(f"LatentStatistics state has {name} = {state[name]}, this module {getattr(self, name)}")
        self.step, self.scale = int(state["step"]), float(state["scale"])
        self.diag_extra, self.n_folds = float(state["diag_extra"]), int(state["n_folds"])

    @property
    def dtype(self) -> torch.dtype:
        return self.M_buf.dtype

    @property
    def device(self) -> torch.device:
        return self.M_buf.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (the d_sae^2 second-moment buffer dominates)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"d_sae={self.d_sae}, beta={self.beta}, eps={self.eps}, dtype={self.dtype}, step={self.step}, "
                f"nbytes={self.nbytes}")

    # -- update ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, idx: Tensor, val: Tensor) -> None:
        """One EMA step with the batch ``(idx, val)``: O(B k^2 + d_sae) (plus the rare fold)."""
        _check_topk(idx, val, self.d_sae)
        B, k = idx.shape
        d, beta, dev = self.d_sae, self.beta, self.device
        idx = idx.to(device=dev, dtype=torch.int64)
        v = val.detach().to(device=dev, dtype=self.dtype)

        # mu: dense O(d) EMA of the batch mean.
        m = torch.zeros(d, dtype=self.dtype, device=dev).index_add_(0, idx.reshape(-1), v.reshape(-1))
        self.mu.mul_(1.0 - beta).add_(m, alpha=beta / B)

        # M: decay through the scalar, eps through diag_extra, Q_t's upper triangle into M_buf.
        self.diag_extra = (1.0 - beta) * self.diag_extra + beta * self.eps
        scale = self.scale * (1.0 - beta)
        if scale < self.fold_threshold:  # fold: M_buf <- scale * M_buf (beta = 1 zeroes it)
            self.M_buf.mul_(scale)
            scale = 1.0
            self.n_folds += 1
        self.scale = scale
        keys, contrib = _row_pairs(idx, v, d, diagonal=True)  # p <= q: k (k + 1) / 2 pairs per row
        contrib.mul_(beta / (B * scale))
        flat = self.M_buf.view(-1)
        if flat.is_cuda:  # sort-based, deterministic
            flat.index_put_((keys.long(),), contrib, accumulate=True)
        else:  # ~2x faster than index_put_ on CPU, deterministic there
            flat.index_add_(0, keys, contrib)
        self.step += 1

    # -- reads ----------------------------------------------------------------------------
    def mean(self) -> Tensor:
        """``mu_t`` (a copy)."""
        return self.mu.clone()

    def _block(self, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
        r = rows.to(device=self.device, dtype=torch.int64).reshape(-1, 1)
        c = cols.to(device=self.device, dtype=torch.int64).reshape(1, -1)
        out = self.M_buf[torch.minimum(r, c), torch.maximum(r, c)].to(dtype) * self.scale
        if self.diag_extra != 0.0:
            out = out + (r == c).to(dtype) * self.diag_extra
        return out

    def second_moment(self, rows: Tensor | None = None, cols: Tensor | None = None, *,
                      dtype: torch.dtype | None = None) -> Tensor:
        """``M_t[rows][:, cols]``; the dense d_sae x d_sae matrix when both are None (O(d_sae^2))."""
        dtype = dtype or self.dtype
        if rows is None and cols is None:
            upper = torch.triu(self.M_buf).to(dtype)
            out = upper + upper.T
            out.diagonal().copy_(upper.diagonal())
            out.mul_(self.scale)
            out.diagonal().add_(self.diag_extra)
            return out
        every = torch.arange(self.d_sae, device=self.device)
        return self._block(every if rows is None else rows, every if cols is None else cols, dtype)

    def variance(self, *, dtype: torch.dtype | None = None) -> Tensor:
        """``diag(Sigma_t)`` for every latent, O(d_sae)."""
        dtype = dtype or self.dtype
        mu = self.mu.to(dtype)
        return self.M_buf.diagonal().to(dtype) * self.scale + self.diag_extra - mu * mu

    def covariance_block(self, latents: Tensor | None = None, *, dtype: torch.dtype | None = None) -> Tensor:
        """``Sigma_t`` restricted to ``latents`` (computed in float64, returned in ``dtype``,
        default the buffer dtype). ``None`` = all latents (O(d_sae^2) memory)."""
        if latents is None:
            M = self.second_moment(dtype=torch.float64)
            mu = self.mu.to(torch.float64)
        else:
            latents = latents.to(device=self.device, dtype=torch.int64).reshape(-1)
            M = self._block(latents, latents, torch.float64)
            mu = self.mu[latents].to(torch.float64)
        return (M - torch.outer(mu, mu)).to(dtype or self.dtype)

    def correlation_block(self, latents: Tensor | None = None, *, dtype: torch.dtype | None = None) -> Tensor:
        """``D^-1/2 Sigma D^-1/2`` on ``latents`` (float64 inside); non-finite where a variance is <= 0."""
        S = self.covariance_block(latents, dtype=torch.float64)
        r = S.diagonal().rsqrt()
        return (S * r[:, None] * r[None, :]).to(dtype or self.dtype)

    def _eigvals(self, latents: Tensor | None) -> Tensor:
        return torch.linalg.eigvalsh(self.covariance_block(latents, dtype=torch.float64))

    def min_eigenvalue(self, latents: Tensor | None = None) -> float:
        """Smallest eigenvalue of ``Sigma_t`` on the block ``latents`` (float64 ``eigvalsh``;
        ``None`` = the whole matrix, O(d_sae^3): pass a block of a few hundred latents)."""
        return float(self._eigvals(latents)[0])

    def condition_number(self, latents: Tensor | None = None) -> float:
        """``lambda_max / lambda_min`` of ``Sigma_t`` on the block; ``inf`` if ``lambda_min <= 0``."""
        ev = self._eigvals(latents)
        lo, hi = float(ev[0]), float(ev[-1])
        return hi / lo if lo > 0 else math.inf


# -- references ---------------------------------------------------------------------------
def dense_update(M: Tensor, mu: Tensor, z: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """The defining recursion on dense ``z`` (B, d): returns ``(M_t, mu_t)`` (new tensors)."""
    B, d = z.shape
    Q = z.T @ z / B
    eye = torch.eye(d, dtype=M.dtype, device=M.device)
    return (1.0 - beta) * M + beta * (Q + eps * eye), (1.0 - beta) * mu + beta * z.mean(0)


def dense_correlation_penalty(M_prev: Tensor, mu_prev: Tensor, z: Tensor, beta: float, eps: float) -> Tensor:
    """Reference ``L_corr`` on dense ``z`` (autograd through ``z`` only): the mean of ``R_ij^2``
    over the unordered pairs ``i < j`` with ``Q_t[i, j] != 0``; 0 when there is none."""
    B, d = z.shape
    Q = z.T @ z / B
    m = z.mean(0)
    mu_t = (1.0 - beta) * mu_prev.detach() + beta * m
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    S = (1.0 - beta) * M_prev.detach() + beta * (Q + eps * eye) - torch.outer(mu_t, mu_t)
    i, j = torch.nonzero(torch.triu(Q.detach() != 0, diagonal=1), as_tuple=True)
    if i.numel() == 0:
        return (z * 0).sum()
    D = torch.diagonal(S)
    R = S[i, j] / (D[i].sqrt() * D[j].sqrt())
    return (R * R).mean()


# -- the penalty --------------------------------------------------------------------------
def correlation_penalty(stats: LatentStatistics, idx: Tensor, val: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_corr`` of the batch against ``stats`` at step t-1, differentiable w.r.t. ``val``.

    Call it BEFORE ``stats.update(idx, val)`` for the same batch. Cost O(B k^2 log(B k^2) +
    d_sae) time and O(B k^2 + d_sae) memory: the B k (k-1) / 2 per-row pairs are keyed
    ``lo * d_sae + hi``, merged with ``torch.unique``, and only those entries of ``M_{t-1}``
    are gathered. Nothing d_sae x d_sae or B x d_sae is built. The gradient is written out
    by hand (:class:`_CorrPenalty`): autograd through the pair arrays cost twice the forward.

    Returns the scalar loss (buffer dtype) and diagnostics as detached 0-d tensors on the
    buffers' device (``.item()`` them only when logging): ``n_pairs`` (co-active unordered pairs), ``mean_abs_R``, ``max_abs_R``,
    ``min_var`` (smallest ``S_ii`` among the latents of those pairs) and ``nonfinite``
    (number of non-finite ``R_ij``). With eps = 0, ``S_ii = 0`` gives inf/NaN (no clamping,
    no exception): check ``torch.isfinite(loss)``.
    """
    _check_topk(idx, val, stats.d_sae)
    dt, dev = stats.dtype, stats.device
    idx = idx.to(device=dev, dtype=torch.int64)
    v = val.to(device=dev, dtype=dt)  # autograd casts the gradient back to val's dtype
    if idx.shape[1] < 2:
        return (v * 0).sum(), _no_pairs(dt, dev)
    loss, *diag = _CorrPenalty.apply(v, idx, stats)
    return loss, dict(zip(("n_pairs", "mean_abs_R", "max_abs_R", "min_var", "nonfinite"), diag))


class _CorrPenalty(torch.autograd.Function):
    """Forward and hand-written backward of ``L_corr`` (docs/sae-math.md), gradient w.r.t. ``v`` only.

    With ``P = |P_t|``, per pair ``a_ij = dL/dS_ij = 2 R_ij / (P sqrt(S_ii S_jj))`` and per latent
    ``c_i = dL/dS_ii = -sum_j R_ij^2 / (P S_ii)``; ``g_mu = dL/dmu~`` collects ``-a_ij mu~_j``
    and ``-2 c_i mu~_i``. Then for entry ``(b, p)`` of latent ``l`` with value ``v``::

        dL/dv = (beta / B) (g_mu_l + 2 c_l v + sum_q a_{l, idx[b, q]} v_q)

    the last sum being a (k x k) @ (k) product per row. Pairs with ``Q_t[i, j] = 0`` (a zero
    value) are masked, not dropped: they keep their slot in the unique array but weigh 0.
    """

    @staticmethod
    def forward(ctx, v: Tensor, idx: Tensor, stats: LatentStatistics):
        B, k = idx.shape
        d, beta, eps = stats.d_sae, stats.beta, stats.eps
        flat_idx, flat_v = idx.reshape(-1), v.reshape(-1)
        # O(d) vectors: m_t, diag(Q_t), mu~ and diag(S).
        m = v.new_zeros(d).index_add_(0, flat_idx, flat_v).div_(B)
        q_diag = v.new_zeros(d).index_add_(0, flat_idx, flat_v * flat_v).div_(B)
        mu_t = (1.0 - beta) * stats.mu + beta * m
        s_diag = ((1.0 - beta) * (stats.M_buf.diagonal() * stats.scale + stats.diag_extra)
                  + beta * (q_diag + eps) - mu_t * mu_t)

        s, perm, vs, tri = _sorted_rows(idx, v, d, diagonal=False)  # p < q: k (k - 1) / 2 pairs per row
        keys = _pair_keys(s, d, tri)
        prods = (vs.unsqueeze(2) * vs.unsqueeze(1)).view(B, k * k).index_select(1, tri).reshape(-1)
        uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
        q_pair = v.new_zeros(uniq.numel()).index_add_(0, inv, prods)  # B * Q_t[lo, hi]
        uniq = uniq.to(torch.int64)
        i, j = uniq // d, uniq % d
        keep = (q_pair != 0) & (i != j)  # co-active (non-zero Q_t entry), off-diagonal
        n_pairs = keep.sum()
        mu_i, mu_j = mu_t.index_select(0, i), mu_t.index_select(0, j)
        s_ij = ((1.0 - beta) * stats.scale) * stats.M_buf.view(-1).index_select(0, uniq) + (beta / B) * q_pair
        s_ij -= mu_i * mu_j
        s_i, s_j = s_diag.index_select(0, i), s_diag.index_select(0, j)
        # 1 / sqrt(S_ii S_jj), 0 on masked pairs; S_ii <= 0 -> inf / NaN on a kept pair, on purpose.
        rr = torch.where(keep, s_i.rsqrt() * s_j.rsqrt(), v.new_zeros(()))
        R = s_ij * rr
        P = n_pairs.clamp(min=1).to(v.dtype)  # no pair: every R is 0, loss 0, gradient 0
        R2 = R * R
        loss = R2.sum() / P
        absR = R.abs()  # diagnostics: 0-d tensors, no host sync
        inf = torch.full((), math.inf, dtype=v.dtype, device=v.device)
        diag = (n_pairs, absR.sum() / P, absR.max(), torch.where(keep, torch.minimum(s_i, s_j), inf).min(),
                (~torch.isfinite(R)).sum())
        ctx.beta, ctx.B, ctx.d, ctx.k = beta, B, d, k
        ctx.save_for_backward(v, idx, perm, vs, tri, inv, i, j, mu_t, s_diag, R, R2, rr, P)
        ctx.mark_non_differentiable(*diag)
        return (loss, *diag)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        v, idx, perm, vs, tri, inv, i, j, mu_t, s_diag, R, R2, rr, P = ctx.saved_tensors
        beta, B, d, k = ctx.beta, ctx.B, ctx.d, ctx.k
        go = grad_loss / P
        a = (2.0 * go) * R * rr  # dL/dS_ij, 0 on masked pairs
        num = v.new_zeros(d).index_add_(0, i, R2).index_add_(0, j, R2)
        c = torch.where(num != 0, -go * num / s_diag, v.new_zeros(()))  # dL/dS_ii; 0 outside the pairs
        g_mu = v.new_zeros(d).index_add_(0, i, a * mu_t.index_select(0, j)).index_add_(0, j, a * mu_t.index_select(0, i))
        g_mu = -g_mu - 2.0 * c * mu_t
        # sum_q a_{pq} v_q per row: scatter each row's pair weights into a symmetric k x k matrix.
        a_rows = a.index_select(0, inv).view(B, -1)
        A = v.new_zeros(B, k * k)
        A.index_copy_(1, tri, a_rows)
        A.index_copy_(1, (tri % k) * k + tri // k, a_rows)
        g_sorted = torch.bmm(A.view(B, k, k), vs.unsqueeze(2)).squeeze(2)
        g = v.new_zeros(B, k).scatter_(1, perm, g_sorted)
        g += g_mu.index_select(0, idx.reshape(-1)).view(B, k) + 2.0 * c.index_select(0, idx.reshape(-1)).view(B, k) * v
        return g * (beta / B), None, None


def _no_pairs(dt: torch.dtype, dev: torch.device) -> dict[str, Tensor]:
    zero = torch.zeros((), dtype=dt, device=dev)
    return {"n_pairs": torch.zeros((), dtype=torch.int64, device=dev), "mean_abs_R": zero, "max_abs_R": zero.clone(),
            "min_var": torch.full((), math.inf, dtype=dt, device=dev),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=dev)}
