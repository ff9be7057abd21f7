"""trainer.saes.covariance against float64 dense references (docs/sae-math.md)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from trainer.saes.corr_penalty import correlation_penalty, dense_correlation_penalty, penalty_and_moments
from trainer.saes.covariance import LatentStatistics, dense_update, topk_to_dense
from trainer.saes import corr_penalty, pairs
from trainer.saes.fused_pairs import FusedPairs

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: intra-op threads only add overhead (10x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches(n, d=64, B=32, k=4, n_alive=48, seed=0, zero_frac=0.0, dtype=F64, device="cpu"):
    """Random TopK batches: latents >= n_alive never fire (dead); firing is skewed (some latents
    are frequent, some rare) so pairs repeat across rows and steps; optionally some val = 0."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, n_alive + 1, dtype=F64) ** 0.8
    for _ in range(n):
        keys = torch.rand(B, n_alive, generator=g, dtype=F64) ** (1.0 / w)  # weighted sampling w/o replacement
        idx = keys.topk(k, dim=1).indices
        idx = torch.randperm(n_alive, generator=g)[idx]  # frequent latents at random positions
        val = torch.rand(B, k, generator=g, dtype=F64) * 3.0
        if zero_frac:
            val = torch.where(torch.rand(B, k, generator=g, dtype=F64) < zero_frac, 0.0, val)
        yield idx.to(device), val.to(dtype=dtype, device=device)


def dense_run(stats_like: LatentStatistics, data):
    d, eps = stats_like.d_sae, stats_like.eps
    M, mu = eps * torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64)
    for idx, val in data:
        M, mu = dense_update(M, mu, topk_to_dense(idx.cpu(), val.cpu().to(F64), d), stats_like.beta, eps)
    return M, mu


def assert_rel(a, b, rtol, what=""):
    a, b = a.detach().cpu().to(F64), b.detach().cpu().to(F64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite values"
    scale = b.abs().max().clamp_min(1e-300)
    err = ((a - b).abs() / torch.maximum(b.abs(), 1e-3 * scale)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


# -- lazy running statistics == the defining recursion ----------------------------------
@pytest.mark.parametrize("beta,steps,fold_threshold", [(0.05, 200, 1e-3), (0.3, 80, 1e-3), (0.02, 40, 0.9),
                                                       (1.0, 5, 1e-3)])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_lazy_update_matches_dense_formula(beta, steps, fold_threshold, eps):
    st = LatentStatistics(64, beta, eps, dtype=F64, fold_threshold=fold_threshold)
    data = list(batches(steps, seed=steps))
    for idx, val in data:
        st.update(idx, val)
    M, mu = dense_run(st, data)
    expected_folds = 0
    s = 1.0
    for _ in range(steps):  # the fold-back schedule is deterministic
        s *= 1 - beta
        if s < fold_threshold:
            s, expected_folds = 1.0, expected_folds + 1
    assert st.n_folds == expected_folds and st.step == steps
    if beta < 1:
        assert st.n_folds >= 1, "the case must exercise the fold-back"
    Ml = st.second_moment()
    assert torch.equal(Ml, Ml.T)
    # Elementwise: the entries are sums of non-negative terms, no cancellation.
    assert_rel(Ml, M, 1e-10, "M")
    assert_rel(st.mean(), mu, 1e-10, "mu")
    # dead latents: exactly eps on the diagonal, 0 elsewhere; mu exactly 0
    assert torch.all(st.mean()[48:] == 0)
    assert torch.all(Ml[48:, :48] == 0)
    assert torch.allclose(Ml[48:, 48:].diagonal(), torch.full((16,), eps, dtype=F64), rtol=1e-12, atol=0)
    # blocks, variance and covariance read through the lazy form
    rows, cols = torch.tensor([3, 0, 50, 7, 3]), torch.tensor([7, 3, 1, 63])
    assert_rel(st.second_moment(rows, cols), M[rows][:, cols], 1e-10, "block")
    assert_rel(st.second_moment(rows), M[rows], 1e-10, "row block")
    assert_rel(st.second_moment(cols=cols), M[:, cols], 1e-10, "col block")
    Sigma = M - torch.outer(mu, mu)
    lat = torch.arange(0, 64, 3)
    top = Sigma.abs().max()
    assert (st.covariance_block(lat) - Sigma[lat][:, lat]).abs().max() <= 1e-12 * top
    assert (st.covariance_block() - Sigma).abs().max() <= 1e-12 * top
    assert (st.variance() - Sigma.diagonal()).abs().max() <= 1e-12 * top


def test_float32_buffer_tracks_float64_reference():
    st = LatentStatistics(64, 0.05, 1e-6)  # default dtype float32
    data = list(batches(200, seed=5, dtype=torch.float32))
    for idx, val in data:
        st.update(idx, val)
    assert st.dtype == torch.float32 and st.n_folds >= 1
    M, mu = dense_run(st, data)
    assert_rel(st.second_moment(), M, 2e-5, "fp32 M")
    assert_rel(st.mean(), mu, 2e-5, "fp32 mu")


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("beta,steps", [(0.05, 200), (1.0, 5)])
def test_update_from_penalty_moments_equals_plain_update(beta, steps, eps):
    """The step's update reuses the penalty's distinct pairs (``moments``): the same statistics
    as the update that rebuilds every row's pairs, and as the dense recursion."""
    a = LatentStatistics(64, beta, eps, dtype=F64)
    b = LatentStatistics(64, beta, eps, dtype=F64)
    data = list(batches(steps, seed=21, zero_frac=0.1))
    for idx, val in data:
        _, _, mom = penalty_and_moments(b, idx, val.clone().requires_grad_(True))
        keys, q = mom.pairs()
        assert q.grad_fn is None and not q.requires_grad
        assert torch.equal(keys, torch.unique(keys)), "keys distinct and ascending"
        a.update(idx, val)
        b.update(idx, val, moments=mom)
    assert (a.step, a.scale, a.diag_extra, a.n_folds) == (b.step, b.scale, b.diag_extra, b.n_folds)
    assert_rel(b.second_moment(), a.second_moment(), 1e-12, "M via moments")
    assert_rel(b.mean(), a.mean(), 1e-12, "mu via moments")
    assert torch.all(torch.tril(b.M_buf, -1) == 0), "only the upper triangle is written"
    M, mu = dense_run(b, data)
    assert_rel(b.second_moment(), M, 1e-10, "M vs dense")
    assert_rel(b.mean(), mu, 1e-10, "mu vs dense")
    with pytest.raises(ValueError, match="moments"):
        b.update(idx[:3], val[:3], moments=mom)


def test_update_without_coactive_pairs():
    """k = 1, or no two non-zero values in a row: no pair, only the diagonal and mu move."""
    for idx, val in [(torch.tensor([[3], [5], [3]]), torch.tensor([[1.0], [2.0], [0.5]], dtype=F64)),
                     (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[0.0, 2.0], [1.5, 0.0]], dtype=F64))]:
        a, b = LatentStatistics(16, 0.1, 1e-6, dtype=F64), LatentStatistics(16, 0.1, 1e-6, dtype=F64)
        loss, diag, mom = penalty_and_moments(b, idx, val)
        assert loss.item() == 0.0 and int(diag["n_pairs"]) == 0
        a.update(idx, val)
        b.update(idx, val, moments=mom)
        M, mu = dense_run(a, [(idx, val)])
        for st in (a, b):
            assert_rel(st.second_moment(), M, 1e-12, "M")
            assert_rel(st.mean(), mu, 1e-12, "mu")


@pytest.mark.parametrize("d,B,k", [(64, 32, 4), (50, 7, 6), (1000, 300, 12), (16, 1, 2)])
def test_unique_pairs_equals_torch_unique(d, B, k):
    """The torch path: the distinct keys of the row pairs, and for every row pair its key (via
    inv) and its (b, p, q) entry (via pos), each once."""
    for idx, val in batches(2, d=d, B=B, k=k, n_alive=min(48, d), seed=d, zero_frac=0.2):
        idx = torch.cat([idx, idx[:3]])  # repeated rows: every one of their pairs is a duplicate
        val = torch.cat([val, val[:3]])
        s, perm, vs = pairs.sorted_rows(idx, val)
        keys, prods = pairs.row_pairs(s, vs, d)
        uniq, inv, pos = pairs.unique_pairs(s, d)
        assert uniq.dtype == torch.int64 and torch.equal(uniq, torch.unique(keys))
        n = idx.shape[0]
        b, p, q = pos // (k * k), pos // k % k, pos % k
        assert bool((p < q).all()) and pos.unique().numel() == n * k * (k - 1) // 2
        assert torch.equal(uniq[inv.long()], s[b, p] * d + s[b, q])
        P, Q = torch.triu_indices(k, k, 1)  # row_pairs: row-major p < q
        assert torch.equal(keys.view(n, -1), s[:, P] * d + s[:, Q])
        assert torch.equal(prods.view(n, -1), vs[:, P] * vs[:, Q])


@pytest.mark.parametrize("hot", [False, True])
@pytest.mark.parametrize("d,B,k", [(64, 32, 4), (50, 7, 6), (1000, 300, 12), (16, 1, 2)])
def test_fused_pairs_equal_torch_unique(d, B, k, hot):
    """The fused CPU kernels: the same distinct keys as torch.unique, each key's product sum as
    the float64 sum over its row pairs, and every row pair in exactly one slice. ``hot``: one
    latent in every row (one slice can then hold most pairs)."""
    for idx, val in batches(2, d=d, B=B, k=k, n_alive=min(48, d), seed=d + hot, zero_frac=0.2):
        if hot:
            idx[:, 0] = torch.where((idx == 0).any(1), idx[:, 0], 0)
        idx = torch.cat([idx, idx[:3]])
        val = torch.cat([val, val[:3]])
        s, _, vs = pairs.sorted_rows(idx, val)
        row_keys, prods = pairs.row_pairs(s, vs, d)
        fp = FusedPairs.build(s, vs, d)
        keys, q = fp.sums()
        uniq, inv = torch.unique(row_keys, return_inverse=True)
        assert torch.equal(keys, uniq) and fp.packed.size == row_keys.numel()
        ref = torch.zeros(uniq.numel(), dtype=F64).index_add_(0, inv, prods.double())
        assert_rel(q, ref, 1e-14, "q")
        lo = torch.from_numpy(fp.packed >> fp.shift) // d
        for t in range(fp.bounds.size - 1):  # a slice holds whole runs: its lo latents are its own
            a, b = int(fp.bounds[t]), int(fp.bounds[t + 1])
            if t and a < fp.packed.size and b > a:
                assert int(lo[a]) > int(lo[a - 1])


@pytest.mark.parametrize("digit_bits", [3, 4, 13])
def test_radix_sort_slices_is_the_full_sort(digit_bits):
    """The per-slice radix sort on the key bits gives exactly numpy's sort of the whole packed
    int64 (ties in key keep the ascending low bits they were written in), for one pass, an odd
    and an even number of passes, and empty and one-element slices."""
    from trainer.saes import pair_kernels as kern

    rng = np.random.default_rng(digit_bits)
    d, shift, sizes = 40, 10, [0, 1, 500, 3000, 7]
    lo_cuts = [0, 3, 5, 12, 30, 40]  # each slice owns the lo latents [cut_t, cut_t+1)
    parts = []
    for t, n in enumerate(sizes):
        lo = rng.integers(lo_cuts[t], lo_cuts[t + 1], n) if n else np.zeros(0, np.int64)
        key = lo * d + rng.integers(0, d, n)
        parts.append(np.sort((key << shift) | rng.integers(0, 1 << shift, n)) if n else key)
    # within a slice, written in ascending low bits per key (as pack_pairs does), keys shuffled
    shuffled = []
    for a in parts:
        keys, inv = np.unique(a >> shift, return_inverse=True)
        rank = rng.permutation(keys.size)[inv]  # keys in random order, each key's pairs by low bits
        shuffled.append(a[np.lexsort((a & ((1 << shift) - 1), rank))])
    pk = np.concatenate(shuffled).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    bucket_of = np.repeat(np.arange(len(sizes)), np.diff(lo_cuts)).astype(np.int64)
    base, span = kern.slice_spans(bucket_of, d, len(sizes))
    expect = np.concatenate([np.sort(pk[bounds[t]:bounds[t + 1]]) for t in range(len(sizes))])
    kern.radix_sort_slices(pk, np.empty_like(pk), shift, bounds, base, span, digit_bits)
    assert np.array_equal(pk, expect)


def test_penalty_same_through_either_merge(monkeypatch):
    """The fused CPU kernels and the torch.unique path (other devices) give the same penalty,
    gradient, moments and diagnostics."""
    st = LatentStatistics(64, 0.05, 1e-6, dtype=F64)
    data = list(batches(6, seed=8, zero_frac=0.1))
    for idx, val in data[:-1]:
        st.update(idx, val)
    idx, val = data[-1]
    out = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(corr_penalty, "fused_pairs_supported", lambda *a: False)
        v = val.clone().requires_grad_(True)
        loss, diag, mom = penalty_and_moments(st, idx, v)
        loss.backward()
        out.append((loss.detach(), v.grad, mom, diag))
    (l1, g1, m1, d1), (l2, g2, m2, d2) = out
    assert_rel(l1, l2, 1e-13, "loss")
    (k1, q1), (k2, q2) = m1.pairs(), m2.pairs()
    assert torch.equal(k1, k2)
    assert (g1 - g2).abs().max() <= 1e-13 * g1.abs().max()
    assert_rel(q1, q2, 1e-13, "moments q")
    assert all(torch.equal(d1[n], d2[n]) for n in ("n_pairs", "nonfinite", "min_var"))
    for n in ("mean_abs_R", "max_abs_R"):
        assert_rel(d1[n], d2[n], 1e-13, n)


# -- the dense-triangle path (fused_pairs.DensePairs) against the sorted one and torch ----------
def _stats_with_history(d, dtype, seed, k=4, B=32, n_alive=None, eps=1e-6):
    st = LatentStatistics(d, 0.05, eps, dtype=dtype)
    for idx, val in batches(4, d=d, B=B, k=k, n_alive=n_alive or min(48, d), seed=seed, zero_frac=0.1, dtype=dtype):
        st.update(idx, val)
    return st


def _edge_batch(d, B, k, seed, dtype, hot=False, zero_rows=False):
    """A TopK-like batch with repeated rows, zero values, optionally a latent in every row and
    rows whose values are 0 or -0.0 at every other entry (pairs that occur with product sum 0,
    -0.0 even: kept, masked)."""
    idx, val = next(batches(1, d=d, B=B, k=k, n_alive=min(48, d), seed=seed, zero_frac=0.2, dtype=dtype))
    if hot:
        idx[:, 0] = torch.where((idx == 0).any(1), idx[:, 0], 0)
    if zero_rows:
        val[: max(1, B // 4), ::2] = -0.0
    if B > 3:
        idx, val = torch.cat([idx, idx[:3]]), torch.cat([val, val[:3]])
    return idx, val


DENSE_CASES = [(64, 32, 4, False), (50, 7, 6, True), (300, 300, 12, True), (16, 1, 2, False), (16, 5, 2, True),
               (130, 40, 9, False)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d,B,k,hot", DENSE_CASES)
def test_dense_pairs_equal_sorted_pairs(d, B, k, hot, dtype):
    """The dense-triangle kernels give the sorted path's very numbers: the same keys, the same
    sums ``q`` (bit for bit: each is added over the rows in the same order), ``R``, ``rr``, loss
    sums, kept and non-finite counts; q also against the float64 sum of every row pair."""
    from trainer.saes.fused_pairs import DensePairs

    st = _stats_with_history(d, dtype, seed=d + k)
    for zero_rows in (False, True):
        idx, val = _edge_batch(d, B, k, seed=d + B + zero_rows, dtype=dtype, hot=hot, zero_rows=zero_rows)
        s, _, vs = pairs.sorted_rows(idx, val)
        m, q_diag, mu_t, s_diag = corr_penalty._latent_terms(st, idx, val)
        args = (st.M_buf.view(-1), 0.95 * st.scale, 0.05 / idx.shape[0], mu_t, s_diag.rsqrt())
        fp, dp = FusedPairs.build(s, vs, d), DensePairs.build(s, vs, d)
        a, b = fp.terms(*args), dp.terms(*args, with_r=True)
        b_keys, b_q = b.triangle.pairs()  # the dense path hands its sums over in the dense array
        assert b.keys is None and b.q is None
        assert torch.equal(a.keys, b_keys) and torch.equal(a.q, b_q)
        assert torch.equal(fp.R, dp.R) and torch.equal(fp.rr, dp.rr)
        assert np.array_equal(a.sums, b.sums) and (a.kept, a.bad) == (b.kept, b.bad)
        if zero_rows:
            assert a.kept < a.keys.numel(), "pairs with product sum 0 are kept, masked"
        row_keys, prods = pairs.row_pairs(s, vs, d)
        uniq, inv = torch.unique(row_keys, return_inverse=True)
        assert torch.equal(b_keys, uniq)
        ref = torch.zeros(uniq.numel(), dtype=F64).index_add_(0, inv, prods.double())
        assert_rel(b_q, ref, 1e-14 if dtype == F64 else 1e-6, "q")
        dp.release()
        fp.release()


@pytest.mark.parametrize("bad_latents", [(7,), (7, 150), (0, 299)])
@pytest.mark.parametrize("poison", [math.inf, math.nan])
def test_dense_pairs_nonfinite_r_same_as_sorted(bad_latents, poison):
    """Non-finite ``R`` (a variance of 0 with eps = 0 gives rs = inf; NaN likewise) inside the
    sweep's blocks and outside them: the dense path's max (NaN wins), non-finite count and loss
    sums equal the sorted path's."""
    from trainer.saes.fused_pairs import DensePairs

    d, B, k = 300, 64, 12
    st = _stats_with_history(d, torch.float32, seed=5)
    idx, val = _edge_batch(d, B, k, seed=9, dtype=torch.float32, hot=True)
    s, _, vs = pairs.sorted_rows(idx, val)
    m, q_diag, mu_t, s_diag = corr_penalty._latent_terms(st, idx, val)
    rs = s_diag.rsqrt()
    rs[list(bad_latents)] = poison
    args = (st.M_buf.view(-1), 0.95 * st.scale, 0.05 / idx.shape[0], mu_t, rs)
    fp, dp = FusedPairs.build(s, vs, d), DensePairs.build(s, vs, d)
    a, b = fp.terms(*args), dp.terms(*args)
    assert a.bad > 0 and (a.kept, a.bad) == (b.kept, b.bad)
    assert np.array_equal(a.sums, b.sums, equal_nan=True)
    assert not math.isfinite(b.sums[0]) and not math.isfinite(b.sums[2])
    dp.release()
    fp.release()


def _penalty_run(st, idx, val, path, monkeypatch):
    """Loss, gradient, moments and diagnostics through ``path``: "dense", "sorted" (the fused
    CPU kernels) or "torch" (the torch.unique path)."""
    from trainer.saes import fused_pairs

    with monkeypatch.context() as mp:
        if path == "torch":
            mp.setattr(corr_penalty, "fused_pairs_supported", lambda *a: False)
        else:
            mp.setattr(fused_pairs, "dense_triangle", lambda *a: path == "dense")
        v = val.clone().requires_grad_(True)
        loss, diag, mom = penalty_and_moments(st, idx, v)
        loss.backward()
    return loss.detach(), v.grad, mom, diag


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d,B,k,hot", DENSE_CASES)
def test_penalty_dense_path_equals_sorted_and_torch(d, B, k, hot, dtype, monkeypatch):
    """Through the whole penalty: the dense path's moments, n_pairs, min_var and loss equal the
    sorted path's exactly, its gradient to rounding; both agree with the torch path."""
    st = _stats_with_history(d, dtype, seed=3 * d + k)
    idx, val = _edge_batch(d, B, k, seed=d * B, dtype=dtype, hot=hot, zero_rows=True)
    dense, fused, ref = (_penalty_run(st, idx, val, p, monkeypatch) for p in ("dense", "sorted", "torch"))
    tol = 1e-13 if dtype == F64 else 2e-5
    (l1, g1, m1, d1), (l2, g2, m2, d2) = dense, fused
    (k1, q1), (k2, q2), (k3, q3) = (m.pairs() for m in (m1, m2, ref[2]))
    assert torch.equal(l1, l2) and torch.equal(k1, k2) and torch.equal(q1, q2)
    assert all(torch.equal(d1[n], d2[n]) for n in corr_penalty.DIAGNOSTICS)
    assert (g1 - g2).abs().max() <= tol * g2.abs().max()
    l3, g3, m3, d3 = ref
    assert_rel(l1, l3, tol, "loss vs torch")
    assert torch.equal(k1, k3)
    assert_rel(q1, q3, tol, "q vs torch")
    assert (g1 - g3).abs().max() <= tol * g3.abs().max()
    assert all(torch.equal(d1[n], d3[n]) for n in ("n_pairs", "nonfinite", "min_var"))


@pytest.mark.parametrize("fused", ["dense", "sorted"])
def test_penalty_dense_path_matches_dense_reference(fused, monkeypatch):
    """The dense path against the float64 dense reference (value and gradient), over steps."""
    from trainer.saes import fused_pairs

    monkeypatch.setattr(fused_pairs, "dense_triangle", lambda *a: fused == "dense")
    st = LatentStatistics(40, 0.1, 1e-6, dtype=F64)
    for t, (idx, val) in enumerate(batches(12, d=40, k=6, n_alive=36, seed=17, zero_frac=0.1)):
        if t in (0, 5, 11):
            _compare_penalty(st, idx, val)
        st.update(idx, val)


def test_dense_triangle_rule_and_its_edge(monkeypatch):
    """The rule is a function of the shapes (a run never switches); at its edge either side gives
    the same penalty: d at the largest dense triangle for (B, k), and one latent more."""
    from trainer.saes import fused_pairs
    from trainer.saes.fused_pairs import (DENSE_MAX_BYTES, DENSE_RATIO, DensePairs, build_pairs, dense_triangle,
                                          dense_entries)

    B, k = 3, 5
    P = B * k * (k - 1) // 2
    d = max(n for n in range(2, 200) if n * (n - 1) // 2 <= DENSE_RATIO * P)
    assert dense_triangle(B, k, d, 8) and not dense_triangle(B, k, d + 1, 8)
    big = max(n for n in range(4000, 9000) if dense_entries(n) * 4 <= DENSE_MAX_BYTES)
    assert dense_triangle(10**6, 64, big, 4) and not dense_triangle(10**6, 64, big + 1, 4)
    assert not dense_triangle(10**6, 64, big, 8)  # float64 doubles the array
    assert dense_triangle(512, 64, 1152, 4) and not dense_triangle(4096, 64, 16384, 4)  # the benchmark's sizes
    out = {}
    for n in (d, d + 1):
        st = _stats_with_history(n, F64, seed=n, k=k, B=B, n_alive=n)
        idx, val = _edge_batch(n, B, k, seed=n, dtype=F64)
        s, _, vs = pairs.sorted_rows(idx, val)
        chosen = build_pairs(s, vs, n)
        assert isinstance(chosen, DensePairs) == (n == d)
        chosen.release()
        out[n] = [_penalty_run(st, idx, val, p, monkeypatch) for p in ("dense", "sorted")]
        (l1, g1, m1, _), (l2, g2, m2, _) = out[n]
        assert torch.equal(l1, l2) and torch.equal(m1.pairs()[1], m2.pairs()[1])
        assert (g1 - g2).abs().max() <= 1e-13 * g2.abs().max()
    assert fused_pairs.dense_triangle is dense_triangle


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_update_from_dense_sums_equals_update_from_sorted_pairs(dtype, monkeypatch):
    """The statistics' update from the dense path's array (one pass over the whole triangle) gives
    the very bits of the update from the sorted path's distinct keys and sums, step after step,
    and leaves the array at rest; its keys and sums read before the update stay readable."""
    from trainer.saes import fused_pairs

    d = 90
    st = {path: _stats_with_history(d, dtype, seed=11, k=6) for path in ("dense", "sorted")}
    for t, (idx, val) in enumerate(batches(6, d=d, k=6, n_alive=80, seed=12, zero_frac=0.2, dtype=dtype)):
        moments = {}
        for path, stats in st.items():
            monkeypatch.setattr(fused_pairs, "dense_triangle", lambda *a, p=path: p == "dense")
            v = val.clone().requires_grad_(True)
            loss, _, moments[path] = penalty_and_moments(stats, idx, v)
            loss.backward()
        assert moments["dense"].keys is None and moments["dense"].triangle is not None
        assert moments["sorted"].triangle is None
        if t == 0:
            read = moments["dense"].pairs()  # read before the update: kept
        for path, stats in st.items():
            stats.update(idx, val, moments=moments[path])
        assert torch.equal(st["dense"].M_buf, st["sorted"].M_buf), f"step {t}"
        assert torch.equal(st["dense"].mu, st["sorted"].mu)
        if t == 0:
            assert moments["dense"].pairs() is read
        else:
            with pytest.raises(RuntimeError, match="already added"):
                moments["dense"].pairs()
        arrays = list(fused_pairs._CLEAN._free.values())
        assert arrays and all(bool((a == 0).all()) and bool(np.signbit(a).all()) for a in arrays)
    before = {k: v.clone() for k, v in st["dense"].state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="already added"):  # once added, a triangle is gone: refused, nothing changed
        st["dense"].update(idx, val, moments=moments["dense"])
    assert all(torch.equal(v, st["dense"].state_dict()[k]) for k, v in before.items())
    assert st["dense"].step == st["sorted"].step


def test_dense_array_returns_to_rest(monkeypatch):
    """The dense array is kept between batches with every entry at -0.0: after a backward, after
    a forward whose batch is collected without backward, and with two batches alive at once."""
    import gc

    from trainer.saes import fused_pairs

    monkeypatch.setattr(fused_pairs, "dense_triangle", lambda *a: True)
    d = 70
    st = _stats_with_history(d, torch.float32, seed=5, k=5)
    data = list(batches(3, d=d, k=5, n_alive=60, seed=6, zero_frac=0.2, dtype=torch.float32))

    def at_rest():
        arrays = list(fused_pairs._CLEAN._free.values())
        assert arrays and all(bool((a == 0).all()) and bool(np.signbit(a).all()) for a in arrays)

    grads = []
    for idx, val in data:
        v = val.clone().requires_grad_(True)
        correlation_penalty(st, idx, v)[0].backward()
        grads.append(v.grad)
        at_rest()
    correlation_penalty(st, *data[0])  # no backward: collected, its array put back at rest
    gc.collect()
    at_rest()
    a, b = (val.clone().requires_grad_(True) for _, val in data[:2])
    la, lb = correlation_penalty(st, data[0][0], a)[0], correlation_penalty(st, data[1][0], b)[0]
    lb.backward()
    la.backward()
    assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])
    at_rest()


@pytest.mark.parametrize("presorted", [False, True], ids=["shuffled-rows", "ascending-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sort_rows_kernel_equals_torch_sort_and_min_var(dtype, presorted):
    """The fused path's row sort (a bitmap walk, or a copy of rows already ascending, as the CPU
    top-k gives them) gives torch.sort's rows, permutation and values, and corr_penalty's min_var,
    including zero values, ties, NaN, k = 2, B = 1; a row that repeats a latent or holds one
    outside 0 .. d - 1 is refused (None). With the dense path's cuts: those of the serial kernel."""
    from trainer.saes import fused_pairs, pair_kernels as kern
    from trainer.saes.fused_pairs import sort_rows

    g = torch.Generator().manual_seed(1)
    for d, B, k in [(1000, 64, 12), (70, 1, 2), (64, 9, 64), (130, 20, 3)]:
        idx = torch.rand(B, d, generator=g).argsort(dim=1)[:, :k]
        if presorted:
            idx = idx.sort(dim=1).values
        val = (torch.rand(B, k, generator=g, dtype=F64) * 3).to(dtype)
        val[val < 0.3] = 0.0
        val[0, : min(2, k)] = 1.5  # a tie for the largest value
        s_diag = torch.rand(d, generator=g, dtype=F64).to(dtype)
        if B > 3:
            val[1] = 0.0  # a row without a co-active pair
            val[2, 0] = float("nan")
            val[3, 1:] = 0.0  # one non-zero value: no pair, though the smallest S_ii is its latent's
            val[3, 0] = 2.0
            s_diag[idx[3, 0]] = -1.0
        s, perm, vs = pairs.sorted_rows(idx, val)
        got = sort_rows(idx, val, s_diag)
        assert got is not None
        assert torch.equal(got[0], s) and torch.equal(got[1], perm)
        assert torch.equal(got[2].isnan(), vs.isnan()) and torch.equal(got[2].nan_to_num(), vs.nan_to_num())
        assert torch.equal(got[3].isnan(), corr_penalty._min_var(s, vs, s_diag).isnan())
        assert torch.equal(got[3].nan_to_num(), corr_penalty._min_var(s, vs, s_diag).nan_to_num())
        assert got[4] is None
        with_cuts = sort_rows(idx, val, s_diag, with_cuts=True)
        assert torch.equal(got[0], with_cuts[0]) and torch.equal(got[1], with_cuts[1])
        assert np.array_equal(with_cuts[4], kern.row_cuts(s.numpy(), d, fused_pairs.n_slices()))  # the serial kernel
    for bad in (idx[-1, 0], d, -1):  # a repeated latent, one past the end, a negative one
        wrong = idx.clone()
        wrong[-1, 1] = bad
        assert sort_rows(wrong, val, s_diag) is None
        wrong = idx.clone()
        wrong[-1, -1] = bad  # last: an ascending row otherwise
        assert sort_rows(wrong, val, s_diag) is None
        assert sort_rows(wrong, val, s_diag, with_cuts=True) is None  # its unfilled row is never read
    assert sort_rows(idx.int(), val, s_diag) is not None


# -- the eigenvalue invariant -------------------------------------------------------------
def test_sigma_eigenvalues_stay_above_eps_with_dead_latents():
    eps = 1e-6
    st, st0 = LatentStatistics(64, 0.05, eps, dtype=F64), LatentStatistics(64, 0.05, 0.0, dtype=F64)
    assert st.min_eigenvalue() == pytest.approx(eps, rel=1e-12)  # Sigma_0 = eps I
    worst = math.inf
    for t, (idx, val) in enumerate(batches(200, seed=11)):
        st.update(idx, val)
        st0.update(idx, val)
        lam = st.min_eigenvalue()  # every step
        worst = min(worst, lam)
        assert lam >= eps - 1e-12, f"step {t + 1}: min eigenvalue {lam:.3e} < eps"
    assert worst == pytest.approx(eps, rel=1e-6)  # attained on the dead latents
    alive = torch.arange(48)
    assert st.min_eigenvalue(alive) >= eps - 1e-12
    assert 1.0 < st.condition_number() < math.inf
    # The ablation: without damping the dead latents make Sigma singular.
    lam0 = st0.min_eigenvalue()
    assert abs(lam0) <= 1e-13, lam0
    assert st0.condition_number() > 1e12 or st0.condition_number() == math.inf
    assert st0.min_eigenvalue(alive) >= -1e-12  # still PSD
    assert (st0.variance()[48:] == 0).all() and (st.variance()[48:] == eps).all()


# -- the correlation penalty == dense reference -------------------------------------------
def _compare_penalty(st: LatentStatistics, idx, val, rtol=1e-10):
    M_prev, mu_prev = st.second_moment(dtype=F64).cpu(), st.mean().cpu().to(F64)
    before = (st.M_buf.clone(), st.mu.clone(), st.step, st.scale)
    v = val.clone().requires_grad_(True)
    loss, diag = correlation_penalty(st, idx, v)
    loss.backward()
    z = topk_to_dense(idx.cpu(), val.detach().cpu().to(F64), st.d_sae).requires_grad_(True)
    ref = dense_correlation_penalty(M_prev, mu_prev, z, st.beta, st.eps)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all()
    assert_rel(loss, ref, rtol, "L_corr")
    g_ref = z.grad.gather(1, idx.cpu().long())
    gscale = g_ref.abs().max()
    assert (v.grad.cpu().to(F64) - g_ref).abs().max() <= rtol * gscale, "grad"
    # diagnostics: every co-active unordered pair once, the diagonal never
    Q = z.detach().T @ z.detach()
    assert int(diag["n_pairs"]) == int(torch.triu(Q != 0, diagonal=1).sum())
    assert int(diag["nonfinite"]) == 0
    # the penalty must not touch the statistics
    assert torch.equal(before[0], st.M_buf) and torch.equal(before[1], st.mu) and before[2:] == (st.step, st.scale)
    return loss, diag


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("beta,d,k", [(0.05, 64, 4), (0.3, 16, 5), (1.0, 64, 4)])
def test_penalty_matches_dense_reference(device, eps, beta, d, k):
    st = LatentStatistics(d, beta, eps, dtype=F64, device=device)
    data = list(batches(61, d=d, k=k, n_alive=min(48, d), seed=3, zero_frac=0.1, device=device))
    for t, (idx, val) in enumerate(data):
        if t in (0, 1, 30, 60):  # fresh (M_0 = eps I), early, after folds
            _compare_penalty(st, idx, val)
        st.update(idx, val)


def test_penalty_counts_only_coactive_pairs_once():
    # Hand-checkable: d = 6; rows {0,1,2}, {1,0,4}, {5,3,2} with a zero at (row 2, latent 3).
    beta, eps, d = 0.5, 1e-6, 6
    st = LatentStatistics(d, beta, eps, dtype=F64)
    idx = torch.tensor([[0, 1, 2], [1, 0, 4], [5, 3, 2]])
    val = torch.tensor([[1.0, 2.0, 0.5], [1.5, 0.25, 1.0], [2.0, 0.0, 1.0]], dtype=F64)
    loss, diag = correlation_penalty(st, idx, val)
    # co-active (non-zero product in some row): 01 02 12 04 14 25; not 35/23 (zero value), no diagonal
    assert int(diag["n_pairs"]) == 6
    z = topk_to_dense(idx, val, d)
    Q, m = z.T @ z / 3, z.mean(0)
    mu_t = beta * m
    S = 0.5 * eps * torch.eye(d, dtype=F64) + beta * (Q + eps * torch.eye(d, dtype=F64)) - torch.outer(mu_t, mu_t)
    pairs = [(0, 1), (0, 2), (1, 2), (0, 4), (1, 4), (2, 5)]
    want = sum(S[i, j] ** 2 / (S[i, i] * S[j, j]) for i, j in pairs) / len(pairs)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    # repeated pairs across rows are one pair: duplicate the batch, still 6 pairs
    _, diag2 = correlation_penalty(st, torch.cat([idx, idx]), torch.cat([val, val]))
    assert int(diag2["n_pairs"]) == 6


def test_penalty_without_pairs_is_zero_and_differentiable():
    st = LatentStatistics(16, 0.1, 1e-6, dtype=F64)
    for idx, val in [(torch.tensor([[3], [5]]), torch.tensor([[1.0], [2.0]], dtype=F64)),       # k = 1
                     (torch.tensor([[3, 4], [5, 6]]), torch.zeros(2, 2, dtype=F64))]:           # nothing fires
        v = val.clone().requires_grad_(True)
        loss, diag = correlation_penalty(st, idx, v)
        loss.backward()
        assert loss.item() == 0.0 and int(diag["n_pairs"]) == 0 and torch.equal(v.grad, torch.zeros_like(v))


def test_eps_zero_degenerate_variance_is_nonfinite_not_an_exception():
    # (a) beta = 1, one row: S is the batch covariance of a single sample = 0 -> R = 0/0.
    for eps, finite in [(0.0, False), (1e-6, True)]:
        st = LatentStatistics(8, 1.0, eps, dtype=F64)
        v = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
        loss, diag = correlation_penalty(st, torch.tensor([[0, 1, 2]]), v)
        loss.backward()
        assert bool(torch.isfinite(loss)) is finite
        assert (int(diag["nonfinite"]) == 0) is finite
        assert (diag["min_var"].item() > 0) is finite
    # (b) a never-fired latent turns up with a value whose square underflows: S_ii = 0 -> inf.
    data = list(batches(20, d=16, k=3, n_alive=12, seed=2))
    idx = torch.tensor([[0, 13], [1, 2]])  # 13 never fired before
    val = torch.tensor([[1.0, 1e-200], [1.0, 2.0]], dtype=F64)
    for eps, finite in [(0.0, False), (1e-6, True)]:
        st = LatentStatistics(16, 0.01, eps, dtype=F64)
        for i, v in data:
            st.update(i, v)
        v = val.clone().requires_grad_(True)
        loss, diag = correlation_penalty(st, idx, v)
        loss.backward()  # must not raise
        assert bool(torch.isfinite(loss)) is finite, (eps, loss)
        if not finite:
            assert diag["min_var"].item() == 0.0 and int(diag["nonfinite"]) >= 1
        st.update(idx, val)  # the statistics themselves stay finite
        assert torch.isfinite(st.second_moment()).all()

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("beta", [0.01, 0.2, 1.0])
def test_penalty_gradient_is_the_batch_gradient_not_scaled_by_beta(beta, fused, monkeypatch):
    """The batch-gradient convention (docs/sae-math.md): the gradient is that of L_corr with the
    batch's moments entering S with weight 1, i.e. the literal derivative through the EMA
    (which carries a factor beta) divided by beta; the value is unchanged."""
    if not fused:
        monkeypatch.setattr(corr_penalty, "fused_pairs_supported", lambda *a: False)
    d, eps = 48, 1e-6
    st = LatentStatistics(d, beta, eps, dtype=F64)
    data = list(batches(12, d=d, k=5, n_alive=40, seed=11))
    for idx, val in data[:-1]:
        st.update(idx, val)
    idx, val = data[-1]
    M_prev, mu_prev = st.second_moment(dtype=F64), st.mean().to(F64)
    v = val.clone().requires_grad_(True)
    loss, _ = correlation_penalty(st, idx, v)
    loss.backward()
    # The literal derivative: S = (1 - beta) M + beta (Q + eps I) - mu~ mu~^T, autograd through z.
    z = topk_to_dense(idx, val, d).requires_grad_(True)
    Q, m = z.T @ z / z.shape[0], z.mean(0)
    mu_t = (1 - beta) * mu_prev + beta * m
    S = (1 - beta) * M_prev + beta * (Q + eps * torch.eye(d, dtype=F64)) - torch.outer(mu_t, mu_t)
    i, j = torch.nonzero(torch.triu(Q.detach() != 0, diagonal=1), as_tuple=True)
    D = torch.diagonal(S)
    literal = (S[i, j] ** 2 / (D[i] * D[j])).mean()
    literal.backward()
    assert_rel(loss, literal, 1e-12, "L_corr")
    g_lit = z.grad.gather(1, idx) / beta
    assert g_lit.abs().max() > 0
    assert (v.grad - g_lit).abs().max() <= 1e-10 * g_lit.abs().max()



def test_penalty_casts_inputs_and_keeps_grad():
    st = LatentStatistics(32, 0.1, 1e-6, dtype=F64)
    for idx, val in batches(3, d=32, n_alive=32):
        st.update(idx, val)
    idx, val = next(batches(1, d=32, n_alive=32, seed=9))
    v32 = val.float().requires_grad_(True)
    loss, _ = correlation_penalty(st, idx.int(), v32)
    assert loss.dtype == F64
    loss.backward()
    assert v32.grad.dtype == torch.float32 and torch.isfinite(v32.grad).all() and v32.grad.abs().sum() > 0


# -- module plumbing ----------------------------------------------------------------------
def test_state_dict_round_trip_and_resume_is_exact():
    a = LatentStatistics(32, 0.2, 1e-6, dtype=F64)
    data = list(batches(30, d=32, n_alive=24, seed=4))
    for idx, val in data[:20]:
        a.update(idx, val)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LatentStatistics(32, 0.2, 1e-6, dtype=F64)
    b.load_state_dict(torch.load(buf))  # weights_only default: plain types only
    assert (b.step, b.scale, b.diag_extra, b.n_folds) == (a.step, a.scale, a.diag_extra, a.n_folds)
    assert torch.equal(a.second_moment(), b.second_moment())
    for idx, val in data[20:]:
        a.update(idx, val)
        b.update(idx, val)
    assert torch.equal(a.M_buf, b.M_buf) and torch.equal(a.mu, b.mu) and a.step == b.step == 30
    with pytest.raises(ValueError, match="beta"):
        LatentStatistics(32, 0.3, 1e-6, dtype=F64).load_state_dict(a.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_to_dtype_device_and_nbytes(device):
    st = LatentStatistics(40, 0.1)
    assert st.nbytes == 40 * 40 * 4 + 40 * 4
    assert st.nbytes == sum(b.numel() * b.element_size() for b in st.buffers())
    for idx, val in batches(5, d=40, n_alive=30, dtype=torch.float32):
        st.update(idx, val)
    ref = st.second_moment(dtype=F64)
    st = st.to(device=device, dtype=F64)
    assert st.dtype == F64 and st.M_buf.device.type == device and st.mu.device.type == device
    assert st.nbytes == 40 * 40 * 8 + 40 * 8
    assert torch.equal(st.second_moment().cpu(), ref)
    idx, val = next(batches(1, d=40, n_alive=30, seed=1))
    st.update(idx.to(device), val.to(device))
    loss, _ = correlation_penalty(st, idx.to(device), val.to(device).requires_grad_(True))
    assert torch.isfinite(loss) and st.step == 6
    assert math.isfinite(st.min_eigenvalue(torch.arange(10, device=device)))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        LatentStatistics(8, 0.0)
    with pytest.raises(ValueError):
        LatentStatistics(8, 0.1, eps=-1.0)
    st = LatentStatistics(8, 0.1)
    with pytest.raises(ValueError):
        st.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError):
        correlation_penalty(st, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    with pytest.raises(TypeError):
        st.update(torch.zeros(2, 2), torch.zeros(2, 2))


def test_update_and_penalty_never_build_anything_dense():
    """The cost claim, checked op by op: with d_sae = 1024, B = 8, k = 4 no op of ``update`` or
    ``penalty_and_moments`` (forward and backward) produces a tensor larger than
    max(B k^2, 2 d_sae) elements (d_sae^2 = 1M, B d_sae = 8192; the penalty's (d_sae, 2) table of
    mu~ and S^-1/2 is the largest O(d_sae) one), and the only ops that write into
    the d_sae x d_sae buffer are the scatter (plus the fold, which this run does not reach)."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    d, B, k = 1024, 8, 4
    st = LatentStatistics(d, 0.05, 1e-6)
    data = list(batches(4, d=d, B=B, k=k, n_alive=900, dtype=torch.float32))
    st.update(*data[0])
    big, writes = [], []

    class Watch(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if first is not None and first.untyped_storage().data_ptr() == st.M_buf.untyped_storage().data_ptr() \
                    and name.endswith("_") and name not in ("index_add_", "index_put_", "_index_put_impl_"):
                writes.append(name)  # an in-place op on the buffer other than the scatter
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() > max(B * k * k, 2 * d):
                    big.append((name, tuple(o.shape)))
            return out

    with Watch():
        for t, (idx, val) in enumerate(data[1:]):
            v = val.clone().requires_grad_(True)
            loss, _, mom = penalty_and_moments(st, idx, v)
            loss.backward()
            st.update(idx, val, moments=mom if t % 2 else None)  # both update paths
    assert st.n_folds == 0
    # views of the buffer (diagonal, flattened) and the in-place scatter return it: fine
    big = [b for b in big if b[0] not in ("view", "diagonal", "alias", "detach", "index_add_", "index_put_",
                                          "_index_put_impl_")]
    assert not big, big
    assert not writes, writes


def test_fused_scratch_is_never_shared_by_live_batches():
    """The fused path reuses its per-step arrays only once a batch's backward is done: two
    forwards before either backward, then both backwards, give each batch its own gradient."""
    st = LatentStatistics(64, 0.05, 1e-6, dtype=F64)
    (i1, v1), (i2, v2) = list(batches(2, seed=3))
    ref = []
    for idx, val in ((i1, v1), (i2, v2)):
        v = val.clone().requires_grad_(True)
        correlation_penalty(st, idx, v)[0].backward()
        ref.append(v.grad)
    a, b = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
    la, lb = correlation_penalty(st, i1, a)[0], correlation_penalty(st, i2, b)[0]
    lb.backward()
    la.backward()
    assert torch.equal(a.grad, ref[0]) and torch.equal(b.grad, ref[1])
    for _ in range(3):  # forwards without backward give their arrays back when collected
        correlation_penalty(st, i1, v1)
    c = v1.clone().requires_grad_(True)
    correlation_penalty(st, i1, c)[0].backward()
    assert torch.equal(c.grad, ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("beta,steps", [(0.01, 5), (0.2, 3), (1.0, 2), (0.05, 0)])
def test_fused_latent_terms_equal_the_torch_ops(dtype, beta, steps):
    """The one-kernel latent terms of the CPU path give the torch ops' very bits (m, diag Q,
    mu~, diag S, and its rsqrt), before and after updates, folds included (beta = 1)."""
    from trainer.saes import fused_pairs

    st = LatentStatistics(300, beta, 1e-6, dtype=dtype)
    for idx, val in batches(steps + 1, d=300, B=64, k=12, n_alive=250, seed=4, zero_frac=0.1, dtype=dtype):
        want = corr_penalty._latent_terms(st, idx, val)
        got = fused_pairs.latent_terms(idx, val, st.M_buf.diagonal(), st.mu, st.beta, st.scale, st.diag_extra, st.eps)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert torch.equal(want[3].rsqrt(), got[4])
        st.update(idx, val)


def test_dense_path_gradient_from_the_forward_scales_with_dloss(monkeypatch):
    """The dense path computes its gradient in the forward for dL/dloss = 1 and the backward
    scales it: with the loss weighted (3.7 L, as lambda weighs it in training) and inside a sum,
    the gradient still equals the sorted path's, which works it out in the backward."""
    from trainer.saes import fused_pairs

    st = _stats_with_history(130, F64, seed=21)
    idx, val = _edge_batch(130, 40, 9, seed=5, dtype=F64, hot=True, zero_rows=True)
    grads = []
    for path in ("dense", "sorted"):
        with monkeypatch.context() as mp:
            mp.setattr(fused_pairs, "dense_triangle", lambda *a: path == "dense")
            v = val.clone().requires_grad_(True)
            loss, _, _ = penalty_and_moments(st, idx, v)
            (3.7 * loss + (v * v).sum()).backward()
        grads.append(v.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-13 * grads[1].abs().max()
    assert not torch.equal(grads[0], 2 * val)  # the penalty's share is there


@pytest.mark.parametrize("path", ["dense", "sorted", "torch"])
@pytest.mark.parametrize("bad", [300, -1, 2**40])
def test_penalty_refuses_a_latent_out_of_range_and_changes_nothing(path, bad, monkeypatch):
    """A latent index outside 0 .. d_sae - 1 is an IndexError on every path (the CPU kernels
    index without bounds checks: they must never see it), and the statistics are unchanged."""
    st = _stats_with_history(300, torch.float32, seed=3)
    before = {n: b.clone() for n, b in st.state_dict().items() if torch.is_tensor(b)}
    idx, val = _edge_batch(300, 64, 12, seed=9, dtype=torch.float32)
    idx[5, 3] = bad
    with pytest.raises(IndexError):
        _penalty_run(st, idx, val, path, monkeypatch)
    assert all(torch.equal(b, st.state_dict()[n]) for n, b in before.items())
