"""The CPU sparse-product kernels (trainer/saes/latent_kernels.py) against dense float64 products."""

import numba
import pytest
import torch

from trainer.saes import latent_kernels as LK
from trainer.saes.sparse_ops import ByLatent


def _selection(B: int, d_sae: int, k: int, seed: int) -> torch.Tensor:
    """Distinct latents per row, with skewed frequencies: some latents get none, 1-3 or exactly
    4 entries (the kernels' remainder and first-group paths), a few get hundreds."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, d_sae + 1, dtype=torch.float64) ** 1.2
    weights = weights[torch.randperm(d_sae, generator=g)]
    return torch.stack([torch.multinomial(weights, k, replacement=False, generator=g) for _ in range(B)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d_sae,k,D", [(300, 500, 7, 33), (64, 2000, 4, 16), (40, 64, 13, 5)])
def test_products_match_dense_float64(dtype, B, d_sae, k, D):
    g = torch.Generator().manual_seed(B + k)
    idx = _selection(B, d_sae, k, seed=B)
    counts = torch.bincount(idx.view(-1), minlength=d_sae)
    assert (counts == 0).any() and ((counts > 0) & (counts < 4)).any() and (counts > 8).any()
    vals = torch.randn(B, k, generator=g, dtype=torch.float64)
    dense = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(d_sae, D, generator=g, dtype=torch.float64)
    z = torch.zeros(B, d_sae, dtype=torch.float64).scatter_(1, idx, vals)  # the dense code
    sel = ByLatent.build(idx, d_sae)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    c = {"dtype": torch.float64}

    wg = LK.weight_grad(sel.crow, sel.cols, sel.order, vals.to(dtype), dense.to(dtype))
    torch.testing.assert_close(wg.to(**c), z.t() @ dense, **tol)
    gv, gW = LK.decoder_grads(sel.crow, sel.cols, sel.order, vals.to(dtype), W.to(dtype), dense.to(dtype))
    torch.testing.assert_close(gW.to(**c), z.t() @ dense, **tol)
    torch.testing.assert_close(gv.to(**c), (dense @ W.t()).gather(1, idx), **tol)
    bias = torch.randn(D, generator=g, dtype=torch.float64)
    x_hat = LK.decode(idx, vals.to(dtype), W.to(dtype), bias.to(dtype))
    torch.testing.assert_close(x_hat.to(**c), z @ W + bias, **tol)
    for out in (wg, gv, gW, x_hat):
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_results_do_not_depend_on_the_thread_count():
    idx = _selection(256, 700, 9, seed=1)
    g = torch.Generator().manual_seed(2)
    vals, dense, W = torch.randn(256, 9, generator=g), torch.randn(256, 40, generator=g), torch.randn(700, 40, generator=g)
    sel = ByLatent.build(idx, 700)

    def run():
        return (LK.weight_grad(sel.crow, sel.cols, sel.order, vals, dense),
                *LK.decoder_grads(sel.crow, sel.cols, sel.order, vals, W, dense), LK.decode(idx, vals, W, dense[0]))

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, run()):
        assert torch.equal(a, b)


def test_supported_dtypes_and_devices():
    x = torch.zeros(2, 2)
    assert LK.supported(x, x) and LK.supported(x.double(), x.double())
    assert not LK.supported(x, x.double()) and not LK.supported(x.bfloat16(), x.bfloat16())
    assert not LK.supported(x.half(), x.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_to_positive_in_place(dtype):
    """AuxK's gradient mask: kept where the code is > 0, 0 where it is 0, -0.0 or NaN; in place,
    on the kernel (contiguous CPU) and on masked_fill_ (a strided view)."""
    g = torch.Generator().manual_seed(2)
    code = torch.randn(37, 29, generator=g, dtype=torch.float64).relu().to(dtype)
    code[3, 4], code[5, 6] = -0.0, float("nan")
    grad = torch.randn(37, 29, generator=g, dtype=torch.float64).to(dtype)
    ref = torch.where(code > 0, grad, torch.zeros((), dtype=dtype))
    for g_in, c_in in ((grad.clone(), code), (grad.t().contiguous().t(), code.t().contiguous().t())):
        out = LK.mask_to_positive_(g_in, c_in)
        assert out is g_in
        assert torch.equal(out, ref)


@pytest.mark.parametrize("B,d_sae,k", [(300, 500, 7), (64, 2000, 4), (40, 64, 13), (1, 10, 1), (0, 8, 3)])
def test_by_latent_counting_sort_is_the_stable_argsort(B, d_sae, k):
    idx = _selection(B, d_sae, k, seed=k) if B else torch.zeros(0, k, dtype=torch.int64)
    got = LK.by_latent(idx, d_sae)
    assert got is not None
    for a, r in zip(got, ByLatent.arrays(idx, d_sae)):  # the torch ops' path
        assert torch.equal(a, r)
    sel = ByLatent.build(idx, d_sae)  # the CPU build takes it
    assert torch.equal(sel.order, got[0]) and torch.equal(sel.crow, got[1]) and torch.equal(sel.cols, got[2])


def test_by_latent_refuses_what_it_cannot_index():
    """An index at or past d_sae, or negative, is refused before anything is written out of range;
    so are other dtypes (the torch path then raises or handles them)."""
    idx = torch.tensor([[0, 3], [2, 5]])
    assert LK.by_latent(idx, 5) is None
    assert LK.by_latent(torch.tensor([[0, -1]]), 5) is None
    assert LK.by_latent(idx.to(torch.int32), 6) is None
    assert LK.by_latent(idx, 6) is not None
