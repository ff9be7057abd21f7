"""The sparse TopK encoder/decoder give the same values and gradients as dense autograd (float64)."""

import pytest
import torch
from torch.nn import functional as F

from trainer.saes import sparse_ops
from trainer.saes.sparse_ops import ByLatent, aux_decode, densify, sparse_decode, squared_error, topk_encode


def _dense_reference(x_c, w, b, k, dead, k_aux, W_dec, b_dec):
    pre = x_c @ w.t() + b
    idx = torch.topk(pre.detach(), k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, idx, F.relu(pre.gather(1, idx)))
    out = {"x_hat": z @ W_dec + b_dec, "z": z}
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    aidx = torch.topk(masked, min(k_aux, int(dead.sum())), dim=-1).indices
    out["aux"] = torch.zeros_like(pre).scatter(1, aidx, F.relu(pre.gather(1, aidx)))
    return out


@pytest.mark.parametrize("blocks", [False, True], ids=["one-product", "row-blocks"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["data-x", "x-needs-grad"])
@pytest.mark.parametrize("by_latent", [True, False], ids=["by-latent-decode", "embedding-bag-decode"])
def test_values_and_gradients_match_dense_autograd_float64(x_grad, by_latent, blocks, monkeypatch):
    """Both of b_dec's routes (through the decoder and through x - b_dec, which is grad_b @ W_enc
    when x is data), both decoder backwards, and the encoder's forward in one product or in row
    blocks of 5 (the last one short), against dense autograd."""
    if blocks:
        monkeypatch.setattr(sparse_ops, "ENCODE_BLOCK_BYTES", 1)
        monkeypatch.setattr(sparse_ops, "ENCODE_MIN_ROWS", 5)
    g = torch.Generator().manual_seed(0)
    B, d_in, d_sae, k, k_aux = 16, 12, 40, 5, 7
    x = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    w = torch.randn(d_sae, d_in, dtype=torch.float64, generator=g)
    b = torch.randn(d_sae, dtype=torch.float64, generator=g) * 0.1
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, generator=g)
    b_dec = torch.randn(d_in, dtype=torch.float64, generator=g)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    target = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    aux_target = torch.randn(B, d_in, dtype=torch.float64, generator=g)

    def run(sparse: bool):
        leaves = [t.clone().requires_grad_(True) for t in (w, b, W_dec, b_dec)]
        w_, b_, Wd_, bd_ = leaves
        x_ = x.clone().requires_grad_(x_grad)
        if sparse:
            dead_idx = dead.nonzero().squeeze(1)
            val, idx, code, sel = topk_encode(x_, bd_, w_, b_, k, dead_idx, k_aux)
            x_hat = sparse_decode(idx, val, Wd_, bd_, sel if by_latent else None)
            e_hat = aux_decode(code, Wd_, dead_idx)
            z = densify(idx, val, d_sae)
        else:
            ref = _dense_reference(x_ - bd_, w_, b_, k, dead, k_aux, Wd_, bd_)
            x_hat, z, e_hat = ref["x_hat"], ref["z"], ref["aux"] @ Wd_
        loss = ((x_hat - target) ** 2).sum() + ((e_hat - aux_target) ** 2).sum() + z.abs().sum()
        loss.backward()
        return loss.detach(), [t.grad for t in leaves] + ([x_.grad] if x_grad else [])

    ls, gs = run(True)
    ld, gd = run(False)
    torch.testing.assert_close(ls, ld, rtol=1e-12, atol=0)
    assert len(gs) == len(gd) == 4 + x_grad
    for a, r in zip(gs, gd):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("blocks", [False, True], ids=["one-product", "row-blocks"])
def test_float32_cpu_kernels_match_float64_autograd(monkeypatch, blocks):
    """float32 on CPU takes the fast kernels (oneDNN's product, the numba top-k), in one product
    or in row blocks (no dead latents): the same selection as float64's dense reference, and
    values / gradients within float32 rounding."""
    from trainer.saes import select

    if blocks:
        monkeypatch.setattr(sparse_ops, "ENCODE_BLOCK_BYTES", 1)
        monkeypatch.setattr(sparse_ops, "ENCODE_MIN_ROWS", 20)  # 48 rows: blocks of 20, 20, 8

    calls = []
    real = select.topk_rows
    monkeypatch.setattr(select, "topk_rows", lambda *a: calls.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(5)
    B, d_in, d_sae, k = 48, 64, 2048, 8
    x = torch.randn(B, d_in, generator=g) * 2
    w = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_sae, generator=g) * 0.1
    b_dec = torch.randn(d_in, generator=g) * 0.1
    target = torch.randn(B, k, dtype=torch.float64, generator=g)

    def grads(dtype, sparse):
        w_, b_ = (t.to(dtype).clone().requires_grad_(True) for t in (w, b))
        if sparse:
            val, idx, _, _ = topk_encode(x.to(dtype), b_dec.to(dtype), w_, b_, k)
        else:
            pre = (x.to(dtype) - b_dec.to(dtype)) @ w_.t() + b_
            idx = torch.topk(pre.detach(), k, dim=-1).indices
            idx = idx.sort(1).values
            val = F.relu(pre.gather(1, idx))
        order = idx.argsort(1)  # compare in latent order: the two return k entries in any order
        val, idx = val.gather(1, order), idx.gather(1, order)
        ((val.double() - target) ** 2).sum().backward()
        return idx, val.detach().double(), w_.grad.double(), b_.grad.double()

    i32, v32, gw32, gb32 = grads(torch.float32, True)
    assert calls == ([k] * 3 if blocks else [k])
    i64, v64, gw64, gb64 = grads(torch.float64, False)
    assert torch.equal(i32, i64)
    for a, r in ((v32, v64), (gw32, gw64), (gb32, gb64)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aux_decode_gradients_match_float64_autograd(dtype):
    """AuxK's decode on CPU (the code's gradient on oneDNN's product in float32; W_dec's as a
    sparse tensor of the dead rows) against float64 autograd: W_dec also feeds a dense term, as
    the live latents' decode does, and its gradient comes out dense, the two parts summed."""
    g = torch.Generator().manual_seed(6)
    code = torch.randn(40, 7, generator=g).relu()
    W = torch.randn(30, 24, generator=g)
    dead_idx = torch.tensor([1, 4, 5, 11, 20, 28, 29])
    target = torch.randn(40, 24, generator=g)

    def grads(dt, sparse):
        c, w = (t.to(dt).clone().requires_grad_(True) for t in (code, W))
        e_hat = aux_decode(c, w, dead_idx) if sparse else c @ w[dead_idx]
        (((e_hat - target.to(dt)) ** 2).sum() + (w ** 3).sum()).backward()
        assert w.grad.layout == torch.strided
        return c.grad.double(), w.grad.double()

    got, ref = grads(dtype, True), grads(torch.float64, False)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_error_value_and_gradients(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 17, generator=g, dtype=torch.float64)
    x_hat = torch.randn(30, 17, generator=g, dtype=torch.float64)
    a, b = (t.to(dtype).clone().requires_grad_(True) for t in (x, x_hat))
    sq, err = squared_error(a, b)
    assert not err.requires_grad and torch.equal(err, a.detach() - b.detach())
    (3.0 * sq).backward()
    ra, rb = x.clone().requires_grad_(True), x_hat.clone().requires_grad_(True)
    ref = ((ra - rb) ** 2).sum()
    (3.0 * ref).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(sq.double(), ref.detach(), **tol)
    torch.testing.assert_close(a.grad.double(), ra.grad, **tol)
    torch.testing.assert_close(b.grad.double(), rb.grad, **tol)


def test_by_latent_sample_is_the_sampled_product():
    """ByLatent.sample: (a @ b.T) at every selected (latent, row), back in the (B, k) order."""
    g = torch.Generator().manual_seed(3)
    B, k, d_sae, d_in = 9, 4, 30, 7
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(B)])
    a = torch.randn(d_sae, d_in, dtype=torch.float64, generator=g)
    b = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    sel = ByLatent.build(idx, d_sae)
    ref = (a @ b.t())[idx, torch.arange(B)[:, None]]
    torch.testing.assert_close(sel.sample(a, b), ref, rtol=1e-13, atol=0)
    v = torch.randn(B, k, dtype=torch.float64, generator=g)
    dense = torch.zeros(d_sae, B, dtype=torch.float64)
    dense[idx, torch.arange(B)[:, None]] = v
    torch.testing.assert_close(sel.csr(v).to_dense(), dense, rtol=0, atol=0)


def test_no_dead_latents_gives_empty_aux():
    x = torch.randn(4, 6)
    val, idx, code, _ = topk_encode(x, torch.zeros(6), torch.randn(10, 6), torch.zeros(10), 3,
                                    torch.zeros(0, dtype=torch.int64), 2)
    assert val.shape == idx.shape == (4, 3) and code.shape == (4, 0)
    assert (val >= 0).all()


def test_unused_outputs_still_give_exact_gradients():
    """Only val used (no AuxK term): the unmaterialised code gradient is skipped, the rest exact."""
    g = torch.Generator().manual_seed(1)
    x_c = torch.randn(9, 5, dtype=torch.float64, generator=g)
    w = torch.randn(20, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    val, idx, code, _ = topk_encode(x_c, torch.zeros(5, dtype=torch.float64), w, b, 4, torch.arange(0, 20, 2), 3)
    (val ** 2).sum().backward()
    w2, b2 = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    pre = x_c @ w2.t() + b2
    (F.relu(pre.gather(1, idx)) ** 2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_hands_over_weight_dtype():
    """Under autocast the matmul may run in bf16; values and gradients come back in the weights' dtype."""
    x_c = torch.randn(8, 6)
    w = torch.randn(16, 6, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    W_dec = torch.randn(16, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val, idx, code, sel = topk_encode(x_c, torch.zeros(6), w, b, 3, torch.tensor([1, 5, 7]), 2)
        x_hat = sparse_decode(idx, val, W_dec, torch.zeros(6), sel)
        e_hat = code @ W_dec.index_select(0, torch.tensor([1, 5, 7]))
    assert val.dtype == code.dtype == torch.float32
    (x_hat.float().pow(2).sum() + e_hat.float().pow(2).sum()).backward()
    for p in (w, b, W_dec):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def _topk_loss(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
               b_dec: torch.Tensor, k: int) -> torch.Tensor:
    val, idx, _, sel = topk_encode(x, b_dec, W_enc, b_enc, k)
    return squared_error(x, sparse_decode(idx, val, W_dec, b_dec, sel))[0]


def test_gradient_storage_is_reused_only_when_nothing_else_holds_it():
    """The weights' gradients land in storage kept from the previous step once .grad was set to
    None; accumulating into a live .grad, or a caller still holding the old gradient, gets a
    fresh array, and every gradient equals a fresh computation's."""
    g = torch.Generator().manual_seed(7)
    W_enc = torch.randn(96, 24, generator=g).requires_grad_(True)
    W_dec = torch.randn(96, 24, generator=g).requires_grad_(True)
    b_enc, b_dec = torch.zeros(96, requires_grad=True), torch.zeros(24, requires_grad=True)
    xs = [torch.randn(40, 24, generator=g) for _ in range(3)]

    def grads_of(x):  # a reference without the buffers: separate leaves, same values
        leaves = [t.detach().clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
        _topk_loss(x, leaves[0], leaves[1], leaves[2], leaves[3], 5).backward()
        return leaves[0].grad, leaves[2].grad

    _topk_loss(xs[0], W_enc, b_enc, W_dec, b_dec, 5).backward()
    ptrs = W_enc.grad.data_ptr(), W_dec.grad.data_ptr()
    W_enc.grad = W_dec.grad = None
    _topk_loss(xs[1], W_enc, b_enc, W_dec, b_dec, 5).backward()
    assert (W_enc.grad.data_ptr(), W_dec.grad.data_ptr()) == ptrs  # reused
    ref_enc, ref_dec = grads_of(xs[1])
    assert torch.equal(W_enc.grad, ref_enc) and torch.equal(W_dec.grad, ref_dec)

    # Accumulation: .grad still set, so the new gradient must not overwrite it.
    _topk_loss(xs[2], W_enc, b_enc, W_dec, b_dec, 5).backward()
    ref2_enc, ref2_dec = grads_of(xs[2])
    torch.testing.assert_close(W_enc.grad, ref_enc + ref2_enc, rtol=0, atol=1e-5)
    torch.testing.assert_close(W_dec.grad, ref_dec + ref2_dec, rtol=0, atol=1e-5)

    # A caller keeps the old gradient across zero_grad: it must stay as it was.
    kept_enc, kept_dec = W_enc.grad, W_dec.grad
    before = kept_enc.clone(), kept_dec.clone()
    W_enc.grad = W_dec.grad = None
    _topk_loss(xs[0], W_enc, b_enc, W_dec, b_dec, 5).backward()
    assert torch.equal(kept_enc, before[0]) and torch.equal(kept_dec, before[1])
    assert W_enc.grad.data_ptr() != kept_enc.data_ptr()


def test_a_training_loop_reuses_the_gradient_storage():
    """An SAE module under Adam with zero_grad(set_to_none=True), as the Trainer runs it: both
    weight gradients land in the same storage every step."""
    from trainer.config import SAEConfig
    from trainer.saes import build_sae
    from trainer.saes.base import StepContext

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="topk", d_in=32, d_sae=128, k=8))
    opt = torch.optim.Adam(sae.parameters())
    x = torch.randn(64, 32)
    seen = set()
    for step in range(3):
        sae(x, StepContext(step=step, k=8)).loss.backward()
        seen.add((sae.W_enc.grad.data_ptr(), sae.W_dec.grad.data_ptr()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(seen) == 1
