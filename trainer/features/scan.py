"""The one streaming pass of ``sae features``: per-latent statistics, a running top-k of
examples, log-binned histograms and co-activation sums, in bounded memory.

State, whatever the number of rows: ``examples x d_sae`` values and rows (the running top-k),
``d_sae x HIST_BINS`` histogram counts, ``d_sae`` sums, and ``len(shown) x d_sae`` co-activation
sums for the latents that get a page. A batch is encoded densely (``batch_rows x d_sae``) and
dropped before the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Histogram of non-zero activations: 20 log-spaced bins per decade over [1e-4, 1e4) (values outside
# land in the first / last bin). The scale of a latent is unknown until the pass ends, and log bins
# need no second pass while still resolving each latent's own range.
HIST_LOG10_LO, HIST_LOG10_HI, HIST_PER_DECADE = -4, 4, 20
HIST_BINS = (HIST_LOG10_HI - HIST_LOG10_LO) * HIST_PER_DECADE


def histogram_edges() -> list[float]:
    """The ``HIST_BINS + 1`` bin edges of every latent's histogram."""
    return [float(v) for v in np.logspace(HIST_LOG10_LO, HIST_LOG10_HI, HIST_BINS + 1)]


@dataclass
class LatentSummary:
    """What the pass leaves, as numpy arrays indexed by latent."""

    n_rows: int
    count: np.ndarray  # (d_sae,) int64: rows where the latent fired (z > 0)
    total: np.ndarray  # (d_sae,) float64: sum of its activations
    max_activation: np.ndarray  # (d_sae,) float32
    top_values: np.ndarray  # (d_sae, examples) float32, descending; rows beyond the firings are dropped later
    top_rows: np.ndarray  # (d_sae, examples) int64: store rows of top_values
    hist: np.ndarray  # (d_sae, HIST_BINS) int64
    shown: np.ndarray  # (n_shown,) int64: latents with co-activation sums
    coactivation: np.ndarray  # (n_shown, d_sae) float64: Pearson correlation of z_i (i shown) with every z_j
    rows_excluded: int = 0  # rows whose latents were zeroed: the run's max_norm_ratio outliers (trainer.rows)

    @property
    def frequency(self) -> np.ndarray:
        return self.count / max(self.n_rows, 1)

    def examples(self, latent: int) -> list[tuple[int, float]]:
        """``(row, activation)`` of the latent's top examples: activation descending, then row ascending."""
        vals, rows = self.top_values[latent], self.top_rows[latent]
        keep = vals > 0
        vals, rows = vals[keep], rows[keep]
        order = np.lexsort((rows, -vals.astype(np.float64)))
        return [(int(rows[i]), float(vals[i])) for i in order]


class FeatureScan:
    """Accumulates :class:`LatentSummary` over batches of latents ``z`` (rows in store order)."""

    def __init__(self, d_sae: int, examples: int, shown: torch.Tensor, device: torch.device | str = "cpu"):
        if examples < 1:
            raise ValueError(f"examples must be >= 1, got {examples}")
        self.d_sae, self.examples, self.device = d_sae, examples, torch.device(device)
        self.shown = shown.to(self.device, torch.int64)
        dev = self.device
        self.n_rows = 0
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=dev)
        self.top_values = torch.full((d_sae, examples), -1.0, dtype=torch.float32, device=dev)
        self.top_rows = torch.full((d_sae, examples), -1, dtype=torch.int64, device=dev)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64, device=dev)
        self.sum_sq = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.cross = torch.zeros(len(self.shown), d_sae, dtype=torch.float64, device=dev)

    @property
    def state_bytes(self) -> int:
        """Bytes held between batches (the bound of the module docstring)."""
        tensors = (self.count, self.total, self.max, self.top_values, self.top_rows, self.hist, self.sum_sq, self.cross)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def update(self, z: torch.Tensor, first_row: int) -> None:
        """Add a batch: ``z`` (B, d_sae) >= 0, for store rows ``first_row .. first_row + B - 1``.

        Sums and histograms run on the non-zero entries (B x L0 of them, not B x d_sae)."""
        z = z.to(self.device, torch.float32)
        if z.shape[0] == 0:
            return
        self.n_rows += z.shape[0]
        rows, cols = (z > 0).nonzero(as_tuple=True)
        vals = z[rows, cols]
        d = self.d_sae
        # index_add_ into the state: no per-batch allocation and none of bincount's min/max passes.
        ones = torch.ones_like(cols)
        self.count.index_add_(0, cols, ones)
        v64 = vals.double()
        self.total.index_add_(0, cols, v64)
        self.sum_sq.index_add_(0, cols, v64 * v64)
        self.max.scatter_reduce_(0, cols, vals, "amax")
        self._merge_top(z, first_row)
        bins = ((vals.log10() - HIST_LOG10_LO) * HIST_PER_DECADE).floor().clamp_(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, cols * HIST_BINS + bins, ones)
        if len(self.shown):
            # sum_b z[b, i] z[b, j], shown i, every j: float32 within a batch, float64 across batches. A
            # dense matmul (B x shown x d_sae, below the encoder's B x d_in x d_sae for shown < d_in):
            # torch's sparse products sort the entries first and are slower here.
            self.cross += (z.index_select(1, self.shown).t() @ z).double()

    def _merge_top(self, z: torch.Tensor, first_row: int) -> None:
        """Each latent's best ``examples`` rows of the batch, merged into the running top-k (a dense
        top-k over the batch: faster here than sorting the non-zero entries by latent)."""
        k = min(self.examples, z.shape[0])
        vals, rows = z.t().topk(k, dim=1)  # (d_sae, k)
        all_vals = torch.cat([self.top_values, vals], dim=1)
        all_rows = torch.cat([self.top_rows, rows + first_row], dim=1)
        best, pos = all_vals.topk(self.examples, dim=1)
        self.top_values, self.top_rows = best, all_rows.gather(1, pos)

    def summary(self) -> LatentSummary:
        n = max(self.n_rows, 1)
        mean, shown = self.total / n, self.shown
        var = (self.sum_sq / n - mean * mean).clamp(min=0)
        cov = self.cross / n - mean[shown, None] * mean[None, :]
        denom = (var[shown, None] * var[None, :]).sqrt()
        corr = torch.where(denom > 0, cov / denom.clamp(min=1e-300), torch.zeros_like(cov))
        return LatentSummary(
            n_rows=self.n_rows, count=self.count.cpu().numpy(), total=self.total.cpu().numpy(),
            max_activation=self.max.cpu().numpy(), top_values=self.top_values.cpu().numpy(),
            top_rows=self.top_rows.cpu().numpy(), hist=self.hist.view(self.d_sae, HIST_BINS).cpu().numpy(),
            shown=shown.cpu().numpy(), coactivation=corr.cpu().numpy())
