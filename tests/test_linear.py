"""The encoder's dense product (trainer/saes/linear.py): float32 accuracy on either kernel."""

import pytest
import torch

from trainer.saes import linear as L


def _operands(seed: int = 0, B: int = 64, d_in: int = 96, d_out: int = 300):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d_in, generator=g) * 3, torch.randn(d_out, d_in, generator=g) / d_in**0.5,
            torch.randn(d_out, generator=g))


@pytest.mark.parametrize("onednn", [None, False], ids=["default-kernel", "addmm"])
def test_matches_float64_reference(monkeypatch, onednn):
    monkeypatch.setattr(L, "_onednn_ok", onednn)
    x, w, b = _operands()
    got = L.linear(x, w, b)
    ref = torch.addmm(b.double(), x.double(), w.double().t())
    assert got.dtype == torch.float32 and got.shape == (64, 300) and torch.isfinite(got).all()
    # float32 with float32 accumulation over 96 terms: a few ulps of the row's scale.
    scale = (x.double().abs() @ w.double().abs().t()).amax()
    assert (got.double() - ref).abs().max() <= 64 * 2.0**-24 * scale


@pytest.mark.skipif(not L._onednn_available(), reason="this torch has no oneDNN linear")
def test_cpu_float32_takes_onednn_and_agrees_with_addmm(monkeypatch):
    monkeypatch.setattr(L, "_onednn_ok", None)
    x, w, b = _operands(1)
    got = L.linear(x, w, b)
    assert L._onednn_ok is True and L.uses_onednn(x)
    assert torch.allclose(got, torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_take_addmm(monkeypatch):
    """A product autograd must differentiate, and float64, go to addmm (exact to addmm)."""
    monkeypatch.setattr(L, "_onednn_ok", None)
    x, w, b = _operands(2)
    w = w.requires_grad_(True)
    y = L.linear(x, w, b)
    y.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand_as(w), rtol=1e-5, atol=1e-4)
    xd, wd, bd = x.double(), w.detach().double(), b.double()
    assert torch.equal(L.linear(xd, wd, bd), torch.addmm(bd, xd, wd.t()))


def test_a_failing_onednn_call_falls_back_for_good(monkeypatch):
    monkeypatch.setattr(L, "_onednn_ok", True)

    class _Broken:
        @staticmethod
        def _linear_pointwise(*a):
            raise RuntimeError("no primitive for this layout")

    monkeypatch.setattr(L.torch.ops, "mkldnn", _Broken, raising=False)
    x, w, b = _operands(3)
    assert torch.equal(L.linear(x, w, b), torch.addmm(b, x, w.t()))
    assert L._onednn_ok is False

