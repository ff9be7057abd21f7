"""The Stabilized Dynamic Correlation SAE: TopK with a cosine-annealed k(t), and a penalty on
the correlations of co-active latents, measured against running (EMA) latent statistics
damped by eps * I (docs/sae-math.md)."""

from __future__ import annotations

import torch

from trainer.config import SAEConfig
from trainer.saes.base import SAEOutput, StepContext
from trainer.saes.corr_penalty import penalty_and_moments
from trainer.saes.covariance import LatentStatistics
from trainer.saes.topk import TopKSAE

# bfloat16 is not offered: it rounds away most of each step's beta-sized increment of M.
_COV_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DynCorrSAE(TopKSAE):
    arch = "dyncorr"

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        self.stats = LatentStatistics(cfg.d_sae, beta=cfg.beta, eps=cfg.eps, dtype=_COV_DTYPES[cfg.cov_dtype])

    def current_k(self, ctx: StepContext) -> int:
        return ctx.k or self.cfg.k_end

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return super().encode(x, k or self.cfg.k_end)

    def _extend(self, out: SAEOutput, idx: torch.Tensor, val: torch.Tensor, ctx: StepContext) -> SAEOutput:
        # Uses M_{t-1}, mu_{t-1}: must run before stats.update for this batch (after_step).
        # Data parallel: the penalty and stats.update see every rank's rows (docs/sae-math.md).
        idx, val = self.dp.gather_rows(idx), self.dp.gather_rows(val)
        out.extras["idx"], out.extras["val"] = idx, val  # for stats.update in after_step
        corr, diag, mom = penalty_and_moments(self.stats, idx, val)
        # The batch's distinct pairs and sums, for stats.update: it then skips rebuilding them.
        out.extras["moments"] = mom
        out.loss = out.loss + ctx.lam * self.dp.own_rows_grad(corr)
        out.terms["corr_loss"] = corr.detach()
        for name, v in diag.items():
            out.extras[name] = torch.as_tensor(v)
        return out

    def after_step(self, out: SAEOutput) -> None:
        super().after_step(out)
        x = out.extras
        self.stats.update(x["idx"], x["val"].detach(), moments=x["moments"])
