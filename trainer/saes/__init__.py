"""SAE architectures; ``ARCHS`` is the one list the CLI's ``--arch`` choices come from."""

from __future__ import annotations

import torch

from actcache.errors import ActcacheError
from trainer.config import SAEConfig
from trainer.saes.base import SAE, SAEOutput, StepContext
from trainer.saes.baseline import BaselineSAE
from trainer.saes.dyncorr import DynCorrSAE
from trainer.saes.jumprelu import JumpReLUSAE
from trainer.saes.topk import TopKSAE

ARCHS: dict[str, type[SAE]] = {cls.arch: cls for cls in (BaselineSAE, TopKSAE, DynCorrSAE, JumpReLUSAE)}


def build_sae(cfg: SAEConfig, *, seed: int = 0) -> SAE:
    if cfg.arch not in ARCHS:
        raise ActcacheError(f"unknown arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    cfg.validate()
    return ARCHS[cfg.arch](cfg, generator=torch.Generator().manual_seed(seed))


__all__ = ["ARCHS", "SAE", "SAEOutput", "StepContext", "build_sae"]
