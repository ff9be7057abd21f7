"""Trained weights in raw-activation space, and the SAELens on-disk format.

Training may scale inputs by ``s`` (``x' = s x``, loader normalisation). Folding it back:
``pre = (s x - b_dec') W_enc'^T + b_enc = (x - b_dec'/s)(s W_enc')^T + b_enc`` and
``x_hat = (z W_dec' + b_dec') / s``, so ``W_enc = s W_enc'``, ``W_dec = W_dec'/s``,
``b_dec = b_dec'/s``, ``b_enc`` unchanged: the same latents z for raw inputs, the
reconstruction in raw units. Exported weights use SAELens' layout: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text, save_tensors_atomic
from trainer.saes.base import SAE


def folded_weights(sae: SAE, scaling_factor: float) -> dict[str, torch.Tensor]:
    s = float(scaling_factor)
    return {"W_enc": (sae.W_enc.detach() * s).t().contiguous(), "W_dec": sae.W_dec.detach() / s,
            "b_enc": sae.b_enc.detach().clone(), "b_dec": sae.b_dec.detach() / s}


def saelens_cfg(sae: SAE, *, final_k: int | None, metadata: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": True, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": metadata}
    if sae.cfg.arch == "baseline":
        cfg["architecture"] = "standard"
    else:
        cfg.update(architecture="topk", k=int(final_k or sae.cfg.k), rescale_acts_by_decoder_norm=False)
    return cfg


def write_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_tensors_atomic(weights, path, metadata={"format": "actcache-sae", "config": json.dumps(meta)})


def export_saelens(weights_path: Path, out: Path) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` for ``sae_lens.SAE.load_from_disk``."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        meta = json.loads(f.metadata()["config"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(load_file(weights_path), out / A.SAELENS_WEIGHTS)
    atomic_write_text(out / A.SAELENS_CFG, json.dumps(meta["saelens_cfg"], indent=2))
    return out
