"""Sparse probing (SAEBench's method), with a torch logistic regression.

Each text is run through the model up to the hook; the hook's activations and the SAE's
latents are mean-pooled over the text's tokens (BOS excluded). For each binary task the k
features whose class means differ most on the train split are kept, a logistic regression
is fitted on them (standardised features, L2 penalty as scikit-learn's ``C=1``, full-batch
L-BFGS in float64) and scored on the test split. ``llm_*`` rows probe the raw activations,
``sae_*`` rows the latents; ``*_test_accuracy`` uses every feature. Each accuracy ``a`` on
``n`` test texts comes with its binomial standard error ``sqrt(a (1 - a) / n)`` (``*_stderr``):
the noise of the test sample, which says which differences between two probes mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import math

import numpy as np
import torch
import torch.nn.functional as F

from trainer.evaluation.probe_data import ProbeTask
from trainer.saes.base import SAE

KS = (1, 2, 5, 10, 20, 50)


@dataclass(frozen=True)
class TokenActivations:
    """Every non-padding token's hook activation (float32, on the CPU) and the text it is from.

    Independent of the SAE, so one forward pass serves every run evaluated on the same texts."""

    acts: torch.Tensor  # (n_tokens, d_in)
    text: torch.Tensor  # (n_tokens,) int64: index into the texts
    n_texts: int


@torch.no_grad()
def token_activations(model: torch.nn.Module, tokenizer: Any, spec: Any, texts: Sequence[str], *, max_tokens: int,
                      prepend_bos: bool, batch_texts: int = 16) -> TokenActivations:
    """Run ``texts`` through the model up to the hook (BOS excluded from the result).

    Batches are right-padded: in a causal model a token never attends to the padding after it."""
    from actcache.capture import ResidualCapture

    bos = tokenizer.bos_token_id if prepend_bos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body = max_tokens - (bos is not None)
    encoded = [ids[:body] or [pad] for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths pad little
    parts, owners = [], []
    with ResidualCapture(model, [spec]) as cap:
        for b in range(0, len(order), batch_texts):
            rows = order[b:b + batch_texts]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for j, i in enumerate(rows):
                ids[j, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[j, :len(encoded[i])] = True
            if bos is not None:
                ids = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), ids], dim=1)
            h = cap.run(ids.to(device))[spec.name][:, 1 if bos is not None else 0:]
            parts.append(h[mask.to(device)].float().cpu())
            owners.append(torch.tensor(rows, dtype=torch.long)[:, None].expand(-1, width)[mask])
    return TokenActivations(torch.cat(parts), torch.cat(owners), len(texts))


@torch.no_grad()
def pool(tokens: TokenActivations, sae: SAE, k: int | None, *, batch_rows: int = 4096
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled hook activations ``(n, d_in)`` and SAE latents ``(n, d_sae)``, float32 on the CPU."""
    device = sae.W_dec.device
    count = torch.bincount(tokens.text, minlength=tokens.n_texts).float()[:, None]
    acts = torch.zeros(tokens.n_texts, sae.cfg.d_in).index_add_(0, tokens.text, tokens.acts)
    latents = torch.zeros(tokens.n_texts, sae.cfg.d_sae)
    for b in range(0, len(tokens.text), batch_rows):
        x = tokens.acts[b:b + batch_rows].to(device, sae.W_dec.dtype)
        latents.index_add_(0, tokens.text[b:b + batch_rows], sae.encode(x, k).float().cpu())
    return acts / count, latents / count


def pooled_features(model: torch.nn.Module, tokenizer: Any, spec: Any, sae: SAE, k: int | None, texts: Sequence[str],
                    *, max_tokens: int, prepend_bos: bool, batch_texts: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled hook activations ``(n, d_in)`` and SAE latents ``(n, d_sae)``, float32 on the CPU."""
    tokens = token_activations(model, tokenizer, spec, texts, max_tokens=max_tokens, prepend_bos=prepend_bos,
                               batch_texts=batch_texts)
    return pool(tokens, sae, k)


def top_k_by_mean_diff(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` features whose class means differ most (|mean_1 - mean_0|)."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    return torch.topk(diff.abs(), k).indices


def logistic_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                      *, c: float = 1.0, max_iter: int = 200) -> float:
    """Test accuracy of an L2 logistic regression fitted on standardised features."""
    x_train, x_test = x_train.double(), x_test.double()
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))  # constant features (dead latents) stay 0
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    yt = y_train.double()
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lam = 1.0 / (c * len(a))  # sklearn: 0.5 |w|^2 + C sum(loss), divided by C n
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + bias, yt) + 0.5 * lam * w.dot(w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias > 0).long() == y_test).double().mean().item()


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent test texts."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n > 0 else math.nan


def probe_task(features: dict[str, torch.Tensor], task: ProbeTask, ks: Sequence[int] = KS) -> dict[str, Any]:
    """``{prefix}_test_accuracy`` and ``{prefix}_top_{k}_test_accuracy`` for each feature set, each
    with its ``_stderr``."""
    y = torch.from_numpy(task.y)
    tr = torch.from_numpy(task.train)
    n_test = int((~tr).sum())
    out: dict[str, Any] = {"dataset_name": task.name, "n_train": int(tr.sum()), "n_test": n_test}
    for prefix, x in features.items():
        x = x[torch.from_numpy(task.index)]
        x_tr, x_te, y_tr, y_te = x[tr], x[~tr], y[tr], y[~tr]
        acc: dict[str, float | None] = {f"{prefix}_test_accuracy": logistic_accuracy(x_tr, y_tr, x_te, y_te)}
        for k in ks:
            if k > x.shape[1]:
                acc[f"{prefix}_top_{k}_test_accuracy"] = None
                continue
            idx = top_k_by_mean_diff(x_tr, y_tr, k)
            acc[f"{prefix}_top_{k}_test_accuracy"] = logistic_accuracy(x_tr[:, idx], y_tr, x_te[:, idx], y_te)
        for key, a in acc.items():
            out[key] = a
            out[f"{key}_stderr"] = None if a is None else binomial_stderr(a, n_test)
    return out


def mean_over_tasks(details: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The accuracies of :func:`probe_task` averaged over tasks. The mean's ``_stderr`` is
    ``sqrt(sum_t se_t^2) / T`` (independent test sets); ``n_test`` is the test texts summed over
    the ``n_tasks`` tasks."""
    keys = [k for k in details[0] if k.endswith("_test_accuracy")]
    mean: dict[str, float | None] = {"n_tasks": len(details), "n_test": sum(d["n_test"] for d in details)}
    for key in keys:
        vals = [d[key] for d in details if d[key] is not None]
        ses = [d[f"{key}_stderr"] for d in details if d[key] is not None]
        mean[key] = float(np.mean(vals)) if vals else None
        mean[f"{key}_stderr"] = math.sqrt(sum(se * se for se in ses)) / len(ses) if ses else None
    return mean


def sparse_probing(features: dict[str, torch.Tensor], tasks: Sequence[ProbeTask],
                   ks: Sequence[int] = KS) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Accuracies averaged over tasks (SAEBench's ``eval_result_metrics``, :func:`mean_over_tasks`)
    and per task."""
    details = [probe_task(features, t, ks) for t in tasks]
    return mean_over_tasks(details), details
