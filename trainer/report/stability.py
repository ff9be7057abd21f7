"""Stability metrics of one run, computed from its ``metrics.jsonl`` series (pure functions).

Each function takes plain sequences so the tests can feed series with known answers. The
series are the *logged* records (every ``log_every`` steps), so "steps" below are records.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SPIKE_WINDOW = 20  # records in the trailing window of the spike detector
SPIKE_MADS = 3.0  # a spike exceeds the trailing median by more than this many MADs
LATE_FRAC = 0.2  # the last 20% of the records are "late training"


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def loss_spikes(loss: Sequence[float], *, window: int = SPIKE_WINDOW, n_mads: float = SPIKE_MADS) -> list[int]:
    """Indices ``i`` whose loss exceeds the median of the ``window`` records before it by more
    than ``n_mads`` median absolute deviations of that window.

    The window is trailing (it never contains ``i``) and needs at least 3 values; a non-finite
    loss is a spike. A constant window has MAD 0, so any rise above it counts (a tiny relative
    floor keeps float round-off out)."""
    x = np.asarray(loss, dtype=np.float64)
    spikes = []
    for i in range(len(x)):
        if not math.isfinite(x[i]):
            spikes.append(i)
            continue
        prev = _finite(x[max(0, i - window) : i])
        if len(prev) < 3:
            continue
        med = float(np.median(prev))
        mad = float(np.median(np.abs(prev - med)))
        if x[i] - med > n_mads * max(mad, 1e-9 * abs(med)):
            spikes.append(i)
    return spikes


def late_cv(loss: Sequence[float], *, frac: float = LATE_FRAC) -> float:
    """Coefficient of variation (population std / |mean|) of the last ``frac`` of the records
    (at least 2); NaN when there are too few finite values or the mean is 0."""
    x = np.asarray(loss, dtype=np.float64)
    tail = _finite(x[len(x) - max(2, math.ceil(frac * len(x))) :])
    if len(tail) < 2 or tail.mean() == 0:
        return math.nan
    return float(tail.std() / abs(tail.mean()))


def max_and_p99(values: Sequence[float]) -> tuple[float, float]:
    """Max and 99th percentile (linear interpolation) of the finite values; NaN when none."""
    x = _finite(values)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.max()), float(np.percentile(x, 99))


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """Across-seed spread: mean, sample std (ddof 1) and range (max - min) of the finite values."""
    x = _finite(values)
    if len(x) == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "range": math.nan}
    d = x - x[0]  # shifted: identical values give exactly 0, not round-off
    return {"n": len(x), "mean": float(x[0] + d.mean()), "std": float(d.std(ddof=1)) if len(x) > 1 else 0.0,
            "range": float(x.max() - x.min())}


def column(records: Sequence[dict[str, Any]], name: str) -> list[float]:
    """One field of every record (NaN where a record lacks it)."""
    return [float(r.get(name, math.nan)) for r in records]


def stability(records: Sequence[dict[str, Any]], counters: dict[str, Any]) -> dict[str, float]:
    """All stability metrics of one run. ``counters``: the run's final nonfinite_events,
    skipped_steps and rollbacks (summary.json, or the last record of an unfinished run)."""
    # Records without a loss (an imported SAE's "no training" record) are not spikes; a NaN loss is.
    loss = column([r for r in records if "loss" in r], "loss")
    g_max, g_p99 = max_and_p99(column(records, "grad_norm"))
    dead = _finite(column(records, "dead_fraction"))
    eig = _finite(column(records, "sigma_min_eig"))
    cond = np.asarray(column(records, "sigma_condition"), dtype=np.float64)
    cond = cond[~np.isnan(cond)]  # inf (a singular Sigma) is kept: it is the point
    return {
        "nonfinite_events": float(counters.get("nonfinite_events", math.nan)),
        "skipped_steps": float(counters.get("skipped_steps", math.nan)),
        "rollbacks": float(counters.get("rollbacks", math.nan)),
        "loss_spikes": float(len(loss_spikes(loss))),
        "grad_norm_max": g_max,
        "grad_norm_p99": g_p99,
        "late_loss_cv": late_cv(loss),
        "dead_fraction_end": float(dead[-1]) if len(dead) else math.nan,
        "dead_fraction_max": float(dead.max()) if len(dead) else math.nan,
        "sigma_min_eig_min": float(eig.min()) if len(eig) else math.nan,
        "sigma_min_eig_end": float(eig[-1]) if len(eig) else math.nan,
        "sigma_condition_max": float(cond.max()) if len(cond) else math.nan,
    }
