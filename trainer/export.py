"""Trained weights in raw-activation space, and the SAELens on-disk format.

Training may scale inputs by ``s`` (``x' = s x``, loader normalisation). Folding it back:
``pre = (s x - b_dec') W_enc'^T + b_enc = (x - b_dec'/s)(s W_enc')^T + b_enc`` and
``x_hat = (z W_dec' + b_dec') / s``, so ``W_enc = s W_enc'``, ``W_dec = W_dec'/s``,
``b_dec = b_dec'/s``, ``b_enc`` unchanged: the same latents z for raw inputs, the
reconstruction in raw units. Exported weights use SAELens' layout: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``.

``cfg.json`` follows SAELens 6.x (``SAE.load_from_disk``): the inference config's fields at the
top level (architecture, d_in, d_sae, dtype, ..., ``k`` for TopK) and everything about where the
SAE applies under ``metadata``, which must carry ``sae_lens_version``: without it SAELens reads
the file as a pre-6.0 config and drops hook_name, model_name, context_size and dataset_path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text, new_temp_dir, save_tensors_atomic
from trainer.saes.base import SAE

SAELENS_VERSION = "6.54.12"  # the layout written (and checked by benchmarks/check_saelens_export.py)
# SAELens' own metadata keys; ours (store, arch, training_tokens, scaling_factor_folded) ride along.
SAELENS_METADATA_DEFAULTS: dict[str, Any] = {
    "sae_lens_version": SAELENS_VERSION,
    "sae_lens_training_version": None,  # trained by actcache-sae, not by SAELens (as SAELens' own converters say)
    "model_name": None, "hook_name": None, "hook_head_index": None, "context_size": None, "prepend_bos": True,
    "dataset_path": None, "model_from_pretrained_kwargs": {},
}


def folded_weights(sae: SAE, scaling_factor: float) -> dict[str, torch.Tensor]:
    s = float(scaling_factor)
    return {"W_enc": (sae.W_enc.detach() * s).t().contiguous(), "W_dec": sae.W_dec.detach() / s,
            "b_enc": sae.b_enc.detach().clone(), "b_dec": sae.b_dec.detach() / s}


def saelens_layout(cfg: dict[str, Any]) -> dict[str, Any]:
    """A cfg.json dict in the SAELens 6.x layout; also upgrades the cfg of runs trained before it
    (no ``metadata.sae_lens_version``), leaving every value they had."""
    top = {"dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", **cfg}
    top["metadata"] = {**SAELENS_METADATA_DEFAULTS, **cfg.get("metadata", {})}
    if not top["metadata"]["sae_lens_version"]:
        top["metadata"]["sae_lens_version"] = SAELENS_VERSION
    return top


def saelens_cfg(sae: SAE, *, final_k: int | None, metadata: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "metadata": metadata}
    if sae.cfg.arch == "baseline":
        cfg["architecture"] = "standard"
    else:
        cfg.update(architecture="topk", k=int(final_k or sae.cfg.k), rescale_acts_by_decoder_norm=False)
    return saelens_layout(cfg)


def write_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_tensors_atomic(weights, path, metadata={"format": "actcache-sae", "config": json.dumps(meta)})


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``sae.safetensors`` and its config metadata; one line naming the file when it
    is missing, truncated or not ours."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["config"])
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ActcacheError(f"cannot read SAE weights {path} ({why}): the file is damaged or not written by sae train; "
                            "retrain the run (sae train ... --overwrite)") from None


def check_export_dir(out: Path, overwrite: bool) -> None:
    """``out`` may receive an export: new, empty, or (with ``overwrite``) an earlier export. Writes nothing."""
    if not out.exists():
        parent = next((p for p in out.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise ActcacheError(f"--out {out}: {parent} is a file, not a directory: choose another --out")
        return
    if not out.is_dir():
        raise ActcacheError(f"--out {out} is a file: choose a directory path (it receives {A.SAELENS_CFG} and "
                            f"{A.SAELENS_WEIGHTS})")
    if not any(out.iterdir()):
        return
    if not (out / A.SAELENS_CFG).exists():
        raise ActcacheError(f"--out {out} exists and is not a SAELens export (no {A.SAELENS_CFG}): choose a new path")
    if not overwrite:
        raise ActcacheError(f"--out {out} already holds an export: pass --overwrite to replace it, or choose a new path")


def export_saelens(weights_path: Path, out: Path) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` for ``sae_lens.SAE.load_from_disk``.

    The export is built in a directory beside ``out`` and swapped in by renames, so a failure or a
    kill never leaves a mix of two exports: ``out`` holds the previous one or the new one (or, killed
    between the two renames, none, with the previous one whole in ``.NAME.old-*`` beside it)."""
    tensors, meta = read_weights(weights_path)
    if "saelens_cfg" not in meta:
        raise ActcacheError(f"{weights_path} holds no SAELens config: retrain the run (sae train ... --overwrite)")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(out.parent, f".{out.name}.tmp-")
    except OSError as e:
        raise ActcacheError(f"cannot write the export to {out} ({e.strerror}): choose a writable --out") from None
    try:
        save_tensors_atomic(tensors, tmp / A.SAELENS_WEIGHTS)
        atomic_write_text(tmp / A.SAELENS_CFG, json.dumps(saelens_layout(meta["saelens_cfg"]), indent=2))
        if out.exists() and any(out.iterdir()):
            old = new_temp_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old)  # onto the empty dir just made
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # rename(2) replaces an empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
