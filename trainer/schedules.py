"""Step schedules of SAE training (docs/sae-math.md, "Schedules"): pure functions of the step.

All take the 0-based optimiser step ``t`` (the step about to run) and return a plain
Python number, so they are trivially exact, resumable and testable.

* ``k(t)`` and ``lambda(t)`` of the dyncorr SAE are cosines on one horizon ``T`` that starts
  after an ``offset`` (by default the learning-rate warm-up); with ``u = clip((t - offset) / T,
  0, 1)``::

      k(t)      = round_half_up(k_end + (k_start - k_end) * (1 + cos(pi u)) / 2)
      lambda(t) = lambda_max * (1 - cos(pi u)) / 2

  so before rounding ``(k - k_end) / (k_start - k_end) + lambda / lambda_max = 1``: the penalty
  rises exactly as k falls. ``T = 0`` means the schedule has already finished once ``t >= offset``.
* the learning-rate factor: linear warm-up ``(t + 1) / W`` for ``t < W`` (reaches 1 at the last
  warm-up step; step 0 does not run at lr 0), then a cosine from 1 at ``t = W`` to
  ``lr_min_ratio`` at ``t = total_steps`` (the end of training; the last step ``total_steps - 1``
  runs just above it); it stays there beyond.
* the baseline's L1 coefficient warm-up: the same linear factor ``min(1, (t + 1) / W_pen)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Schedule",
    "cosine_k",
    "cosine_lambda",
    "cosine_progress",
    "linear_warmup",
    "lr_factor",
    "round_half_up",
]


def _check_step(t: int) -> None:
    if t < 0:
        raise ValueError(f"step must be >= 0, got {t}")


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: deterministic, unlike Python's banker's ``round``."""
    return int(math.floor(x + 0.5))


def cosine_progress(t: int, horizon: int, offset: int = 0) -> float:
    """``u = clip((t - offset) / horizon, 0, 1)``; a zero horizon jumps to 1 at ``t = offset``."""
    _check_step(t)
    if horizon < 0 or offset < 0:
        raise ValueError(f"horizon and offset must be >= 0, got {horizon}, {offset}")
    if t < offset:
        return 0.0
    if horizon == 0:
        return 1.0
    return min(t - offset, horizon) / horizon


def cosine_k(t: int, k_start: int, k_end: int, horizon: int, offset: int = 0) -> int:
    """Active latents at step ``t``: ``k_start`` until ``offset``, ``k_end`` from ``offset + horizon``."""
    if k_start < 1 or k_end < 1:
        raise ValueError(f"k_start and k_end must be >= 1, got {k_start}, {k_end}")
    u = cosine_progress(t, horizon, offset)
    k = round_half_up(k_end + (k_start - k_end) * (1.0 + math.cos(math.pi * u)) / 2.0)
    return min(max(k, min(k_start, k_end)), max(k_start, k_end))


def cosine_lambda(t: int, lambda_max: float, horizon: int, offset: int = 0) -> float:
    """Correlation-penalty weight at step ``t``: 0 until ``offset``, ``lambda_max`` from ``offset + horizon``."""
    u = cosine_progress(t, horizon, offset)
    if u >= 1.0:
        return float(lambda_max)
    return lambda_max * (1.0 - math.cos(math.pi * u)) / 2.0


def linear_warmup(t: int, warmup_steps: int) -> float:
    """``min(1, (t + 1) / warmup_steps)``; 1 when ``warmup_steps == 0``."""
    _check_step(t)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return 1.0 if t + 1 >= warmup_steps else (t + 1) / warmup_steps


def lr_factor(t: int, total_steps: int, warmup_steps: int = 0, lr_min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine to ``lr_min_ratio`` at ``total_steps``."""
    if not 0.0 <= lr_min_ratio <= 1.0:
        raise ValueError(f"lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
    if t < warmup_steps:
        return linear_warmup(t, warmup_steps)
    u = cosine_progress(t, max(total_steps - warmup_steps, 0), warmup_steps)
    if u >= 1.0:
        return float(lr_min_ratio)
    return lr_min_ratio + (1.0 - lr_min_ratio) * (1.0 + math.cos(math.pi * u)) / 2.0


@dataclass(frozen=True)
class Schedule:
    """All schedules of one run, aligned: warm-up ``[0, W)``, then k, lambda and the lr cosine
    share the horizon ``[offset, offset + T]`` (default ``offset = W``, ``T = total_steps - W``).
    """

    total_steps: int
    warmup_steps: int = 0
    penalty_warmup_steps: int = 0
    lr_min_ratio: float = 0.0
    horizon: int | None = None
    """T of the k / lambda cosines; None = the rest of the run after the offset."""
    offset: int | None = None
    """Step where k starts falling and lambda rising; None = warmup_steps."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in 0..total_steps, got {self.warmup_steps}")
        if self.penalty_warmup_steps < 0:
            raise ValueError(f"penalty_warmup_steps must be >= 0, got {self.penalty_warmup_steps}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.horizon is not None and self.horizon < 0 or self.offset is not None and self.offset < 0:
            raise ValueError(f"horizon and offset must be >= 0, got {self.horizon}, {self.offset}")

    @property
    def T(self) -> int:
        return self.horizon if self.horizon is not None else max(self.total_steps - self.start, 0)

    @property
    def start(self) -> int:
        return self.offset if self.offset is not None else self.warmup_steps

    def progress(self, t: int) -> float:
        return cosine_progress(t, self.T, self.start)

    def k(self, t: int, k_start: int, k_end: int) -> int:
        return cosine_k(t, k_start, k_end, self.T, self.start)

    def lam(self, t: int, lambda_max: float) -> float:
        return cosine_lambda(t, lambda_max, self.T, self.start)

    def lr_factor(self, t: int) -> float:
        return lr_factor(t, self.total_steps, self.warmup_steps, self.lr_min_ratio)

    def penalty_warmup(self, t: int) -> float:
        return linear_warmup(t, self.penalty_warmup_steps)
