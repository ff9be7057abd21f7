"""The CPU top-k kernel (trainer/saes/select.py) selects what torch.topk selects."""

import numpy as np
import pytest
import torch

from trainer.saes import select
from trainer.saes.select import narrow_limit, topk


def _distinct_rows(B: int, S: int, seed: int) -> torch.Tensor:
    """Rows without ties (a shuffled grid plus noise), so the top-k set is unique."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(S, generator=g) for _ in range(B)]).float()
    return (base + 0.5 * torch.rand(B, S, generator=g)) * torch.randn(B, 1, generator=g).exp()


@pytest.mark.parametrize("B,S,k", [(64, 16384, 64), (96, 4608, 16), (33, 1152, 64), (33, 1152, 32), (17, 1000, 3),
                                   (8, 515, 8), (5, 64, 64), (6, 300, 1), (7, 40, 39)])
def test_same_values_and_indices_as_torch_topk(B, S, k):
    pre = _distinct_rows(B, S, seed=S + k) - 0.3 * S
    val, idx = topk(pre, k)
    ref_val, ref_idx = torch.topk(pre, k, dim=-1, sorted=False)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    assert torch.equal(val.sort(1).values, ref_val.sort(1).values)
    assert torch.equal(pre.gather(1, idx), val)
    assert (idx[:, 1:] > idx[:, :-1]).all()  # ascending index order


@pytest.mark.parametrize("limit", [0, 1, 100, 10**6])
def test_any_compaction_point_gives_the_same_selection(limit):
    """Compacting the keys early (even before the first bit), late, or never: the same top k.
    Rows of all-equal values, of a few values repeated and of mixed signs included."""
    g = torch.Generator().manual_seed(limit)
    pre = torch.randn(12, 700, generator=g)
    pre[3] = 0.25
    pre[4] = torch.randint(0, 3, (700,), generator=g).float() - 1
    pre[5, ::7] = -0.0
    k = 50
    val, idx = torch.empty(12, k), torch.empty(12, k, dtype=torch.int64)
    p = pre.numpy()
    select.topk_rows(p, p.view(np.uint32), k, select._MASKS32, limit, val.numpy(), idx.numpy())
    ref = torch.sort(-pre, dim=1, stable=True).indices[:, :k].sort(1).values  # ties: the lowest index
    assert torch.equal(idx, ref)
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
    monkeypatch.setattr(select, "topk_rows", lambda *a: calls.append(a[2]) or real(*a))
    pre = _distinct_rows(8, 4096, seed=4)
    topk(pre, 8)
    topk(pre, 1500)  # a large share of the row too
    assert calls == [8, 1500]
    # float64, a transposed view, autograd: torch.topk.
    for args in ((pre.double(), 8), (pre.t(), 2), (pre.clone().requires_grad_(True), 8)):
        v, i = topk(*args)
        ref = torch.topk(*args, dim=-1, sorted=False)
        assert torch.equal(i.sort(1).values, ref.indices.sort(1).values)
    assert calls == [8, 1500]
    with pytest.raises(RuntimeError):
        topk(pre, 4097)  # more than the row holds: torch's own error


def test_narrow_limit_bounds():
    assert narrow_limit(16384, 64) == 2048
    assert narrow_limit(1152, 64) == 144
    assert narrow_limit(300, 64) == 128  # at least 2k


def _aux_reference(pre: torch.Tensor, dead_idx: torch.Tensor, k_aux: int) -> torch.Tensor:
    """float64: ReLU of the k_aux largest over dead_idx, by a stable sort (lowest position first on ties)."""
    sub = pre.index_select(1, dead_idx).double()
    order = torch.sort(-sub, dim=1, stable=True).indices[:, :min(k_aux, sub.shape[1])]
    return torch.zeros_like(sub).scatter_(1, order, sub.gather(1, order).relu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k_aux", [1, 9, 30, 31, 500])
def test_aux_code_matches_reference(dtype, k_aux):
    """The AuxK kernel against a float64 reference: rows with ties at the threshold, all-negative
    rows, +-0.0, k_aux from 1 to above n_dead (every dead latent kept)."""
    g = torch.Generator().manual_seed(k_aux)
    pre = torch.randn(40, 100, generator=g, dtype=torch.float64)
    pre[::4] = torch.randint(-3, 4, (10, 100), generator=g).double()  # many exact ties
    pre[1] = -pre[1].abs() - 1.0
    pre[2, ::2] = -0.0
    pre = pre.to(dtype)
    dead_idx = torch.randperm(100, generator=g)[:31].sort().values
    got = select.aux_code(pre, dead_idx, k_aux, dtype)
    assert got.dtype == dtype and got.shape == (40, 31)
    assert torch.equal(got.double(), _aux_reference(pre, dead_idx, k_aux))
    assert not torch.signbit(got).any()  # ReLU gives +0.0, never -0.0


def test_aux_code_fallback_selects_the_same_set(monkeypatch):
    """Outside the kernel (here: a non-contiguous block) torch.topk picks; without ties, the same code."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(100, 12, generator=g).t()  # (12, 100), not contiguous
    dead_idx = torch.arange(0, 100, 3)
    calls = []
    monkeypatch.setattr(select, "aux_code_rows", lambda *a: calls.append(1))
    got = select.aux_code(pre, dead_idx, 10, torch.float32)
    assert not calls
    assert torch.equal(got.double(), _aux_reference(pre, dead_idx, 10))


def test_aux_code_keeps_nan_rows_whole():
    """A NaN among the dead latents' pre-activations keeps every entry (NaN passes ReLU), so the
    AuxK loss turns non-finite and the trainer skips the step."""
    pre = torch.randn(3, 20)
    pre[1, 4] = float("nan")
    dead_idx = torch.tensor([0, 4, 7, 9, 13])
    got = select.aux_code(pre, dead_idx, 2, torch.float32)
    assert torch.isnan(got[1, 1]) and (got[1] != 0).sum() >= 1
    ref = _aux_reference(pre[[0, 2]], dead_idx, 2)
    assert torch.equal(got[[0, 2]].double(), ref)
    assert torch.equal(got[1, [0, 2, 3, 4]], pre[1, [0, 7, 9, 13]].relu())


def test_aux_code_writes_into_out():
    """``out``: a row block of the batch's code (contiguous) or a strided view, filled either way."""
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(6, 50, generator=g)
    dead_idx = torch.arange(3, 50, 4)
    ref = _aux_reference(pre, dead_idx, 5).float()
    for out in (torch.full((6, 12), 7.0), torch.full((12, 6), 7.0).t()):
        got = select.aux_code(pre, dead_idx, 5, torch.float32, out=out)
        assert torch.equal(out, ref) and torch.equal(got, ref)
