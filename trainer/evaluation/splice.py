"""The SAE spliced into the model: next-token loss with the hook's residual replaced.

Three full forwards per batch of windows (no truncation: the loss needs every block, the
final norm and the unembedding): clean, with the hook's residual replaced by the SAE's
reconstruction, and with it zero-ablated. ``hook_resid_post`` of block L is the output of
block L, replaced by a forward hook on that block (for the last block this is before the
final norm, as TransformerLens defines it); ``hook_resid_pre`` of L is the input of block L,
replaced by a forward pre-hook. Only the positions the store holds are replaced: with
``exclude_bos`` the BOS row keeps its clean value (the SAE never saw one), and so do the rows
a run trained with ``max_norm_ratio`` left out (``trainer.rows``), in both the spliced and the
zero-ablated pass.

``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` (SAEBench): 1 = the SAE
loses nothing, 0 = as bad as deleting the residual. KL is ``KL(p_clean || p_x)`` per
predicted position, averaged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from actcache.hooks import HookSpec
from actcache.models import decoder_layers
from trainer.rows import norm_outliers
from trainer.saes.base import SAE

Replace = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SpliceMetrics:
    n_windows: int
    n_predictions: int  # next-token predictions scored: n_windows * (context_size - 1)
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_score: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float  # (KL_zero - KL_sae) / KL_zero

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@contextlib.contextmanager
def replaced_residual(model: torch.nn.Module, spec: HookSpec, fn: Replace) -> Iterator[None]:
    """While inside, the residual at ``spec`` is ``fn(residual)`` (shape ``(B, T, d)``)."""
    block = decoder_layers(model)[spec.layer]
    if spec.kind == "hook_resid_post":
        def post(module, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, (tuple, list)) else fn(out)

        handle = block.register_forward_hook(post)
    else:
        def pre(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _keep_outliers(out: torch.Tensor, h: torch.Tensor, first_position: int, max_norm_ratio: float) -> torch.Tensor:
    """Rows the SAE was not trained on (``trainer.rows``: norm > ratio x the median) keep their clean value."""
    if max_norm_ratio:
        x = h[:, first_position:]
        mask = norm_outliers(x, max_norm_ratio)
        out[:, first_position:][mask] = x[mask]
    return out


def sae_replacement(sae: SAE, k: int | None, first_position: int, max_norm_ratio: float = 0.0) -> Replace:
    def fn(h: torch.Tensor) -> torch.Tensor:
        x = h[:, first_position:]
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype)
        out = h.clone()
        out[:, first_position:] = sae.decode(sae.encode(flat, k)).reshape(x.shape).to(h.dtype)
        return _keep_outliers(out, h, first_position, max_norm_ratio)
    return fn


def zero_replacement(first_position: int, max_norm_ratio: float = 0.0) -> Replace:
    def fn(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, first_position:] = 0
        return _keep_outliers(out, h, first_position, max_norm_ratio)
    return fn


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.double(), dim=-1)


def _score(zero: float, spliced: float, clean: float) -> float:
    denom = zero - clean
    return (zero - spliced) / denom if abs(denom) > 1e-12 else math.nan


@torch.inference_mode()
def splice_metrics(model: torch.nn.Module, spec: HookSpec, sae: SAE, k: int | None, windows: torch.Tensor, *,
                   first_position: int, batch_windows: int = 4, max_norm_ratio: float = 0.0) -> SpliceMetrics:
    """CE clean / spliced / zero-ablated and KL to the clean logits over ``windows`` ``(n, T)``."""
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_pred = 0
    variants = {"sae": sae_replacement(sae, k, first_position, max_norm_ratio),
                "zero": zero_replacement(first_position, max_norm_ratio)}
    for i in range(0, len(windows), batch_windows):
        ids = windows[i:i + batch_windows].to(device)
        target = ids[:, 1:].unsqueeze(-1)
        clean = _log_probs(model, ids)
        sums["clean"] -= clean.gather(-1, target).sum().item()
        p_clean = clean.exp()
        for name, fn in variants.items():
            with replaced_residual(model, spec, fn):
                lp = _log_probs(model, ids)
            sums[name] -= lp.gather(-1, target).sum().item()
            sums[f"kl_{name}"] += (p_clean * (clean - lp)).sum().item()
            del lp
        n_pred += target.numel()
    if n_pred == 0:
        raise ValueError("no windows to splice")
    m = {key: v / n_pred for key, v in sums.items()}
    return SpliceMetrics(
        n_windows=len(windows), n_predictions=n_pred, ce_loss_without_sae=m["clean"], ce_loss_with_sae=m["sae"],
        ce_loss_with_ablation=m["zero"], ce_loss_score=_score(m["zero"], m["sae"], m["clean"]),
        kl_div_with_sae=m["kl_sae"], kl_div_with_ablation=m["kl_zero"],
        kl_div_score=(m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] > 1e-12 else math.nan)
