"""TopK encoder and sparse decoder whose backward passes touch only the k active latents.

A TopK SAE's forward needs one dense matmul (all pre-activations, to pick the top k). Plain
autograd then also makes the backward dense: ``B x d_sae`` gradients and two more
``B x d_sae x d_in`` matmuls, although only ``B x k`` entries are non-zero. Here the
encoder's weight gradient is a CSR-times-dense product (``O(B k d_in)``; the CSR pattern is
built once in the forward, so no ``coalesce`` sort in the backward) and the decoder is an
``embedding_bag`` (a weighted sum of k decoder rows per token), as sparsify does with a fused
kernel. AuxK differs: ``k_aux`` (~d_in / 2) is a large fraction of the dead latents, so their
pre-activations travel as a dense ``(B, n_dead)`` block and are decoded with a dense slice of
``W_dec`` (BLAS matmuls instead of gathering k_aux rows per token). All exact: tests compare
against dense autograd in float64.

Mixed precision: under ``torch.autocast`` the big matmul runs in the autocast dtype (bf16 on
CUDA); values, pre-activations and gradients are handed over in the weights' dtype, so the
sparse kernels (which need matching dtypes) and the optimiser see one dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

# CSR matmul is what the encoder backward needs; its "beta" notice would fire in every run.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_c, weight, bias, k: int, dead_idx: torch.Tensor | None):
        pre = torch.addmm(bias, x_c, weight.t())  # autocast applies here (bf16 on CUDA)
        val, idx = torch.topk(pre, k, dim=-1, sorted=False)
        val = F.relu(val).to(weight.dtype)
        if dead_idx is not None and dead_idx.numel():
            pre_dead = pre.index_select(1, dead_idx).to(weight.dtype)
        else:
            dead_idx = None
            pre_dead = val.new_zeros(val.shape[0], 0)
        # CSR layout of the (d_sae x B) selection matrix: the pattern carries no gradient, so it is
        # built here once; the backward only gathers the gradient values into it.
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=weight.shape[0]), 0, out=crow[1:])
        ctx.k = k
        ctx.save_for_backward(x_c, weight, idx, val, order, crow, dead_idx)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an unused output (no AuxK term) costs no dense matmul
        return val, idx, pre_dead

    @staticmethod
    def backward(ctx, grad_val, grad_idx, grad_pre_dead):
        x_c, weight, idx, val, order, crow, dead_idx = ctx.saved_tensors
        dt = weight.dtype
        # ReLU: no gradient where the selected pre-activation was <= 0.
        g = torch.zeros_like(val) if grad_val is None else grad_val.to(dt)
        g = torch.where(val > 0, g, torch.zeros((), dtype=dt, device=val.device))
        g_dead = None
        if dead_idx is not None and grad_pre_dead is not None:
            g_dead = grad_pre_dead.to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
            if g_dead is not None:
                grad_x = grad_x.addmm_(g_dead, weight.index_select(0, dead_idx))
            grad_x = grad_x.to(x_c.dtype)
        if ctx.needs_input_grad[1]:
            cols = torch.div(order, ctx.k, rounding_mode="floor")  # the batch row of each entry
            csr = torch.sparse_csr_tensor(crow, cols, g.reshape(-1).index_select(0, order),
                                          (weight.shape[0], x_c.shape[0]), check_invariants=False)
            grad_w = torch.sparse.mm(csr, x_c.to(dt))
            if g_dead is not None:
                grad_w.index_add_(0, dead_idx, g_dead.t() @ x_c.to(dt))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=dt, device=g.device).index_add_(
                0, idx.reshape(-1), g.reshape(-1))
            if g_dead is not None:
                grad_b.index_add_(0, dead_idx, g_dead.sum(0))
        return grad_x, grad_w, grad_b, None, None


def topk_encode(x_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                dead_idx: torch.Tensor | None = None):
    """``val, idx`` of ``TopK_k(ReLU(x_c @ weight.T + bias))``, plus ``pre_dead``: the dense
    ``(B, n_dead)`` pre-activations of the latents ``dead_idx`` (``(B, 0)`` when None or empty),
    for AuxK. Gradients flow to ``x_c``, ``weight`` and ``bias`` through ``val`` and ``pre_dead``;
    through ``val`` they touch only the selected latents."""
    return _TopKEncode.apply(x_c, weight, bias, k, dead_idx)


def aux_topk(pre_dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Dense ``(B, n_dead)`` AuxK code: ``ReLU`` of each row's top ``k_aux`` entries, 0 elsewhere."""
    pos = torch.topk(pre_dead.detach(), min(k_aux, pre_dead.shape[1]), dim=-1, sorted=False).indices
    return torch.zeros_like(pre_dead).scatter(1, pos, F.relu(pre_dead.gather(1, pos)))


def sparse_decode(idx: torch.Tensor, val: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_p val[b, p] * W_dec[idx[b, p]] + b_dec`` without forming the dense z."""
    # embedding_bag needs val in W_dec's dtype (under autocast val may arrive in bf16).
    return F.embedding_bag(idx, W_dec, per_sample_weights=val.to(W_dec.dtype), mode="sum") + b_dec


def densify(idx: torch.Tensor, val: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Dense (B, d_sae) z, for metrics and tests."""
    return torch.zeros(idx.shape[0], d_sae, dtype=val.dtype, device=val.device).scatter_(1, idx, val)
