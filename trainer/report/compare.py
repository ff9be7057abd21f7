"""``sae compare``: final metrics and stability metrics of several runs -> tables, plots, report.md.

The tables are plain data (:class:`Table`: title, columns, string cells) so the CLI can render
them with rich and :func:`write_report` as markdown from the same cells. ``compare.json``
beside ``report.md`` holds the unformatted numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from actcache.errors import ActcacheError
from trainer.report.runs import Run, load_runs, seed_groups
from trainer.report.stability import seed_spread, stability

REPORT = "report.md"
NUMBERS = "compare.json"


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Comparison:
    runs: list[Run]
    final: dict[str, dict[str, float]]  # run name -> metric -> value (NaN = not available)
    stability: dict[str, dict[str, float]]
    spread: dict[str, dict[str, dict[str, float]]]  # group label -> metric -> seed_spread()
    tables: list[Table]
    plots: list[Path]
    report: Path


def _find(d: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in nested dicts (SAEBench nests by eval type)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def final_metrics(run: Run) -> dict[str, float]:
    """eval.json's metrics when present; otherwise the trainer's held-out reconstruction
    metrics (summary.json) and blanks for what only ``sae eval`` measures."""
    held = (run.summary or {}).get("heldout", {})
    m = (run.eval or {}).get("eval_result_metrics", {})
    rq, sp = m.get("reconstruction_quality", {}), m.get("sparsity", {})
    mp, dc = m.get("model_performance_preservation", {}), m.get("decorrelation", {})
    pick = lambda ev, tr: _num(ev) if ev is not None else _num(tr)  # noqa: E731
    return {
        "explained_variance": pick(rq.get("explained_variance"), held.get("explained_variance")),
        "mse": pick(rq.get("mse"), held.get("mse")),
        "cossim": pick(rq.get("cossim"), held.get("cosine_similarity")),
        "l0": pick(sp.get("l0"), held.get("l0")),
        "l1": pick(sp.get("l1"), held.get("l1")),
        "dead_fraction": pick(m.get("misc_metrics", {}).get("dead_fraction"), held.get("dead_fraction")),
        "ce_loss_score": _num(mp.get("ce_loss_score")),
        "kl_div_with_sae": _num(mp.get("kl_div_with_sae")),
        "probe_top1": _num(_find(m.get("sparse_probing"), "sae_top_1_test_accuracy")),
        "probe_top1_stderr": _num(_find(m.get("sparse_probing"), "sae_top_1_test_accuracy_stderr")),
        **{key: _num(dc.get(key)) for key, _, _ in _DECORR_COLS},
        "tokens": _num((run.summary or {}).get("tokens", run.records[-1].get("tokens"))),
        "wall_s": _num((run.summary or {}).get("wall_s")),
    }


def _fmt(v: float, spec: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


_FINAL_COLS = [("explained_variance", "EV", ".4f"), ("mse", "MSE", ".4g"), ("cossim", "cos", ".4f"),
               ("l0", "L0", ".1f"), ("l1", "L1", ".4g"), ("dead_fraction", "dead", ".3f"),
               ("ce_loss_score", "CE score", ".4f"), ("kl_div_with_sae", "KL", ".4g"),
               ("probe_top1", "probe top-1", ".3f"), ("probe_top1_stderr", "± se", ".3f"), ("tokens", "tokens", ",.0f"),
               ("wall_s", "wall s", ".0f")]
# eval.json's decorrelation section (trainer/evaluation/decorrelation.py)
_DECORR_COLS = [("mean_sq_corr_coactive", "mean R² (co-active)", ".4f"),
                ("mean_abs_corr_coactive", "mean abs(R)", ".4f"),
                ("frac_coactive_abs_corr_gt_0_5", "share abs(R) > 0.5", ".4f"),
                ("n_coactive_pairs", "co-active pairs", ",.0f"), ("coactive_pair_fraction", "of alive pairs", ".4f"),
                ("decoder_redundancy", "decoder redundancy", ".4f")]
_STAB_COLS = [("nonfinite_events", "NaN/Inf", ".0f"), ("skipped_steps", "skipped", ".0f"),
              ("rollbacks", "rollbacks", ".0f"), ("loss_spikes", "loss spikes", ".0f"),
              ("grad_norm_max", "grad max", ".3g"), ("grad_norm_p99", "grad p99", ".3g"),
              ("late_loss_cv", "late loss CV", ".3g"), ("dead_fraction_end", "dead end", ".3f"),
              ("dead_fraction_max", "dead max", ".3f"), ("sigma_min_eig_min", "min eig Σ", ".3g"),
              ("sigma_condition_max", "max cond Σ", ".3g")]
_SPREAD_KEYS = [("explained_variance", "EV", ".4f"), ("l0", "L0", ".2f"), ("mean_sq_corr_coactive", "mean R²", ".4f")]


def _table(title: str, runs: list[Run], values: dict[str, dict[str, float]], cols) -> Table:
    return Table(title, ["run", "variant"] + [c[1] for c in cols],
                 [[r.name, r.label] + [_fmt(values[r.name][k], spec) for k, _, spec in cols] for r in runs])


def _spread_table(spread: dict[str, dict[str, dict[str, float]]]) -> Table:
    cols = ["variant", "seeds"] + [f"{h} {s}" for _, h, _ in _SPREAD_KEYS for s in ("mean", "std", "range")]
    rows = []
    for label, per in spread.items():
        row = [label, str(per[_SPREAD_KEYS[0][0]]["n"])]
        for k, _, spec in _SPREAD_KEYS:
            row += [_fmt(per[k][s], spec) for s in ("mean", "std", "range")]
        rows.append(row)
    return Table("Across-seed spread (runs that differ only by seed)", cols, rows)


def compare(run_dirs: list[str | Path], out: str | Path, *, plots: bool = True,
            on_runs: Callable[[list[Run]], None] | None = None) -> Comparison:
    """Load, check and compare ``run_dirs``; write report.md, compare.json and PNG plots to ``out``."""
    runs = load_runs(run_dirs)
    if on_runs:
        on_runs(runs)
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActcacheError(f"cannot create report directory {out} ({e.strerror}): choose a writable --out") from None
    final = {r.name: final_metrics(r) for r in runs}
    stab = {r.name: stability(r.records, r.counters()) for r in runs}
    spread = {label: {k: seed_spread([final[r.name][k] for r in members]) for k, _, _ in _SPREAD_KEYS}
              for label, members in seed_groups(runs).items()}
    tables = [_table("Final metrics (held-out)", runs, final, _FINAL_COLS)]
    if any(math.isfinite(final[r.name]["n_coactive_pairs"]) for r in runs):
        tables.append(_table("Decorrelation (held-out latents, sae eval)", runs, final, _DECORR_COLS))
    tables.append(_table("Stability", runs, stab, _STAB_COLS))
    if spread:
        tables.append(_spread_table(spread))
    pngs: list[Path] = []
    tradeoffs: list[Path] = []
    if plots:
        from trainer.report.plots import plot_all, plot_tradeoffs

        pngs = plot_all(runs, out)
        tradeoffs = plot_tradeoffs(runs, final, out)
    report = out / REPORT
    report.write_text(render_markdown(runs, tables, pngs, out, tradeoffs=tradeoffs))
    numbers = {"runs": {r.name: {"path": str(r.path), "variant": r.label, "seed": r.config.get("seed"),
                                 "final": final[r.name], "stability": stab[r.name]} for r in runs},
               "seed_spread": spread}
    (out / NUMBERS).write_text(json.dumps(numbers, indent=2))
    return Comparison(runs, final, stab, spread, tables, pngs + tradeoffs, report)


def markdown_table(t: Table) -> str:
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "|".join("---" for _ in t.columns) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


DEFINITIONS = """\
- **Final metrics** come from `eval.json` (`sae eval`) when the run has one, otherwise from the
  trainer's own held-out pass (`summary.json`); CE score, KL and probe columns need `sae eval`.
- **NaN/Inf, skipped, rollbacks**: the trainer's counters. A non-finite loss or gradient skips the
  step; several in a row roll the weights back to the last checkpoint with half the learning rate.
- **loss spikes**: logged records whose loss exceeds the median of the 20 records before it by more
  than 3 median absolute deviations of those records (a non-finite loss counts as a spike).
- **grad max / p99**: of the pre-clipping global gradient norm over the logged records.
- **late loss CV**: std / mean of the loss over the last 20% of the logged records.
- **dead end / max**: the fraction of latents that have not fired for `dead_after_tokens` tokens,
  at the last record and at its worst.
- **min eig Σ / max cond Σ** (dyncorr only): smallest eigenvalue and largest condition number of
  the damped latent covariance Σ on a fixed random block of 256 latents, over the run.
- **Decorrelation** (`sae eval`, docs/evaluation.md): on the held-out rows, with a fresh float64
  covariance of the latents, `R` their correlation; a pair of latents is *co-active* when both
  fire in at least one common row. **mean R² (co-active)**: the mean of `R_ij²` over co-active
  pairs `i < j` (what the dyncorr penalty minimises, the split as one batch); **share abs(R) > 0.5**:
  the fraction of co-active pairs with `abs(R_ij) > 0.5`; **of alive pairs**: co-active pairs over
  all pairs of latents that fire on the split; **decoder redundancy**: mean over latents of the
  largest cosine similarity between its decoder direction and another one.
- **probe top-1 ± se**: SAE sparse-probing accuracy with one latent, mean over tasks, with its
  binomial standard error (the test sample's noise).
- **Across-seed spread**: sample std and max - min of the final EV, L0 and mean R² over runs whose
  settings are identical apart from the seed.
"""


def render_markdown(runs: list[Run], tables: list[Table], pngs: list[Path], out: Path, *,
                    tradeoffs: list[Path] = ()) -> str:
    parts = ["# SAE comparison\n", f"{len(runs)} runs, hook `{runs[0].config.get('hook')}`, "
             f"d_in {runs[0].config.get('d_in')}.\n"]
    parts += ["| run | variant | arch | seed | directory |", "|---|---|---|---|---|"]
    parts += [f"| {r.name} | {r.label} | {r.config.get('arch')} | {r.config.get('seed')} | `{r.path}` |" for r in runs]
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        parts.append(f"\nUnfinished (no summary.json; final metrics blank): {', '.join(unfinished)}.")
    for t in tables:
        parts += [f"\n## {t.title}\n", markdown_table(t)]
    if pngs:
        parts.append("\n## Training curves (x: training tokens; one line per run, colour = variant)\n")
        parts += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs]
    if tradeoffs:
        parts.append("\n## Trade-offs (held-out; one point per run, colour = variant)\n")
        parts += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in tradeoffs]
    parts += ["\n## Definitions\n", DEFINITIONS]
    return "\n".join(parts)
