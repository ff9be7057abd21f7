"""JumpReLU SAE, inference only: SAEs trained elsewhere (Gemma Scope, SAELens) brought in with
``sae import``. ``z = ReLU(pre) * (pre > threshold)`` per latent, SAELens's semantics: a latent is
zero unless its pre-activation is strictly above its threshold, and then it keeps its full value
(the "jump"); the ReLU also zeroes negative pre-activations when a threshold is negative."""

from __future__ import annotations

import torch

from actcache.errors import ActcacheError
from trainer.config import SAEConfig
from trainer.saes.base import SAE, SAEOutput, StepContext


class JumpReLUSAE(SAE):
    arch = "jumprelu"
    trainable = False  # resolve_config refuses it for sae train before anything is written

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> SAEOutput:
        raise ActcacheError("the jumprelu arch is for SAEs imported with sae import, not for training: "
                            "train --arch baseline, topk or dyncorr")
