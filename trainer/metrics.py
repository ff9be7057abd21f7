"""The metrics line a training run appends to ``metrics.jsonl`` every ``log_every`` steps.

Split in two because of data parallelism: :func:`batch_means` is a collective (every rank
calls it: the loss terms, MSE and L0 are averaged and the explained variance is of the global
batch), :func:`step_record` runs on rank 0 only and adds what it alone knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.distributed import Collective
from trainer.saes import SAE, SAEOutput, StepContext

__all__ = ["append_record", "batch_means", "step_record"]

# dyncorr penalty diagnostics (of the global batch) -> metrics.jsonl names
_PENALTY = {"mean_abs_R": "mean_abs_R", "max_abs_R": "max_abs_R", "n_pairs": "n_pairs", "min_var": "min_var",
            "nonfinite": "corr_nonfinite"}
_COUNTERS = ("nonfinite_events", "skipped_steps", "rollbacks")


@torch.no_grad()
def batch_means(out: SAEOutput, x: torch.Tensor, dp: Collective) -> tuple[dict[str, float], float]:
    """Means of the loss, its terms, ``mse`` and ``l0`` over the global batch, and its explained variance."""
    err = (out.x_hat.float() - x).pow(2)
    names = ["loss", *out.terms, "mse", "l0"]
    local = [out.loss, *out.terms.values(), err.mean(), out.l0]
    means = dp.sum(torch.stack([t.detach().double().reshape(()) for t in local])) / dp.world_size
    ev = float(1 - dp.sum(err.sum()) / (dp.batch_total_var(x) * dp.world_size))
    return dict(zip(names, means.tolist())), ev


def step_record(sae: SAE, out: SAEOutput, means: dict[str, float], ev: float, ctx: StepContext,
                state: dict[str, Any], eig_block: torch.Tensor | None) -> dict[str, Any]:
    """One line of metrics.jsonl: the batch means, the schedule, the stability counters and, for
    dyncorr, the penalty diagnostics and Sigma's eigenvalue metrics on the sampled block."""
    rec: dict[str, Any] = {"step": state["step"], "tokens": state["tokens"], **means,
                           "explained_variance": ev, "dead_fraction": float(sae.dead_mask().float().mean()),
                           "grad_norm": float(out.extras["grad_norm"]), "lr": float(out.extras["lr"]),
                           "k": ctx.k, "lambda": ctx.lam, "sparsity_coef": ctx.sparsity_coef,
                           "tokens_per_s": state["tokens"] / max(state["wall_s"], 1e-9),
                           **{c: state[c] for c in _COUNTERS}, "rows_dropped": state.get("rows_dropped", 0)}
    for name, field in _PENALTY.items():
        if name in out.extras:
            rec[field] = float(out.extras[name])
    if hasattr(sae, "stats"):
        rec["sigma_min_eig"] = sae.stats.min_eigenvalue(eig_block)
        rec["sigma_condition"] = sae.stats.condition_number(eig_block)
    return rec


def append_record(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
