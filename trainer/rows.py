"""Rows left out of training and evaluation: massive activations.

Past the first layers, many models write a few residual rows with norms 10-1000x the median
(attention sinks: the BOS token, often the first real token, sometimes a delimiter). They carry
most of the variance while being a tiny share of the rows (SmolLM2-135M blocks.15: BOS rows
97% of the variance, 1/128 of the rows; docs/results.md), so an SAE trained on them spends its
loss on them and its explained variance measures them. With ``max_norm_ratio`` r > 0 every
batch drops the rows whose norm exceeds r x the batch's median row norm (the filter
dictionary_learning offers as ``max_activation_norm_multiple``). It depends on the batch alone,
so a resumed run drops exactly the rows it dropped before.
"""

from __future__ import annotations

import torch


def norm_outliers(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask over the rows of ``x`` (..., d): norm > ``ratio`` x the median row norm
    (all False when ``ratio`` is 0)."""
    if ratio <= 0 or x.numel() == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    norms = torch.linalg.vector_norm(x.float(), dim=-1)
    return norms > ratio * norms.flatten().median()


def drop_norm_outliers(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
    """``x`` (rows, d) without its norm outliers, and how many rows were dropped."""
    out = norm_outliers(x, ratio)
    n = int(out.sum())
    return (x[~out], n) if n else (x, 0)
