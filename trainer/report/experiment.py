"""``sae experiment``: baseline vs TopK vs dyncorr (eps > 0) vs dyncorr (eps = 0), then eval + compare.

Every variant trains on the same store, with the same seeds, token budget, batch size and
learning rate; only the architecture and its own knobs differ. Each run is an ordinary
``sae train`` run directory under ``OUT/runs/`` so re-running the experiment resumes an
unfinished run and skips a finished one (after checking that its settings are the ones asked
for). The report goes to ``OUT/report/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from actcache.errors import ActcacheError
from actcache.store import open_store
from trainer import artifacts as A
from trainer.config import RunConfig
from trainer.report.compare import Comparison, compare
from trainer.train import RUNTIME_FIELDS, train

log = logging.getLogger(__name__)

# The variants: flat config fields on top of the shared ones.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"arch": "baseline"},  # ReLU + L1 with the seed's run-0 sparsity penalty
    "topk": {"arch": "topk"},  # k = the dyncorr schedule's final k_end
    # dyncorr without its penalty: TopK with the cosine k(t) schedule, to separate the two effects
    "topk-cosine": {"arch": "dyncorr", "eps": 1e-6, "lambda_max": 0.0},
    "dyncorr": {"arch": "dyncorr", "eps": 1e-6},
    "dyncorr-eps0": {"arch": "dyncorr", "eps": 0.0},  # the unstabilised ablation
}
DEFAULT_VARIANTS = ("baseline", "topk", "dyncorr", "dyncorr-eps0")
RUNS, REPORT, PARAMS = "runs", "report", "experiment.json"

ProgressFactory = Callable[[str, int, int], Any]  # (run name, index, total) -> trainer Progress or None


def plan(store: str, out: Path, *, seeds: int, variants: tuple[str, ...], shared: dict[str, Any],
         definitions: dict[str, dict[str, Any]] | None = None,
         seeds_of: dict[str, int] | None = None) -> dict[str, RunConfig]:
    """Run name -> its config, in training order (variant-major).

    ``definitions``: variant name -> its flat fields (default :data:`VARIANTS`); ``seeds_of``:
    seeds of some variants other than ``seeds`` (the study's one-seed lambda sweep)."""
    defs = VARIANTS if definitions is None else definitions
    unknown = [v for v in variants if v not in defs]
    if unknown:
        raise ActcacheError(f"unknown variant(s) {', '.join(unknown)}: use some of {', '.join(defs)}")
    counts = {v: (seeds_of or {}).get(v, seeds) for v in variants}
    if min(counts.values(), default=1) < 1:
        raise ActcacheError(f"--seeds {min(counts.values())} must be >= 1")
    cfgs = {}
    for v in variants:
        for s in range(counts[v]):
            name = f"{v}-s{s}"
            flat = {**shared, "store": str(store), "out": str(out / RUNS / name), "seed": s, **defs[v]}
            if flat.get("arch") == "topk" and "k" not in defs[v]:
                flat["k"] = flat.get("k_end", 32)  # a fair L0: dyncorr's final k
            cfgs[name] = RunConfig.from_flat(flat)
    return cfgs


def _resolved(cfg: RunConfig, hooks: list[str], d_model: int) -> dict[str, Any]:
    """The config as the trainer writes it to config.json (hook and widths filled in)."""
    hook = cfg.train.hook or (hooks[0] if len(hooks) == 1 else "")
    return replace(cfg, train=replace(cfg.train, hook=hook), sae=cfg.sae.resolved(d_model)).to_flat()


def _state(cfg: RunConfig, hooks: list[str], d_model: int) -> str:
    """'new', 'resume' or 'done'; a run dir with other settings is an error."""
    paths = A.run_paths(cfg.train.out)
    if not paths.config.exists():
        return "new"
    old, new = json.loads(paths.config.read_text()), _resolved(cfg, hooks, d_model)
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RUNTIME_FIELDS and old.get(k) != v]
    if diff:
        raise ActcacheError(f"{paths.root} holds a run with other settings ({'; '.join(diff[:4])}): "
                            "re-run with the original ones, or choose a new --out")
    return "done" if paths.summary.exists() else "resume"


def evaluate_again(path: Path, opts: dict[str, Any]) -> str | None:
    """None when ``eval.json`` exists for the same store, split and row cap; else why it is (re)made."""
    if not path.exists():
        return ""
    try:
        was = json.loads(path.read_text()).get("eval_config", {})
    except ValueError:
        return " (its eval.json is damaged)"
    want = (str(Path(opts["store"]).resolve()), opts.get("split", "heldout"), opts.get("max_rows", 0))
    had = (str(Path(was.get("store", "")).resolve()), was.get("split", "heldout"), was.get("max_rows", 0))
    return None if had == want else (f" (again: on {want[0]} {want[1]} max_rows {want[2]}, was {had[0]} {had[1]} "
                                     f"max_rows {had[2]})")


def run_experiment(store: str | Path, out: str | Path, *, seeds: int = 1, variants: tuple[str, ...] = DEFAULT_VARIANTS,
                   n_tokens: int = 0, epochs: int = 1, d_sae: int = 0, batch_size: int = 4096, lr: float = 3e-4,
                   k_start: int = 128, k_end: int = 32, lambda_max: float = 1.0, sparsity_penalty: float = 0.04,
                   normalize: str = "expected_average_only_in", dead_after_tokens: int = 1_000_000, hook: str = "",
                   device: str = "auto", evaluate: bool = True, eval_options: dict[str, Any] | None = None,
                   train_overrides: dict[str, Any] | None = None, progress: ProgressFactory | None = None,
                   echo: Callable[[str], None] = log.info,
                   on_comparison: Callable[[Comparison], None] | None = None,
                   definitions: dict[str, dict[str, Any]] | None = None,
                   seeds_of: dict[str, int] | None = None) -> Path:
    """Train every variant x seed on ``store`` (skipping finished runs), evaluate, compare.

    ``train_overrides``: further flat ``sae train`` fields for every run (e.g. ``log_every``).
    ``eval_options``: keyword arguments of :func:`trainer.evaluation.evaluate_run` (``splice``,
    ``n_windows``, ``probe_file``, ...); a run that already has ``eval.json`` is not evaluated again.
    ``definitions`` / ``seeds_of``: other variants, and per-variant seed counts (see :func:`plan`).
    Returns the path of ``report.md``."""
    out = Path(out).expanduser()
    st = open_store(store)  # refuses a missing or incomplete store before anything is written
    shared = dict(hook=hook, n_tokens=n_tokens, epochs=epochs, d_sae=d_sae, batch_size=batch_size, lr=lr,
                  k_start=k_start, k_end=k_end, lambda_max=lambda_max, sparsity_penalty=sparsity_penalty,
                  normalize=normalize, dead_after_tokens=dead_after_tokens, device=device, **(train_overrides or {}))
    defs = VARIANTS if definitions is None else definitions
    cfgs = plan(str(store), out, seeds=seeds, variants=variants, shared=shared, definitions=defs, seeds_of=seeds_of)
    states = {name: _state(cfg, st.hooks, st.d_model) for name, cfg in cfgs.items()}  # all checked before training
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    params = {"store": str(store), "seeds": seeds, "seeds_of": seeds_of or {}, "variants": list(variants),
              "shared": shared, "variant_fields": {v: defs[v] for v in variants}}
    (out / PARAMS).write_text(json.dumps(params, indent=2))
    diverged: list[str] = []
    for i, (name, cfg) in enumerate(cfgs.items()):
        if states[name] == "done":
            echo(f"[{i + 1}/{len(cfgs)}] {name}: finished earlier, skipped")
            continue
        echo(f"[{i + 1}/{len(cfgs)}] {name}" + (" (resuming)" if states[name] == "resume" else ""))
        bar = progress(name, i, len(cfgs)) if progress else None
        try:
            train(cfg, resume=states[name] == "resume", progress=bar)
        except ActcacheError as e:
            if "diverged" not in str(e):  # a diverged run is a result (the report shows it unfinished)
                raise
            echo(f"{name}: {e}")
            diverged.append(name)
        finally:
            if bar is not None and hasattr(bar, "stop"):
                bar.stop()
    run_dirs = [Path(cfg.train.out) for cfg in cfgs.values()]
    if evaluate:
        from trainer.evaluation import evaluate_run

        opts = {"store": str(store), "device": device, **(eval_options or {})}
        for d in run_dirs:
            if d.name in diverged:
                continue
            why = evaluate_again(A.run_paths(d).eval, opts)
            if why is not None:
                echo(f"eval {d.name}{why}")
                evaluate_run(d, **opts)
    result = compare(run_dirs, out / REPORT)
    if on_comparison:
        on_comparison(result)
    return result.report
