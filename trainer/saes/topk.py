"""TopK SAE with the AuxK loss on dead latents (OpenAI's recipe, as in sparsify)."""

from __future__ import annotations

import torch

from trainer.saes.base import SAE, SAEOutput, StepContext
from trainer.saes.sparse_ops import aux_decode, densify, sparse_decode, squared_error, topk_encode


class TopKSAE(SAE):
    arch = "topk"

    def current_k(self, ctx: StepContext) -> int:
        return self.cfg.k

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        val, idx, _, _ = topk_encode(x, self.b_dec, self.W_enc, self.b_enc, k or self.cfg.k)
        return densify(idx, val, self.cfg.d_sae)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> SAEOutput:
        k = self.current_k(ctx)
        dead_idx = None
        if self.training and self.cfg.k_aux > 0:
            dead_idx = self.dead_mask().nonzero().squeeze(1)
        val, idx, aux_code, sel = topk_encode(x, self.b_dec, self.W_enc, self.b_enc, k, dead_idx, self.cfg.k_aux)
        x_hat = sparse_decode(idx, val, self.W_dec, self.b_dec, sel)
        sq, err = squared_error(x, x_hat)
        # Scale-free loss: fraction of variance unexplained (sparsify / OpenAI).
        total_var = self.dp.batch_total_var(x).clamp(min=1e-12)  # global batch's (data parallel)
        fvu = sq / total_var
        terms = {"fvu": fvu.detach()}
        loss = fvu
        if aux_code.shape[1]:
            # AuxK: dead latents learn to explain what the live ones leave over. k_aux is a large
            # share of the dead latents, so a dense decode with their W_dec rows (gathered once)
            # beats gathering k_aux rows per token.
            e_hat = aux_decode(aux_code, self.W_dec, dead_idx)
            aux = squared_error(err, e_hat)[0] / total_var  # err carries no gradient
            loss = loss + self.cfg.aux_coef * aux
            terms["auxk_loss"] = aux.detach()
        else:
            terms["auxk_loss"] = torch.zeros((), device=x.device)
        out = SAEOutput(x_hat=x_hat, loss=loss, terms=terms, fired=self.fired_mask(idx, val, self.cfg.d_sae),
                        l0=(val > 0).sum(-1).float().mean(), extras={"idx": idx, "val": val})
        return self._extend(out, idx, val, ctx)

    def _extend(self, out: SAEOutput, idx: torch.Tensor, val: torch.Tensor, ctx: StepContext) -> SAEOutput:
        """Hook for subclasses adding loss terms on the sparse code."""
        return out
