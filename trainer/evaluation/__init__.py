"""``sae eval``: a trained SAE measured on held-out data (SAEBench-style ``eval.json``).

* :mod:`.reconstruction` MSE, explained variance, cosine, L0/L1, dead and frequent latents (float64)
* :mod:`.decorrelation` latent correlations over co-active pairs (fresh float64 covariance), decoder redundancy
* :mod:`.splice` CE loss clean / spliced / zero-ablated, ``ce_loss_score`` and KL, full model forward
* :mod:`.probing` + :mod:`.probe_data` sparse probing on labelled texts (top-k latents vs raw activations)
* :mod:`.data` the split's rows and windows, and the warning when they were trained on
* :mod:`.loading` a run directory's config and final (normalisation-folded) weights
* :mod:`.run` :func:`evaluate_run`, the one entry point; :mod:`.cli` the typer command
"""

from trainer.evaluation.decorrelation import DecorrelationMetrics, decorrelation_metrics
from trainer.evaluation.probe_data import PROBE_CODE, PROBE_STDLIB
from trainer.evaluation.reconstruction import ReconstructionMetrics, evaluate
from trainer.evaluation.run import evaluate_run

__all__ = ["PROBE_CODE", "PROBE_STDLIB", "DecorrelationMetrics", "ReconstructionMetrics", "decorrelation_metrics",
           "evaluate", "evaluate_run"]
