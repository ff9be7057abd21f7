"""Kept for importers of the old path: the metrics live in :mod:`trainer.evaluation.reconstruction`."""

from trainer.evaluation.reconstruction import ReconstructionMetrics, evaluate

__all__ = ["ReconstructionMetrics", "evaluate"]
