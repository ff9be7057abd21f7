"""Running latent statistics of the dyncorr SAE (docs/sae-math.md); the penalty lives in
:mod:`trainer.saes.corr_penalty` and the pair machinery in :mod:`trainer.saes.pairs` (both
re-exported here).

The latents of a TopK SAE arrive sparse: ``idx`` (B, k) int64 and ``val`` (B, k) >= 0, i.e.
row ``b`` of the dense ``z`` (B, d_sae) is ``val[b]`` at columns ``idx[b]`` and 0 elsewhere.
Indices must be distinct within a row (TopK guarantees it) and in ``0..d_sae-1``.

EMA statistics with rate ``beta`` and damping ``eps`` (``mu_0 = 0``, ``M_0 = eps I``)::

    mu_t = (1 - beta) mu_{t-1} + beta m_t             m_t = z.mean(0)
    M_t  = (1 - beta) M_{t-1}  + beta (Q_t + eps I)    Q_t = z^T z / B
    Sigma_t = M_t - mu_t mu_t^T                        (every eigenvalue >= eps)

``M`` is held *lazily* as ``M_t = scale * M_buf + diag_extra * I`` with only the upper
triangle (diagonal included) of ``M_buf`` written: a step multiplies the Python scalar
``scale`` by ``1 - beta`` and scatters the non-zeros of ``Q_t``'s upper triangle (the
distinct pairs the penalty already merged, or every row's <= B k (k - 1) / 2 pairs, plus the
diagonal), times ``beta / scale``, into ``M_buf``: O(B k^2 + d_sae), never O(d_sae^2). When
``scale`` drops below ``fold_threshold`` it is folded back (``M_buf *= scale; scale = 1``),
an O(d_sae^2) pass every ``log(fold_threshold) / log(1 - beta)`` steps (687 for beta=0.01).

The reference :func:`dense_update` works on dense ``z`` and is meant for tests and
benchmarks (run it in float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from trainer.saes.fused_pairs import add_distinct
from trainer.saes.pairs import PairMoments, check_topk, latent_sums, row_pairs, sorted_rows, zeros

__all__ = [
    "LatentStatistics",
    "PairMoments",
    "dense_update",
    "topk_to_dense",
]


def topk_to_dense(idx: Tensor, val: Tensor, d_sae: int) -> Tensor:
    """Dense ``z`` (B, d_sae) from TopK ``(idx, val)``; differentiable w.r.t. ``val``."""
    z = val.new_zeros(idx.shape[0], d_sae)
    return z.scatter(1, idx.long(), val)


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
        self.register_buffer("M_buf", zeros((d_sae, d_sae), dtype, device))
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
    def update(self, idx: Tensor, val: Tensor, *, moments: PairMoments | None = None) -> None:
        """One EMA step with the batch ``(idx, val)``: O(B k^2 + d_sae) (plus the rare fold).

        ``moments``: the same batch's :class:`PairMoments` from ``penalty_and_moments``; then
        its distinct pairs are scattered (no duplicate keys: one write per entry, deterministic
        on every device) instead of rebuilding every row's pairs here."""
        check_topk(idx, val, self.d_sae)
        d, beta, dev = self.d_sae, self.beta, self.device
        distinct = moments is not None
        if moments is None:
            idx = idx.to(device=dev, dtype=torch.int64)
            v = val.detach().to(device=dev, dtype=self.dtype)
            m, q_diag = latent_sums(idx, v, d)
            s, _, vs = sorted_rows(idx, v)
            keys, q = row_pairs(s, vs, d)  # p < q per row; repeated pairs across rows kept
            moments = PairMoments(keys, q, m, q_diag, idx.shape[0])
        elif moments.rows != idx.shape[0] or moments.m.shape != (d,):
            raise ValueError(f"moments of {moments.rows} rows / {moments.m.shape[0]} latents, batch "
                             f"{idx.shape[0]} rows / d_sae {d}")
        elif moments.triangle is not None and moments.triangle.consumed:  # checked before anything changes
            raise RuntimeError("these moments were already added by an update (a dense triangle is added once): "
                               "make new ones with penalty_and_moments, or read moments.pairs() before the first")
        B = moments.rows

        # mu: dense O(d) EMA of the batch mean.
        self.mu.mul_(1.0 - beta).add_(moments.m, alpha=beta / B)

        # M: decay through the scalar, eps through diag_extra, Q_t's upper triangle into M_buf.
        self.diag_extra = (1.0 - beta) * self.diag_extra + beta * self.eps
        scale = self.scale * (1.0 - beta)
        if scale < self.fold_threshold:  # fold: M_buf <- scale * M_buf (beta = 1 zeroes it)
            self.M_buf.mul_(scale)
            scale = 1.0
            self.n_folds += 1
        self.scale = scale
        c = beta / (B * scale)
        flat = self.M_buf.view(-1)
        # The dense path's sums go in by one pass over the triangle, which also readies their array
        # for the next batch; other moments as their distinct keys and sums.
        if not (moments.triangle is not None and moments.triangle.add_to(flat, c, moments.q_diag)):
            keys, q = moments.pairs()
            if flat.is_cuda and not distinct:  # atomics would make repeated keys non-deterministic
                flat.index_put_((keys.long(),), q * c, accumulate=True)  # sort-based, deterministic
            elif not (distinct and add_distinct(flat, keys, q, c)):  # CPU, distinct: in parallel
                flat.index_add_(0, keys, q * c)  # CPU: deterministic, ~2x faster than index_put_
            diag = torch.arange(d, device=dev).mul_(d + 1)  # the diagonal: distinct keys
            flat.index_add_(0, diag, moments.q_diag * c)  # (the triangle's pass adds it, the same bits)
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
