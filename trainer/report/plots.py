"""Training curves of several runs against tokens, one PNG per quantity, one line per run; and
the held-out trade-offs (EV vs L0, EV vs latent correlation), one point per run.

Uses ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot state, no display).
Colour = variant (runs that differ only by seed share it), line style = seed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from trainer.report.runs import Run

_STYLES = ["-", "--", ":", "-."]
# (file stem, title, metrics field, y scale)
PLOTS = [("loss", "training loss", "loss", "log"),
         ("explained_variance", "explained variance (training batch)", "explained_variance", "linear"),
         ("l0_vs_k", "L0 (solid) and k(t) (thin grey)", "l0", "log"),
         ("dead_fraction", "dead fraction", "dead_fraction", "linear"),
         ("grad_norm", "gradient norm (before clipping)", "grad_norm", "log"),
         ("lambda", "lambda(t): correlation-penalty weight", "lambda", "linear"),
         ("sigma_min_eig", "min eigenvalue of Sigma (256-latent block)", "sigma_min_eig", "symlog")]


def _series(run: Run, field: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["tokens"], float(r[field])) for r in run.records if field in r and r[field] is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    t, y = np.array(pts, dtype=np.float64).T
    return t, y


def _styles(runs: list[Run]) -> dict[str, tuple[str, str]]:
    labels = list(dict.fromkeys(r.label for r in runs))
    # Past the default cycle's 10 colours, tab20's: a study has 12 variants, and a repeated
    # colour would make two of them one series.
    colours = {lab: (f"C{i}" if len(labels) <= 10 else to_hex(matplotlib.colormaps["tab20"](i % 20)))
               for i, lab in enumerate(labels)}
    out, seen = {}, {lab: 0 for lab in labels}
    for r in runs:
        out[r.name] = (colours[r.label], _STYLES[seen[r.label] % len(_STYLES)])
        seen[r.label] += 1
    return out


def plot_one(runs: list[Run], stem: str, title: str, field: str, scale: str, out: Path) -> Path | None:
    """One PNG, or None when no run logged ``field`` with a finite value."""
    styles = _styles(runs)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    drawn = False
    for r in runs:
        t, y = _series(r, field)
        if not len(t) or not np.isfinite(y).any():
            continue
        colour, ls = styles[r.name]
        if stem == "l0_vs_k":
            tk, k = _series(r, "k")
            if len(tk) and r.config.get("arch") != "baseline":
                ax.plot(tk, k, color="0.55", lw=0.8, ls=ls)
        ax.plot(t, y, color=colour, ls=ls, lw=1.2, label=f"{r.name} ({r.label})")
        drawn = True
    if not drawn:
        return None
    if scale == "symlog":
        finite = np.concatenate([np.abs(_series(r, field)[1]) for r in runs])
        finite = finite[np.isfinite(finite) & (finite > 0)]
        ax.set_yscale("symlog", linthresh=float(finite.min()) if len(finite) else 1e-12)
    elif scale == "log":
        ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(runs) > 6 else 1)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path)
    return path


def plot_all(runs: list[Run], out: Path) -> list[Path]:
    """Every plot of :data:`PLOTS` that has data, written to ``out``."""
    paths = [plot_one(runs, *spec, out=out) for spec in PLOTS]
    return [p for p in paths if p is not None]


# (file stem, title, x metric, x label, x scale): held-out EV against it, one point per run
TRADEOFFS = [("ev_vs_l0", "explained variance vs L0 (held-out)", "l0", "L0 (active latents per token)", "log"),
             ("ev_vs_mean_sq_corr", "explained variance vs latent correlation (held-out)", "mean_sq_corr_coactive",
              "mean R² over co-active latent pairs", "log")]


def plot_tradeoff(runs: list[Run], final: dict[str, dict[str, float]], stem: str, title: str, x_key: str,
                  x_label: str, scale: str, out: Path) -> Path | None:
    """Held-out EV (y) against ``x_key`` (x), one marker per run, colour = variant; None without data."""
    styles = _styles(runs)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for r in runs:
        x, y = final[r.name].get(x_key, np.nan), final[r.name].get("explained_variance", np.nan)
        if not (np.isfinite(x) and np.isfinite(y)) or (scale == "log" and x <= 0):
            continue
        ax.scatter([x], [y], color=styles[r.name][0], s=28, label=None if r.label in labelled else r.label)
        labelled.add(r.label)
    if not labelled:
        return None
    if scale == "log":
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("explained variance")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(labelled) > 6 else 1)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path)
    return path


def plot_tradeoffs(runs: list[Run], final: dict[str, dict[str, float]], out: Path) -> list[Path]:
    """Every plot of :data:`TRADEOFFS` that has data, written to ``out``."""
    paths = [plot_tradeoff(runs, final, *spec, out=out) for spec in TRADEOFFS]
    return [p for p in paths if p is not None]
