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
from safetensors import safe_open

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.config import RunConfig, SAEConfig
from trainer.saes import SAE, build_sae


@dataclass(frozen=True)
class TrainedRun:
    paths: A.RunPaths
    cfg: RunConfig  # config.json as trained (store, hook, heldout_chunks, ...)
    sae: SAE  # raw-activation space, eval mode, no grads
    k: int | None  # active latents per token at the end of training; None for ReLU SAEs
    scaling_factor: float  # the training-time input scale, already folded into the weights
    saelens_cfg: dict[str, Any]


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["config"])
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except (OSError, KeyError, ValueError) as e:
        raise ActcacheError(f"cannot read SAE weights {path} ({e}): retrain the run or pass another run dir") from None


def sae_from_weights(sae_cfg: SAEConfig, weights: dict[str, torch.Tensor], k: int | None) -> SAE:
    """An SAE holding SAELens-layout ``weights`` (``W_enc`` is ``[d_in, d_sae]``).

    dyncorr encodes exactly as TopK at its final k; building it as TopK skips the
    ``d_sae x d_sae`` statistics buffers that only training needs."""
    cfg = sae_cfg if sae_cfg.arch == "baseline" else replace(sae_cfg, arch="topk", k=int(k or sae_cfg.k))
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"].t())
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_enc.copy_(weights["b_enc"])
        sae.b_dec.copy_(weights["b_dec"])
    sae.eval()
    sae.requires_grad_(False)
    return sae


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> TrainedRun:
    """The config and final weights of a run; one-line errors for anything missing."""
    paths = A.existing_run(run_dir)
    if not paths.weights.exists():
        raise ActcacheError(f"{paths.root} has no {A.WEIGHTS}: train it to the end first (sae train ... --resume)")
    try:
        cfg = RunConfig.from_flat(json.loads(paths.config.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ActcacheError(f"cannot read {paths.config} ({e}): the run directory is damaged") from None
    weights, meta = _read_weights(paths.weights)
    saelens_cfg = meta.get("saelens_cfg", {})
    sae_cfg = SAEConfig(**meta["sae"]) if "sae" in meta else cfg.sae
    k = None if sae_cfg.arch == "baseline" else int(saelens_cfg.get("k") or sae_cfg.k)
    sae = sae_from_weights(sae_cfg, weights, k).to(device)
    scaling = float(saelens_cfg.get("metadata", {}).get("scaling_factor_folded", 1.0))
    return TrainedRun(paths=paths, cfg=cfg, sae=sae, k=k, scaling_factor=scaling, saelens_cfg=saelens_cfg)
