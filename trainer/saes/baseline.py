"""The seed's run 0: a ReLU SAE with a decoder-norm-weighted L1 penalty (SAELens 'standard')."""

from __future__ import annotations

import torch

from trainer.saes.base import SAE, SAEOutput, StepContext


class BaselineSAE(SAE):
    arch = "baseline"

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> SAEOutput:
        z = self.encode(x)
        x_hat = self.decode(z)
        # SAELens' scale: squared error summed over d_in, averaged over tokens.
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1 = (z * torch.linalg.vector_norm(self.W_dec, dim=1)).sum(-1).mean()
        loss = mse + ctx.sparsity_coef * l1
        active = z > 0
        return SAEOutput(x_hat=x_hat, loss=loss, terms={"mse_loss": mse.detach(), "l1_loss": l1.detach()},
                         fired=active.any(0), l0=active.sum(-1).float().mean())
