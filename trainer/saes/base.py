"""The interface every SAE architecture implements, and what they share.

Shapes: ``W_enc`` is ``(d_sae, d_in)`` (encoder rows, as ``nn.Linear`` and sparsify store
it, so the sparse backward reads contiguous rows), ``W_dec`` is ``(d_sae, d_in)``, ``b_enc``
``(d_sae,)``, ``b_dec`` ``(d_in,)``. The SAELens export transposes ``W_enc`` to
``[d_in, d_sae]``. ``x_hat = z @ W_dec + b_dec``; decoder rows (the "columns" of the maths,
one per latent) are kept at unit norm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.config import SAEConfig
from trainer.distributed import LOCAL, Collective


@dataclass(frozen=True)
class StepContext:
    """What the schedules say for this step."""

    step: int = 0
    k: int = 0
    sparsity_coef: float = 0.0
    lam: float = 0.0


@dataclass
class SAEOutput:
    x_hat: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # loss components, detached, for logging
    fired: torch.Tensor  # (d_sae,) bool: latents active on this batch
    l0: torch.Tensor  # mean active latents per token
    extras: dict[str, Any] = field(default_factory=dict)  # tensors, and dyncorr's PairMoments


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm; robust to the heavy-norm outliers residual streams have."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / torch.clamp(torch.linalg.vector_norm(x - y, dim=1), min=1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if torch.linalg.vector_norm(y_new - y) <= tol * torch.linalg.vector_norm(y):
            return y_new
        y = y_new
    return y


class SAE(nn.Module, ABC):
    arch: ClassVar[str]
    # Data parallel: batch statistics are reduced over the ranks through this (the identity in one
    # process; the Trainer sets it; trainer/distributed.py, docs/sae-math.md "Data-parallel statistics").
    dp: Collective = LOCAL

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        W_dec /= torch.linalg.vector_norm(W_dec, dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # W_enc initialised as W_dec^T
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        # Tokens since each latent last fired (float64: exact up to 2^53 tokens, and checkpointable).
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.float64))

    # -- the interface ---------------------------------------------------------------
    @abstractmethod
    def forward(self, x: torch.Tensor, ctx: StepContext) -> SAEOutput:
        """Reconstruction, loss and its terms for a training batch."""

    @abstractmethod
    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense latents z (B, d_sae), for evaluation."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def after_step(self, out: SAEOutput) -> None:
        """State updates once the optimiser has stepped (dead-latent counts, running stats)."""
        self.tokens_since_fired += out.x_hat.shape[0] * self.dp.world_size  # global rows and firing
        self.tokens_since_fired[self.dp.any_rows(out.fired)] = 0

    # -- shared mechanics ----------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc.t() + self.b_enc

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        x = x[torch.isfinite(x).all(dim=1)]  # a bad row must not poison b_dec for the whole run
        if len(x) == 0:
            return
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(x.mean(0))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x.double()).to(self.b_dec.dtype))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Drop the gradient component along each unit decoder row (it would only change its norm)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        # vecdot + in-place addcmul: no (d_sae, d_in) temporaries. On CPU, blocks of rows that stay
        # in cache make it one pass over memory instead of two (3-4x faster at d_sae 16k);
        # on a GPU one launch over everything is best.
        W = self.W_dec.detach()
        rows = 128 if grad.device.type == "cpu" else grad.shape[0]
        for g, w in zip(grad.split(rows), W.split(rows)):
            g.addcmul_(torch.linalg.vecdot(g, w, dim=1).unsqueeze(1), w, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp(min=1e-12)

    @staticmethod
    def fired_mask(idx: torch.Tensor, val: torch.Tensor, d_sae: int) -> torch.Tensor:
        # A count per latent of its positive entries: one pass, no boolean-mask gather.
        hits = (val > 0).reshape(-1).to(torch.float32)
        return torch.bincount(idx.reshape(-1), weights=hits, minlength=d_sae)[:d_sae] > 0
