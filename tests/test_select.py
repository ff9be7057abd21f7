"""The CPU top-k kernel (trainer/saes/select.py) selects what torch.topk selects."""

import numpy as np
import pytest
import torch

from trainer.saes import select
from trainer.saes.select import group_size, topk


def _distinct_rows(B: int, S: int, seed: int) -> torch.Tensor:
    """Rows without ties (a shuffled grid plus noise), so the top-k set is unique."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(S, generator=g) for _ in range(B)]).float()
    return (base + 0.5 * torch.rand(B, S, generator=g)) * torch.randn(B, 1, generator=g).exp()


@pytest.mark.parametrize("B,S,k", [(64, 16384, 64), (96, 4608, 16), (33, 1152, 32), (17, 1000, 3), (8, 515, 8)])
def test_same_values_and_indices_as_torch_topk(B, S, k):
    pre = _distinct_rows(B, S, seed=S + k) - 0.3 * S
    assert -(-S // group_size(S, k)) >= 2 * k  # these shapes take the kernel, not the fallback
    val, idx = topk(pre, k)
    ref_val, ref_idx = torch.topk(pre, k, dim=-1, sorted=False)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    assert torch.equal(val.sort(1).values, ref_val.sort(1).values)
    assert torch.equal(pre.gather(1, idx), val)


def test_heavy_tailed_rows_and_negative_rows():
    """Rows where a few entries dwarf the rest, and rows with every entry negative."""
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(40, 4096, generator=g).pow(3) * 100
    pre[20:] = -pre[20:].abs() - 1
    val, idx = topk(pre, 24)
    ref = torch.topk(pre, 24, dim=-1)
    assert torch.equal(val.sort(1).values, ref.values.sort(1).values)
    assert torch.equal(idx.sort(1).values, ref.indices.sort(1).values)


def test_ties_keep_the_lowest_indices():
    """Equal values at the k-th place: the kernel keeps the lowest indices, whole rows of ties included."""
    pre = torch.zeros(3, 2048)
    pre[1, 100:110] = 5.0  # 10 clear winners, then 2038 tied zeros for the other 6 places
    pre[2, ::2] = 1.0  # 1024 tied ones
    val, idx = topk(pre, 16)
    assert idx[0].sort().values.tolist() == list(range(16))
    assert idx[1].sort().values.tolist() == list(range(6)) + list(range(100, 110))
    assert idx[2].sort().values.tolist() == list(range(0, 32, 2))
    assert torch.equal(pre.gather(1, idx), val)


def test_non_finite_rows_rank_like_torch_topk():
    """NaN counts as the largest value (so it reaches the loss and the step is skipped); +inf beats
    every number; a -inf row still returns k entries."""
    pre = _distinct_rows(4, 2048, seed=3)
    pre[0, 777] = float("nan")
    pre[1, 5] = float("inf")
    pre[2] = float("-inf")
    pre[2, 9] = 1.0
    pre[3, 1000:1010] = float("nan")
    val, idx = topk(pre, 16)
    assert 777 in idx[0].tolist() and torch.isnan(val[0]).sum() == 1
    assert 5 in idx[1].tolist() and torch.isinf(val[1]).sum() == 1
    assert 9 in idx[2].tolist() and torch.isneginf(val[2]).sum() == 15
    assert set(range(1000, 1010)) <= set(idx[3].tolist())
    ref = torch.topk(pre[:2], 16, dim=-1)
    assert torch.equal(idx[:2].sort(1).values, ref.indices.sort(1).values)


def test_kernel_runs_on_numpy_views_and_falls_back_elsewhere(monkeypatch):
    calls = []
    real = select.topk_rows
    monkeypatch.setattr(select, "topk_rows", lambda *a: calls.append(a[1]) or real(*a))
    pre = _distinct_rows(8, 4096, seed=4)
    topk(pre, 8)
    assert calls == [8]
    # float64, a transposed view, autograd, and k too large a share of the row: torch.topk.
    for args in ((pre.double(), 8), (pre.t(), 2), (pre.clone().requires_grad_(True), 8), (pre, 1500)):
        v, i = topk(*args)
        ref = torch.topk(*args, dim=-1, sorted=False)
        assert torch.equal(i.sort(1).values, ref.indices.sort(1).values)
    assert calls == [8]


def test_group_size_bounds():
    assert group_size(16384, 64) == 64
    assert group_size(1152, 32) == 9
    assert group_size(100, 64) == 8
    assert np.all([8 <= group_size(s, k) <= 64 for s in (64, 999, 10**6) for k in (1, 7, 300)])
