"""Logit effects: a latent's decoder direction through the model's unembedding.

``effect_i = (W_dec[i] * gamma) @ W_U^T`` (vocab,): the final norm's elementwise weight
``gamma`` is folded into ``W_U`` as TransformerLens's ``fold_ln`` does (Gemma's RMSNorm scales by
``1 + weight``); its per-token ``1 / RMS(x)`` factor is not applied (it depends on the whole
residual, is positive and so does not change the order). No centring (RMSNorm models have none).
Only the first block of the model is loaded besides the embeddings, the final norm and ``lm_head``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from actcache.errors import ActcacheError

log = logging.getLogger(__name__)
FINAL_NORM_NOTE = ("the final norm's elementwise weight is folded into the unembedding; its per-token 1/RMS "
                   "scale is not applied (positive, it does not change the order)")


@dataclass(frozen=True)
class Unembedding:
    W_U: torch.Tensor  # (vocab, d_model) float32
    gamma: torch.Tensor | None  # (d_model,) the final norm's effective weight, None when the model has none
    note: str


def _final_norm_weight(model: Any) -> torch.Tensor | None:
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    w = weight.detach().float()
    # Gemma's RMSNorm multiplies by (1 + weight); Llama-style ones by weight.
    return w + 1.0 if str(model.config.model_type).startswith("gemma") else w


def load_head(model_id: str, gguf_file: str | None = None) -> Any:
    """The store's model with only its first block (embeddings, final norm, ``lm_head`` and the
    tokenizer are what the dashboard needs): an ``actcache.models.LoadedModel``."""
    from actcache.models import load_model

    return load_model(model_id, gguf_file=gguf_file, dtype=torch.float32, device="cpu", keep_layers=1)


def unembedding(model: Any) -> Unembedding:
    """``W_U`` and the final norm's effective weight of a loaded causal LM."""
    head = model.get_output_embeddings()
    if head is None:
        raise ActcacheError(f"model {model.config.model_type} has no output embedding: logit effects need an LM head")
    gamma = _final_norm_weight(model)
    note = FINAL_NORM_NOTE if gamma is not None else "the model has no final norm weight: raw W_dec @ W_U"
    return Unembedding(head.weight.detach().float(), gamma, note)


@torch.no_grad()
def logit_effects(unembed: Unembedding, W_dec: torch.Tensor, latents: list[int], top: int = 10,
                  block: int = 256) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """Per latent: the ``top`` largest (``positive``) and smallest (``negative``) entries of its effect."""
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for start in range(0, len(latents), block):  # (block, vocab) at a time: vocab can be 256k
        ids = latents[start:start + block]
        d = W_dec[ids].float()
        if unembed.gamma is not None:
            d = d * unembed.gamma
        eff = d @ unembed.W_U.t()
        k = min(top, eff.shape[1])
        pos, neg = eff.topk(k, dim=1), eff.topk(k, dim=1, largest=False)
        for r, latent in enumerate(ids):
            out[latent] = {"positive": list(zip(pos.indices[r].tolist(), pos.values[r].tolist())),
                           "negative": list(zip(neg.indices[r].tolist(), neg.values[r].tolist()))}
    return out
