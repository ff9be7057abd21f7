"""TopK encoder and sparse decoder whose backward passes touch only the k active latents.

A TopK SAE's forward needs one dense matmul (all pre-activations, to pick the top k). Plain
autograd then also makes the backward dense: ``B x d_sae`` gradients and two more
``B x d_sae x d_in`` matmuls, although only ``B x k`` entries are non-zero. Here the
encoder's weight gradient is a CSR-times-dense product (``O(B k d_in)``; the CSR pattern is
built once in the forward, :class:`ByLatent`, so no ``coalesce`` sort in the backward) and the
decoder is an ``embedding_bag`` (a weighted sum of k decoder rows per token), as sparsify does
with a fused kernel; on CPU its backward reuses the by-latent pattern so each decoder row is
read once per step, not once per entry. On CPU the products run in numba
(:mod:`trainer.saes.latent_kernels`), elsewhere as ``sparse.mm``, ``sampled_addmm`` and
``embedding_bag``; the dense product is :func:`trainer.saes.linear.linear` and the selection
:func:`trainer.saes.select.topk`. AuxK differs: ``k_aux`` (~d_in / 2) is a large fraction of the dead latents, so their
code is selected from each block of pre-activations into a dense ``(B, n_dead)`` block
(:func:`trainer.saes.select.aux_code`) and decoded with a dense slice of ``W_dec`` (BLAS
matmuls instead of gathering k_aux rows per token). All exact: tests compare
against dense autograd in float64.

Mixed precision: under ``torch.autocast`` the big matmul runs in the autocast dtype (bf16 on
CUDA); values, pre-activations and gradients are handed over in the weights' dtype, so the
sparse kernels (which need matching dtypes) and the optimiser see one dtype.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from trainer.saes import latent_kernels
from trainer.saes.linear import linear
from trainer.saes.select import aux_code, topk

class GradBuffers:
    """Storage for the weights' gradients that the sparse backward writes whole, kept from one
    step to the next. The gradient goes out as a fresh view of it, which autograd's AccumulateGrad
    then takes as the parameter's ``.grad`` without a copy; ``zero_grad(set_to_none=True)`` drops
    that view and the storage waits here. A fresh (d_sae, d_in) array per step costs its page
    faults and the kernel's zeroing of every page, which on this project's VM (free pages handed
    back to the host) is most of the step's system time: 1.92 vs 1.85-1.88 s per step at d_sae
    16,384 (docs/benchmarks.md). The storage is reused only while nothing else holds it (the
    previous ``.grad`` still set, for accumulation, or kept by the caller), checked on its use
    count; otherwise, or where torch does not expose that count, a new array is allocated."""

    def __init__(self) -> None:
        # id(param) -> (a weak reference to it, its storage); an entry goes when its param does.
        # (Not a WeakKeyDictionary: its lookups compare tensors with ==, which is elementwise.)
        self._bufs: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def take(self, param: torch.Tensor) -> torch.Tensor | None:
        """A (contiguous, uninitialised) gradient for ``param``, None where none can be reused."""
        if param.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return None
        ref, buf = self._bufs.get(id(param), (None, None))
        if ref is None or ref() is not param or buf.shape != param.shape or buf.dtype != param.dtype:
            buf = torch.empty(param.shape, dtype=param.dtype)
            if ref is None or ref() is not param:
                weakref.finalize(param, self._bufs.pop, id(param), None)
            self._bufs[id(param)] = (weakref.ref(param), buf)
        elif torch._C._storage_Use_Count(buf.untyped_storage()._cdata) > 2:  # buf's and this call's own
            return None
        return buf.view(buf.shape)


GRAD_BUFFERS = GradBuffers()

# CSR matmul is what the encoder backward needs; its "beta" notice would fire in every run.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass(frozen=True)
class ByLatent:
    """A TopK selection ``idx`` (B, k) laid out as the CSR pattern of the (d_sae x B) matrix
    whose row ``j`` lists the batch rows where latent ``j`` was selected. The encoder's weight
    gradient and, on CPU, the decoder's backward are products with it. It carries no gradient,
    so the forward builds it once for every backward."""

    order: torch.Tensor  # (B k,) flat positions in idx, grouped by latent, ascending within a latent
    crow: torch.Tensor  # (d_sae + 1,) each latent's first entry in order
    cols: torch.Tensor  # (B k,) the batch row of each entry
    shape: tuple[int, int]  # (d_sae, B)

    @classmethod
    def build(cls, idx: torch.Tensor, d_sae: int) -> ByLatent:
        built = latent_kernels.by_latent(idx, d_sae)  # CPU: one counting sort
        return cls(*(built if built is not None else cls.arrays(idx, d_sae)), (d_sae, idx.shape[0]))

    @staticmethod
    def arrays(idx: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``order, crow, cols`` by torch ops on any device (a stable argsort, bincount, cumsum):
        what :func:`~trainer.saes.latent_kernels.by_latent` gives on CPU in one counting sort."""
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=crow[1:])
        return order, crow, torch.div(order, idx.shape[1], rounding_mode="floor")

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The pattern with ``values`` (B, k), each at its entry's place."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values.reshape(-1).index_select(0, self.order),
                                       self.shape, check_invariants=False)

    def sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a @ b.T)[idx[r, p], r]`` for every entry, as (B, k): one dot product per entry
        (``sampled_addmm``), read latent by latent so each row of ``a`` is read once."""
        pattern = torch.sparse_csr_tensor(self.crow, self.cols, a.new_zeros(self.order.numel()), self.shape,
                                          check_invariants=False)
        got = torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
        return torch.empty_like(got).index_copy_(0, self.order, got).view(self.shape[1], -1)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, k: int, dead_idx: torch.Tensor | None, k_aux: int, box: list):
        x_c = x - b_dec
        if dead_idx is not None and (not dead_idx.numel() or k_aux < 1):
            dead_idx = None
        B = x_c.shape[0]
        rows = encode_block_rows(B, weight.shape[0], x_c.device)
        if rows >= B:
            val, idx, code = _encode_rows(x_c, weight, bias, k, dead_idx, k_aux)
        else:
            # Row blocks: each block's pre-activations (~16 MiB) are selected while still in cache,
            # and the (B, d_sae) block is never allocated (at d_sae 16k, batch 4096: 2.03 vs 2.08 s
            # per step; docs/benchmarks.md, bench_kernels.py's "encoder forward").
            code = None if dead_idx is None else torch.empty(B, dead_idx.numel(), dtype=weight.dtype, device=x_c.device)
            parts = [_encode_rows(x_c[r0:r0 + rows], weight, bias, k, dead_idx, k_aux,
                                  None if code is None else code[r0:r0 + rows]) for r0 in range(0, B, rows)]
            val, idx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            del parts
        if dead_idx is None:
            code = val.new_zeros(B, 0)
        sel = ByLatent.build(idx, weight.shape[0])
        box.append(sel)
        ctx.save_for_backward(x_c, weight, idx, val, sel.order, sel.crow, sel.cols, dead_idx, code)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an unused output (no AuxK term) costs no dense matmul
        return val, idx, code

    @staticmethod
    def backward(ctx, grad_val, grad_idx, grad_code):
        x_c, weight, idx, val, order, crow, cols, dead_idx, code = ctx.saved_tensors
        dt = weight.dtype
        # ReLU: no gradient where the selected pre-activation was <= 0.
        g = torch.zeros_like(val) if grad_val is None else grad_val.to(dt)
        g = torch.where(val > 0, g, torch.zeros((), dtype=dt, device=val.device))
        g_dead = None
        if dead_idx is not None and grad_code is not None:
            # The code is ReLU(pre) where selected, else 0: its gradient reaches pre where it is > 0.
            # Masked in place (the code's gradient has no other reader): a (B, n_dead) copy would
            # be the step's largest temporary with every latent dead; torch.where is also ~9x slower
            # than the kernel (docs/benchmarks.md, wh2.py).
            g_dead = latent_kernels.mask_to_positive_(grad_code.to(dt), code)
        need_x, need_b_dec, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_b_dec = grad_w = grad_b = None
        if need_x:
            grad_x = F.embedding_bag(idx, weight, per_sample_weights=g, mode="sum")
            if g_dead is not None:
                grad_x = grad_x.addmm_(g_dead, weight.index_select(0, dead_idx))
            grad_x = grad_x.to(x_c.dtype)
        if need_w:
            x_w = x_c.to(dt)
            if latent_kernels.supported(g, x_w):
                grad_w = latent_kernels.weight_grad(crow, cols, order, g, x_w, GRAD_BUFFERS.take(weight))
            else:
                sel = ByLatent(order, crow, cols, (weight.shape[0], x_c.shape[0]))
                grad_w = torch.sparse.mm(sel.csr(g), x_w)
            if g_dead is not None:
                grad_w.index_add_(0, dead_idx, g_dead.t() @ x_w)
        if need_b or need_b_dec:
            grad_b = torch.zeros(weight.shape[0], dtype=dt, device=g.device).index_add_(
                0, idx.reshape(-1), g.reshape(-1))
            if g_dead is not None:
                grad_b.index_add_(0, dead_idx, g_dead.sum(0))
        if need_b_dec:
            # x_c = x - b_dec: b_dec's gradient is minus the sum over rows of x_c's, which is
            # grad_b @ W; one (d_sae) x (d_sae, d_in) product instead of the (B, d_in) gradient.
            grad_b_dec = (-grad_x.sum(0) if grad_x is not None else -(grad_b @ weight)).to(x_c.dtype)
        return grad_x, grad_b_dec, grad_w, grad_b if need_b else None, None, None, None, None


ENCODE_BLOCK_BYTES = 16 * 2**20  # pre-activations per row block on CPU: about half the L3 of one CCX
ENCODE_MIN_ROWS = 64  # fewer rows per product and the GEMM itself slows down


def encode_block_rows(B: int, d_sae: int, device: torch.device) -> int:
    """Rows per block of the encoder's forward: on CPU ~:data:`ENCODE_BLOCK_BYTES` of float32
    pre-activations (at least :data:`ENCODE_MIN_ROWS`); elsewhere the whole batch in one product."""
    if device.type != "cpu":
        return B
    return max(ENCODE_MIN_ROWS, ENCODE_BLOCK_BYTES // (4 * d_sae))


def _encode_rows(x_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                 dead_idx: torch.Tensor | None, k_aux: int, code_out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``val`` (ReLU'd), ``idx`` of the top k, and AuxK's code over ``dead_idx`` (into ``code_out``
    when given), for rows ``x_c``."""
    pre = linear(x_c, weight, bias)  # oneDNN on CPU; addmm elsewhere, where autocast applies (bf16 on CUDA)
    val, idx = topk(pre, k)
    # AuxK's selection while the block is in cache (CPU): no (B, n_dead) pre-activations kept.
    code = None if dead_idx is None else aux_code(pre, dead_idx, k_aux, weight.dtype, out=code_out)
    return F.relu(val).to(weight.dtype), idx, code


def topk_encode(x: torch.Tensor, b_dec: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                dead_idx: torch.Tensor | None = None, k_aux: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ByLatent]:
    """``val, idx`` of ``TopK_k(ReLU((x - b_dec) @ weight.T + bias))``; ``code``, AuxK's dense
    ``(B, n_dead)`` code over the latents ``dead_idx``: ReLU of each row's ``k_aux`` largest of
    their pre-activations, 0 elsewhere (``(B, 0)`` when None, empty or ``k_aux`` < 1); and the
    selection :class:`ByLatent`. Gradients flow to ``x``, ``b_dec``, ``weight`` and ``bias``
    through ``val`` and ``code``, touching only the selected (and positive) entries."""
    box: list[ByLatent] = []
    val, idx, code = _TopKEncode.apply(x, b_dec, weight, bias, k, dead_idx, k_aux, box)
    return val, idx, code, box[0]


class _AuxDecode(torch.autograd.Function):
    """``code @ W_dec[dead_idx]`` on CPU. The backward takes :func:`~trainer.saes.linear.linear`
    for the code's gradient ``grad @ rows.T`` (the product MKL runs slowest on CPU), and returns
    W_dec's gradient as a sparse tensor of its ``n_dead`` rows, which autograd adds into the
    decoder's dense gradient in place (``index_select``'s backward would fill a dense
    ``(d_sae, d_in)`` zeros and add it: ~40 ms a step at d_sae 16k, docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, code, W_dec, dead_idx):
        rows = W_dec.index_select(0, dead_idx)
        ctx.save_for_backward(code, rows, dead_idx)
        ctx.shape = W_dec.shape
        return code @ rows

    @staticmethod
    def backward(ctx, grad_out):
        code, rows, dead_idx = ctx.saved_tensors
        grad_code = linear(grad_out, rows) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse_coo_tensor(dead_idx.unsqueeze(0), code.t() @ grad_out, ctx.shape,
                                             is_coalesced=bool((dead_idx[1:] > dead_idx[:-1]).all()),
                                             check_invariants=False)  # rows of W_dec: in range by construction
        return grad_code, grad_w, None


def aux_decode(code: torch.Tensor, W_dec: torch.Tensor, dead_idx: torch.Tensor) -> torch.Tensor:
    """``code @ W_dec[dead_idx]`` for AuxK's dense ``(B, n_dead)`` code. On CPU without autocast
    through :class:`_AuxDecode`; elsewhere (a GPU, autocast's casts) plain autograd."""
    if code.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and code.dtype == W_dec.dtype:
        return _AuxDecode.apply(code, W_dec, dead_idx)
    return code @ W_dec.index_select(0, dead_idx)


class _SparseDecode(torch.autograd.Function):
    """``sum_p val[b, p] W_dec[idx[b, p]] + b_dec`` with a backward read latent by latent (CPU):
    both weight-side gradients are products with the :class:`ByLatent` pattern, so each decoder
    row is read once per step instead of once per entry (``embedding_bag``'s backward)."""

    @staticmethod
    def forward(ctx, val, W_dec, b_dec, idx, order, crow, cols):
        ctx.save_for_backward(val, W_dec, order, crow, cols)
        ctx.mark_non_differentiable(idx)
        if latent_kernels.supported(val, W_dec, b_dec) and idx.dtype == torch.int64:
            return latent_kernels.decode(idx, val, W_dec, b_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum") + b_dec

    @staticmethod
    def backward(ctx, grad_out):
        val, W_dec, order, crow, cols = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        if all(ctx.needs_input_grad[:2]) and latent_kernels.supported(val, W_dec, grad_out):
            grad_val, grad_w = latent_kernels.decoder_grads(crow, cols, order, val, W_dec, grad_out,
                                                            GRAD_BUFFERS.take(W_dec))
            return grad_val, grad_w, grad_b, None, None, None, None
        sel = ByLatent(order, crow, cols, (W_dec.shape[0], val.shape[0]))
        grad_val = sel.sample(W_dec, grad_out) if ctx.needs_input_grad[0] else None
        grad_w = torch.sparse.mm(sel.csr(val), grad_out) if ctx.needs_input_grad[1] else None
        return grad_val, grad_w, grad_b, None, None, None, None


def sparse_decode(idx: torch.Tensor, val: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                  sel: ByLatent | None = None) -> torch.Tensor:
    """``sum_p val[b, p] * W_dec[idx[b, p]] + b_dec`` without forming the dense z. With the
    selection's :class:`ByLatent` (from :func:`topk_encode`) the CPU backward reads latent by
    latent; on a GPU ``embedding_bag``'s own backward (atomic adds) is the fast one."""
    # embedding_bag needs val in W_dec's dtype (under autocast val may arrive in bf16).
    val = val.to(W_dec.dtype)
    if sel is not None and W_dec.device.type == "cpu":
        return _SparseDecode.apply(val, W_dec, b_dec, idx, sel.order, sel.crow, sel.cols)
    return F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum") + b_dec


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum ||x - x_hat||^2, x - x_hat)``, differentiable w.r.t. ``x_hat`` through the sum: one
    difference, one dot product, and a backward of one scaled copy (autograd's ``pow`` would make
    a squared temporary and three passes back)."""
    return _SquaredError.apply(x, x_hat)


class _SquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat):
        err = x - x_hat
        ctx.save_for_backward(err)
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)  # no (B, d_in) zeros for err's (absent) gradient
        flat = err.view(-1)
        return torch.dot(flat, flat), err

    @staticmethod
    def backward(ctx, grad_sum, _grad_err):
        (err,) = ctx.saved_tensors
        g = err * (-2.0 * grad_sum) if ctx.needs_input_grad[1] else None
        gx = err * (2.0 * grad_sum) if ctx.needs_input_grad[0] else None
        return gx, g


def densify(idx: torch.Tensor, val: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Dense (B, d_sae) z, for metrics and tests."""
    return torch.zeros(idx.shape[0], d_sae, dtype=val.dtype, device=val.device).scatter_(1, idx, val)
