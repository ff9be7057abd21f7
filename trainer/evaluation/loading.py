"""A finished run directory, loaded for evaluation.

``sae.safetensors`` holds the weights with the loader's input scaling folded in
(:mod:`trainer.export`): they read *raw* activations and reconstruct in raw units, with the
same latents as during training. So evaluation never normalises; applying and undoing the
scale is already in the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.config import RunConfig, SAEConfig
from trainer.export import read_weights
from trainer.saes import SAE, build_sae


@dataclass(frozen=True)
class TrainedRun:
    paths: A.RunPaths
    cfg: RunConfig  # config.json as trained (store, hook, heldout_chunks, ...)
    sae: SAE  # raw-activation space, eval mode, no grads
    k: int | None  # active latents per token at the end of training; None for ReLU SAEs
    scaling_factor: float  # the training-time input scale, already folded into the weights
    saelens_cfg: dict[str, Any]


def sae_from_weights(sae_cfg: SAEConfig, weights: dict[str, torch.Tensor], k: int | None) -> SAE:
    """An SAE holding SAELens-layout ``weights`` (``W_enc`` is ``[d_in, d_sae]``).

    dyncorr encodes exactly as TopK at its final k; building it as TopK skips the
    ``d_sae x d_sae`` statistics buffers that only training needs."""
    cfg = sae_cfg if sae_cfg.arch in ("baseline", "jumprelu") else replace(sae_cfg, arch="topk", k=int(k or sae_cfg.k))
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"].t())
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_enc.copy_(weights["b_enc"])
        sae.b_dec.copy_(weights["b_dec"])
        if "threshold" in weights:  # jumprelu (sae import)
            sae.threshold.copy_(weights["threshold"])
    sae.eval()
    sae.requires_grad_(False)
    return sae


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> TrainedRun:
    """The config and final weights of a run; one-line errors for anything missing."""
    paths = A.existing_run(run_dir)
    if not paths.weights.exists():
        raise ActcacheError(f"{paths.root} has no {A.WEIGHTS}: train it to the end first (sae train ... --resume)")
    try:
        flat = json.loads(paths.config.read_text())
        if not isinstance(flat, dict):
            raise ValueError("not a JSON object")
        cfg = RunConfig.from_flat(flat)
    except (OSError, ValueError, TypeError) as e:
        raise ActcacheError(f"cannot read {paths.config} ({e}): the run directory is damaged") from None
    weights, meta = read_weights(paths.weights)
    saelens_cfg = meta.get("saelens_cfg", {})
    try:
        sae_cfg = SAEConfig(**meta["sae"]) if "sae" in meta else cfg.sae
        k = None if sae_cfg.arch in ("baseline", "jumprelu") else int(saelens_cfg.get("k") or sae_cfg.k)
        sae = sae_from_weights(sae_cfg, weights, k).to(device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ActcacheError(f"SAE weights {paths.weights} do not match their config ({why}): "
                            "retrain the run (sae train ... --overwrite)") from None
    scaling = float(saelens_cfg.get("metadata", {}).get("scaling_factor_folded", 1.0))
    return TrainedRun(paths=paths, cfg=cfg, sae=sae, k=k, scaling_factor=scaling, saelens_cfg=saelens_cfg)
