"""TopK encoder and sparse decoder whose backward passes touch only the k active latents.

A TopK SAE's forward needs one dense matmul (all pre-activations, to pick the top k). Plain
autograd then also makes the backward dense: ``B x d_sae`` gradients and two more
``B x d_sae x d_in`` matmuls, although only ``B x k`` entries are non-zero. Here the
encoder's weight gradient is a sparse-times-dense product (``O(B k d_in)``) and the decoder is
an ``embedding_bag`` (a weighted sum of k decoder rows per token), as sparsify does with a
fused kernel. Both are exact: tests compare against dense autograd in float64.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _sparse_rows(idx: torch.Tensor, val: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The (n_cols x B) sparse matrix with val[b, p] at (idx[b, p], b)."""
    b, k = idx.shape
    rows = torch.arange(b, device=idx.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), val.reshape(-1), (n_cols, b),
                                   check_invariants=False)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_c, weight, bias, k: int, dead: torch.Tensor | None, k_aux: int):
        pre = torch.addmm(bias, x_c, weight.t())
        val, idx = torch.topk(pre, k, dim=-1, sorted=False)
        val = F.relu(val)
        n_dead = int(dead.sum()) if dead is not None else 0
        if n_dead and k_aux > 0:
            # AuxK: the dead latents' largest pre-activations, picked from the same matmul.
            masked = pre.masked_fill_(~dead, float("-inf"))
            aux_val, aux_idx = torch.topk(masked, min(k_aux, n_dead), dim=-1, sorted=False)
            aux_val = F.relu(aux_val)
        else:
            aux_val = val.new_zeros(val.shape[0], 0)
            aux_idx = idx.new_zeros(idx.shape[0], 0)
        ctx.k = k
        ctx.save_for_backward(x_c, weight, torch.cat([idx, aux_idx], 1), torch.cat([val, aux_val], 1))
        ctx.mark_non_differentiable(idx, aux_idx)
        return val, idx, aux_val, aux_idx

    @staticmethod
    def backward(ctx, grad_val, grad_idx, grad_aux_val, grad_aux_idx):
        x_c, weight, idx, val = ctx.saved_tensors
        g = torch.cat([grad_val, grad_aux_val], 1) if grad_aux_val.shape[1] else grad_val
        # ReLU: no gradient where the selected pre-activation was <= 0.
        g = torch.where(val > 0, g, torch.zeros_like(g))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(_sparse_rows(idx, g, weight.shape[0]).coalesce(), x_c)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device).index_add_(
                0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


def topk_encode(x_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                dead: torch.Tensor | None = None, k_aux: int = 0):
    """``val, idx`` of ``TopK_k(ReLU(x_c @ weight.T + bias))``, plus ``aux_val, aux_idx``: the
    top ``k_aux`` among the ``dead`` latents (empty when none are dead). Gradients flow to
    ``x_c``, ``weight`` and ``bias`` through both value tensors, touching only selected latents."""
    return _TopKEncode.apply(x_c, weight, bias, k, dead, k_aux)


def sparse_decode(idx: torch.Tensor, val: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_p val[b, p] * W_dec[idx[b, p]] + b_dec`` without forming the dense z."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum") + b_dec


def densify(idx: torch.Tensor, val: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Dense (B, d_sae) z, for metrics and tests."""
    return torch.zeros(idx.shape[0], d_sae, dtype=val.dtype, device=val.device).scatter_(1, idx, val)
