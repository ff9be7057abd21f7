"""The encoder's dense product ``x @ W.T + b`` on the fastest float32 kernel the device has.

On CPU, torch's ``addmm`` calls MKL's sgemm, and it broadcasts the bias into the output
before the product (a full extra pass over the ``(B, d_sae)`` result). oneDNN, which torch
ships as well, runs the same IEEE float32 product with the bias fused into the kernel, and
on this project's AMD EPYC (Zen 4) machine it is the faster of the two at SAE shapes
(``benchmarks/bench_vs_saelens.py`` times both side by side: ``docs/benchmarks.md``).
Both are float32 products with float32 accumulation; only the summation order differs,
so results agree with a float64 reference to the same order (tests/test_linear.py).

It is used where no autograd graph goes through the product: the TopK encoder's forward
(its backward is sparse and written by hand) and the AuxK decoder's backward
(``sparse_ops.aux_decode``), where MKL is slowest: its ``(B, d_in) @ (n_dead, d_in).T``. Anything else
(another dtype, autocast, a GPU, a torch without the op) takes ``torch.addmm``.
"""

from __future__ import annotations

import torch

_onednn_ok: bool | None = None  # None: not tried yet; False after the op failed once


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` (B, d_in), ``weight`` (d_out, d_in), ``bias`` (d_out,) or None.
    A product that autograd would have to differentiate takes ``addmm`` (oneDNN's op has no
    backward); callers on the fast path are autograd Functions and ``no_grad`` code."""
    global _onednn_ok
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (_onednn_ok is not False and x.device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and x.dim() == 2
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        if _onednn_ok is None:
            _onednn_ok = _onednn_available()
        if _onednn_ok:
            try:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(),
                                                          None if bias is None else bias.contiguous(), "none", [], "")
            except RuntimeError:
                # A torch build whose oneDNN rejects the call: the portable kernel from now on.
                _onednn_ok = False
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether :func:`linear` takes oneDNN for a float32 input on ``x``'s device (for benchmark labels)."""
    return x.device.type == "cpu" and _onednn_ok is not False and _onednn_available()
