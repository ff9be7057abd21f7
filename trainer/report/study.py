"""``sae study``: the stability study of issue 11 as one resumable command.

It extracts a store from a real model at a middle layer (skipped when the store is already
complete, resumed when it is not), then runs ``sae experiment`` twice on it:

* the **main study** (``OUT/``): baseline, TopK at constant k, TopK with dyncorr's cosine k
  schedule (``topk-cosine``: dyncorr with lambda 0), dyncorr (eps 1e-6) and dyncorr (eps 0), each
  over ``seeds`` seeds, plus dyncorr over a lambda_max sweep spanning orders of magnitude
  (``sweep_seeds`` seeds each), and dyncorr's penalty over constant k (``dyncorr-constk-lam*``:
  the penalty's effect without the k schedule), all at the same tokens, d_sae and final k;
* with ``stress``, the **stress regimes** (``OUT/stress/``): eps 1e-6 vs eps 0 where the damping
  should matter (beta 1, a tiny batch, a high learning rate, a long run at d_sae 16 x d_in with
  AuxK off so latents die, the covariance in float64 next to the default float32).

Every run is an ordinary run directory, so re-running the study skips finished runs and resumes
unfinished ones. ``OUT/study.md`` summarises every variant as mean +- std over its seeds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.report.experiment import REPORT, RUNS, VARIANTS, ProgressFactory, run_experiment

STRESS = "stress"
STORE = "store.zarr"
CORPUS = "corpus.jsonl"
SUMMARY = "study.md"
HELDOUT_STORE = "heldout.zarr"
HELDOUT_CORPUS = "heldout-corpus.jsonl"
PACKAGES_CORPUS = "packages-docstrings"
PROBES = "embedded:stdlib-packages,embedded:code-languages"  # two labelled task families (issue 11 section 5)  # the study's own corpus: docstrings of the installed packages

# Middle residual layer of the models the study knows (num_hidden_layers // 2); others are read
# from their transformers config.
_LAYERS = {"embedded:tiny-gemma2": 4, "embedded:smollm2-135m": 30, "embedded:gemma3-270m": 18,
           "google/gemma-2-2b": 26}


@dataclass(frozen=True)
class StudyScale:
    """How big the study is: the store, the SAEs and the seeds."""

    n_tokens: int  # extracted (train + held out)
    context_size: int
    d_sae_mult: int  # d_sae = d_sae_mult x d_in
    batch_size: int
    lr: float
    k_start: int
    k_end: int  # the final k of every variant (TopK's constant k)
    lambda_max: float  # the main dyncorr variants'
    lambda_sweep: tuple[float, ...]
    seeds: int
    sweep_seeds: int
    dead_after_tokens: int
    eval_windows: int
    stress_tokens: int  # training tokens of a stress run (the dying regime: 4x)
    extract_batch: int
    log_every: int
    chunk_rows: int = 4096  # store chunk
    # Evaluation rows: a separate store from documents the training store never read. (The
    # training store's own held-out chunk is its last, an edge chunk: 254 rows at the full scale.)
    heldout_tokens: int = 131_072
    # Rows of the held-out store the reconstruction and correlation metrics read (0: all). The
    # correlation metric pairs every two active latents of a row: O(rows x L0^2), hours on
    # 131k rows for the dense ReLU baseline (L0 ~1,700 of 4,608) on 2 cores.
    eval_rows: int = 32_768
    # dyncorr's penalty with k constant at k_end (no cosine k schedule), one seed each: the
    # penalty's effect on top of constant-k TopK, which the cosine variants cannot separate.
    constant_k_lambdas: tuple[float, ...] = ()


SCALES: dict[str, StudyScale] = {
    # >= 2M tokens, d_sae 8 x d_in, 3 seeds, lambda over 2.5 orders of magnitude (docs/results.md).
    "full": StudyScale(n_tokens=2_097_152, context_size=128, d_sae_mult=8, batch_size=2048, lr=1e-3, k_start=64,
                       k_end=16, lambda_max=1.0, lambda_sweep=(0.03, 0.1, 0.3, 3.0, 10.0), seeds=3, sweep_seeds=1,
                       dead_after_tokens=100_000, eval_windows=64, stress_tokens=262_144, extract_batch=16,
                       log_every=10, constant_k_lambdas=(1.0, 3.0)),
    # Minutes on 2 cores with a real model; seconds with embedded:tiny-gemma2 (the CI smoke test).
    "small": StudyScale(n_tokens=4096, context_size=64, d_sae_mult=8, batch_size=256, lr=3e-3, k_start=16,
                        k_end=4, lambda_max=1.0, lambda_sweep=(0.01, 0.1, 3.0, 10.0), seeds=3, sweep_seeds=1,
                        dead_after_tokens=1024, eval_windows=2, stress_tokens=1024, extract_batch=16, log_every=4,
                        chunk_rows=1024, heldout_tokens=1024, eval_rows=0, constant_k_lambdas=(1.0,)),
}


@dataclass(frozen=True)
class StudyConfig:
    out: Path
    model: str = "embedded:smollm2-135m"
    hook: str = ""  # default: the middle layer's resid_post
    dataset: str = PACKAGES_CORPUS
    scale: StudyScale = SCALES["full"]
    device: str = "auto"
    extract_dtype: str = "bfloat16"
    stress: bool = False
    probe_file: str = PROBES
    splice: bool = True
    # Massive activations (trainer/rows.py): at SmolLM2-135M's blocks.15 the BOS rows hold 97% of
    # the variance, and a few first-token rows most of the rest; the study leaves both out.
    exclude_bos: bool = True
    max_norm_ratio: float = 10.0


def middle_hook(model: str) -> str:
    """``blocks.{L // 2}.hook_resid_post`` for a model with L layers."""
    layers = _LAYERS.get(model)
    if layers is None:
        try:
            from transformers import AutoConfig

            layers = int(AutoConfig.from_pretrained(model).num_hidden_layers)
        except (OSError, ValueError, AttributeError) as e:
            raise ActcacheError(f"cannot read the layer count of {model} ({e}): pass --hook blocks.N.hook_resid_post") from None
    return f"blocks.{layers // 2}.hook_resid_post"


def _package_docstrings() -> Iterator[str]:
    """Docstrings of every installed package (site-packages), in a fixed order: ~10x the text of
    the standard library's, enough for millions of tokens offline."""
    import sysconfig

    from actcache.corpus import iter_docstrings_under

    yield from iter_docstrings_under(Path(sysconfig.get_paths()["purelib"]))


def build_corpus(path: Path, max_chars: int, docs: Callable[[], Iterator[str]] = _package_docstrings) -> Path:
    """Write at most ``max_chars`` of ``docs()`` as ``.jsonl`` (``text`` field), atomically; kept
    when it exists (a resumed study extracts from the same corpus)."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs():
            f.write(json.dumps({"text": d}) + "\n")
            n += len(d)
            if n >= max_chars:
                break
    os.replace(tmp, path)
    return path


def ensure_store(cfg: StudyConfig, hook: str, echo: Callable[[str], None]) -> Path:
    """The study's training store: kept when complete, resumed when interrupted, else extracted."""
    dataset = cfg.dataset
    if dataset == PACKAGES_CORPUS:
        # ~4 characters per token in English-heavy text; 2x margin so the corpus never runs short.
        dataset = str(build_corpus(cfg.out / CORPUS, 8 * cfg.scale.n_tokens))
    return _extracted(cfg, hook, cfg.out / STORE, dataset, cfg.scale.n_tokens, echo)


def ensure_heldout_store(cfg: StudyConfig, hook: str, train_store: Path, echo: Callable[[str], None]) -> Path:
    """The evaluation store: ``heldout_tokens`` from the documents of the training dataset that
    the training store never read (after its ``n_documents_read``), written to
    ``OUT/heldout-corpus.jsonl`` and extracted with the same settings."""
    from actcache.corpus import iter_documents
    from actcache.store import open_store

    src = open_store(train_store).attrs.get("dataset", {})
    n_read = int(src.get("n_documents_read") or 0)
    # The study's own corpus is found under OUT (the store records the path as it was given,
    # relative to wherever the study was started).
    dataset = str(cfg.out / CORPUS) if cfg.dataset == PACKAGES_CORPUS else (src.get("path") or cfg.dataset)
    if not n_read:
        raise ActcacheError(f"{train_store} does not record how many documents it read: re-extract it "
                            "with this version, or delete it")
    corpus = build_corpus(cfg.out / HELDOUT_CORPUS, 8 * cfg.scale.heldout_tokens,
                          lambda: itertools.islice(iter_documents(dataset, src.get("text_field") or "text"), n_read, None))
    if corpus.stat().st_size == 0:
        raise ActcacheError(f"the dataset {dataset} has no documents after the {n_read:,} the training store read: "
                            "pass a larger --dataset for a held-out evaluation")
    return _extracted(cfg, hook, cfg.out / HELDOUT_STORE, str(corpus), cfg.scale.heldout_tokens, echo)


def _extracted(cfg: StudyConfig, hook: str, path: Path, dataset: str, n_tokens: int,
               echo: Callable[[str], None]) -> Path:
    """Kept when complete, resumed when interrupted, else extracted."""
    from actcache.config import ExtractConfig
    from actcache.extract import extract
    from actcache.store import open_store

    xc = ExtractConfig(model=cfg.model, hooks=(hook,), out=str(path), dataset=dataset, context_size=cfg.scale.context_size,
                       n_tokens=n_tokens, batch_size=cfg.scale.extract_batch, dtype=cfg.extract_dtype,
                       device=cfg.device, chunk_rows=cfg.scale.chunk_rows, exclude_bos=cfg.exclude_bos)
    if path.exists():
        _check_same_extraction(path, xc)
        try:
            open_store(path)
            echo(f"store {path}: complete, kept")
            return path
        except ActcacheError:
            echo(f"store {path}: resuming the extraction")
            extract(xc, resume=True)
            return path
    echo(f"extracting {n_tokens:,} tokens of {cfg.model} at {hook} into {path}")
    extract(xc)
    return path


def _check_same_extraction(path: Path, xc: Any) -> None:
    """A store left by an earlier study with other settings is an error, never silently reused."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not readable as a group: extract's resume reports it
        return
    was = attrs.get("extract_config", {})
    diff = [f"{k} {was.get(k)!r} (now {getattr(xc, k)!r})" for k in ("model", "hooks", "context_size", "exclude_bos")
            if k in was and (list(was[k]) if k == "hooks" else was[k]) != (list(getattr(xc, k)) if k == "hooks"
                                                                            else getattr(xc, k))]
    if diff:
        raise ActcacheError(f"{path} was extracted with {', '.join(diff)}: delete it or pass another --out")


def main_variants(scale: StudyScale) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The main study's variants and their seed counts."""
    defs = {v: dict(VARIANTS[v]) for v in ("baseline", "topk", "topk-cosine", "dyncorr", "dyncorr-eps0")}
    seeds = {v: scale.seeds for v in defs}
    for lam in scale.lambda_sweep:
        name = f"dyncorr-lam{lam:g}"
        defs[name] = {"arch": "dyncorr", "eps": 1e-6, "lambda_max": lam}
        seeds[name] = scale.sweep_seeds
    for lam in scale.constant_k_lambdas:
        name = f"dyncorr-constk-lam{lam:g}"
        defs[name] = {"arch": "dyncorr", "eps": 1e-6, "lambda_max": lam, "k_start": scale.k_end, "k_end": scale.k_end}
        seeds[name] = scale.sweep_seeds
    return defs, seeds


def stress_variants(scale: StudyScale, d_in: int) -> dict[str, dict[str, Any]]:
    """eps 1e-6 vs eps 0 in each regime built to break the undamped covariance (docs/sae-math.md)."""
    t = scale.stress_tokens
    regimes: dict[str, dict[str, Any]] = {
        "default": {},  # the scale's settings, float32 covariance: the reference pair
        "cov64": {"cov_dtype": "float64"},
        "beta1": {"beta": 1.0},  # Sigma is the batch's covariance: no history smooths it
        "batch32": {"batch_size": 32},  # rare latents fire once per batch: S_ii ~ beta v^2 / B
        "lr10x": {"lr": 10 * scale.lr},
        # Long, wide, and AuxK off: many latents die and stay dead (rows of Sigma = eps e_i).
        "dying": {"d_sae": 16 * d_in, "aux_coef": 0.0, "n_tokens": 4 * t, "epochs": 1_000},
    }
    out = {}
    for name, fields in regimes.items():
        for tag, eps in (("eps1e-6", 1e-6), ("eps0", 0.0)):
            out[f"{name}-{tag}"] = {"arch": "dyncorr", "eps": eps, "n_tokens": t, **fields}
    return out


def _shared(scale: StudyScale, d_in: int) -> dict[str, Any]:
    return dict(d_sae=scale.d_sae_mult * d_in, batch_size=scale.batch_size, lr=scale.lr, k_start=scale.k_start,
                k_end=scale.k_end, lambda_max=scale.lambda_max, dead_after_tokens=scale.dead_after_tokens)


def run_study(cfg: StudyConfig, *, echo: Callable[[str], None], progress: ProgressFactory | None = None,
              on_comparison: Callable[[Any], None] | None = None) -> Path:
    """Extract (or reuse) the store, train + evaluate + compare every variant, then the stress
    regimes; returns the path of ``study.md``."""
    from actcache.store import open_store

    hook = cfg.hook or middle_hook(cfg.model)  # before anything is written: a bad model is a one-line error
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "study.json").write_text(json.dumps({**asdict(cfg), "out": str(cfg.out)}, indent=2, default=str))
    store = ensure_store(cfg, hook, echo)
    heldout = ensure_heldout_store(cfg, hook, store, echo)
    d_in = open_store(store).d_model
    s = cfg.scale
    on_heldout = {"store": str(heldout), "split": "all", "max_rows": s.eval_rows}
    # Epochs are generous: n_tokens 0 means one pass over the train split, the budget is that pass.
    common = dict(hook=hook, device=cfg.device, echo=echo, progress=progress, on_comparison=on_comparison,
                  train_overrides={"log_every": s.log_every, "max_norm_ratio": cfg.max_norm_ratio},
                  eval_options={"splice": cfg.splice, "n_windows": s.eval_windows, "probe_file": cfg.probe_file or None,
                                **on_heldout})
    defs, seeds = main_variants(s)
    run_experiment(store, cfg.out, seeds=s.seeds, variants=tuple(defs), definitions=defs, seeds_of=seeds,
                   **_shared(s, d_in), **common)
    dirs = [cfg.out / RUNS / f"{v}-s{i}" for v in defs for i in range(seeds[v])]
    groups = {"main study": (cfg.out, dirs)}
    if cfg.stress:
        sdefs = stress_variants(s, d_in)
        # No splice or probing: the stress table is about the training dynamics.
        run_experiment(store, cfg.out / STRESS, seeds=1, variants=tuple(sdefs), definitions=sdefs,
                       **_shared(s, d_in), **{**common, "eval_options": {"splice": False, **on_heldout}})
        groups["stress regimes"] = (cfg.out / STRESS, [cfg.out / STRESS / RUNS / f"{v}-s0" for v in sdefs])
    path = cfg.out / SUMMARY
    text = [f"# Study: {cfg.model} {hook}, {s.n_tokens:,} tokens, d_sae {s.d_sae_mult} x {d_in}\n"]
    for title, (root, run_dirs) in groups.items():
        text.append(f"## {title} ({root / REPORT / 'report.md'})\n")
        text.append(summary_table(run_dirs))
        if title == "main study":
            points, flat_k = sweep_points(cfg.out, s), constant_k_points(cfg.out, s)
            plot = plot_sweep(points, reference=_finished(cfg.out / RUNS, "topk", s.seeds),
                              path=cfg.out / REPORT / SWEEP_PLOT, constant_k=flat_k)
            text.append("## the penalty's strength: lambda_max from 0 (topk-cosine) up\n")
            text.append(sweep_table(points) + (f"\n![sweep]({plot.relative_to(cfg.out)})\n" if plot else ""))
            if flat_k:
                text.append(f"## the penalty over constant k = {s.k_end} (lambda 0: topk)\n")
                text.append(sweep_table(flat_k))
            probes = probe_table(run_dirs)
            if probes:
                text.append("## sparse probing per task (SAE latents vs the raw activations)\n")
                text.append(probes)
    path.write_text("\n".join(text))
    return path


# -- the summary: mean +- std over seeds per variant ------------------------------------------
_COLS = [("explained_variance", "EV", ".4f"), ("mse", "MSE", ".4g"), ("l0", "L0", ".1f"),
         ("dead_fraction", "dead", ".3f"), ("ce_loss_score", "CE score", ".4f"), ("kl_div_with_sae", "KL", ".4g"),
         ("probe_top1", "probe top-1", ".3f"), ("mean_sq_corr_coactive", "mean R² co-active", ".4g"),
         ("frac_coactive_abs_corr_gt_0_5", "share abs(R) > 0.5", ".4f"), ("decoder_redundancy", "dec. redundancy", ".4f"),
         ("nonfinite_events", "NaN/Inf", ".0f"), ("rollbacks", "rollbacks", ".0f"),
         ("sigma_min_eig_min", "min eig Σ", ".3g"), ("sigma_condition_max", "max cond Σ", ".3g"),
         ("step_s", "s/step", ".3g")]


def run_numbers(run_dir: Path) -> dict[str, float]:
    """One run's final, decorrelation and stability numbers (NaN where not measured)."""
    from trainer.report.compare import final_metrics
    from trainer.report.runs import load_run
    from trainer.report.stability import stability

    run = load_run(run_dir)
    out = dict(final_metrics(run))
    decor = (run.eval or {}).get("eval_result_metrics", {}).get("decorrelation", {})
    for k in ("mean_sq_corr_coactive", "frac_coactive_abs_corr_gt_0_5", "decoder_redundancy"):
        out[k] = float(decor[k]) if decor.get(k) is not None else math.nan
    out.update(stability(run.records, run.counters()))
    summ = run.summary or {}
    out["step_s"] = summ["wall_s"] / summ["steps"] if summ.get("steps") else math.nan
    return out


def _variant(run_dir: Path) -> str:
    return run_dir.name.rsplit("-s", 1)[0]


def summary_table(run_dirs: list[Path]) -> str:
    """Markdown: one row per variant, ``mean +- std`` (sample std) over its finished seeds."""
    by: dict[str, list[dict[str, float]]] = {}
    for d in run_dirs:
        if (d / "summary.json").exists():
            by.setdefault(_variant(d), []).append(run_numbers(d))
    head = "| variant | seeds | " + " | ".join(h for _, h, _ in _COLS) + " |"
    lines = [head, "|" + "---|" * (len(_COLS) + 2)]
    for v, rows in by.items():
        cells = []
        for key, _, spec in _COLS:
            xs = np.array([r[key] for r in rows], dtype=np.float64)
            xs = xs[~np.isnan(xs)]
            if not len(xs):
                cells.append("")
            elif len(xs) == 1 or not np.isfinite(xs).all():
                cells.append(format(float(xs.mean()) if np.isfinite(xs).all() else float(xs.max()), spec))
            else:
                cells.append(f"{format(float(xs.mean()), spec)} ± {format(float(xs.std(ddof=1)), spec)}")
        lines.append(f"| {v} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- sparse probing, per task: the raw activations beside each variant's SAE -------------------
PROBE_KS = (1, 5, 20)


def _probe_details(run_dir: Path) -> list[dict[str, Any]]:
    """The per-task probing results of the run's ``eval.json`` ([] when not evaluated or not probed)."""
    path = A.run_paths(run_dir).eval
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("eval_result_details") or [])


def probe_table(run_dirs: list[Path], ks: tuple[int, ...] = PROBE_KS) -> str:
    """Markdown: per probing task, one row for the raw activations (``llm``; the same texts and
    model in every run) and one per variant's SAE latents, top-k accuracy as ``mean +- std`` over
    the variant's seeds, and the binomial standard error of one run's top-1 accuracy on the
    task's test texts, ``sqrt(a (1 - a) / n)``: differences below ~2 SE are test-set noise. ""
    when no run was probed."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    n_test: dict[str, int] = {}
    for d in run_dirs:
        for det in _probe_details(d):
            task = det["dataset_name"]
            n_test[task] = det["n_test"]
            by_task.setdefault(task, {}).setdefault(_variant(d), []).append(det)
    if not by_task:
        return ""
    cols = [f"top-{k}" for k in ks] + ["all latents"]
    keys = [f"_top_{k}_test_accuracy" for k in ks] + ["_test_accuracy"]
    lines = ["| task | features | runs | n test | " + " | ".join(cols) + " | SE of one run's top-1 |",
             "|" + "---|" * (len(cols) + 5)]
    for task, variants in by_task.items():
        first = next(iter(variants.values()))
        rows = [("llm (raw activations)", "llm", first[:1])] + [(v, "sae", dets) for v, dets in variants.items()]
        for label, prefix, dets in rows:
            cells = [_mean_std([math.nan if x.get(prefix + key) is None else float(x[prefix + key]) for x in dets],
                               ".3f") for key in keys]
            top1 = [float(x[f"{prefix}_top_{ks[0]}_test_accuracy"]) for x in dets
                    if x.get(f"{prefix}_top_{ks[0]}_test_accuracy") is not None]
            se = math.sqrt(np.mean(top1) * (1 - np.mean(top1)) / n_test[task]) if top1 and n_test[task] else math.nan
            lines.append(f"| {task} | {label} | {len(dets)} | {n_test[task]} | " + " | ".join(cells)
                         + f" | {'' if math.isnan(se) else format(se, '.3f')} |")
    return "\n".join(lines) + "\n"


# -- the penalty sweep: one curve from lambda 0 (topk-cosine) through the main dyncorr to the sweep --
SWEEP_PLOT = "sweep.png"


def _finished(runs: Path, variant: str, n: int) -> list[Path]:
    return [d for d in (runs / f"{variant}-s{i}" for i in range(n)) if (d / "summary.json").exists()]


def sweep_points(out: Path, scale: StudyScale) -> list[tuple[float, list[dict[str, float]]]]:
    """``(lambda_max, [run numbers per finished seed])`` in increasing lambda: lambda 0 is
    ``topk-cosine``, ``scale.lambda_max`` the main ``dyncorr`` (eps 1e-6), the rest the sweep."""
    runs = out / RUNS
    by = {0.0: _finished(runs, "topk-cosine", scale.seeds), scale.lambda_max: _finished(runs, "dyncorr", scale.seeds)}
    for lam in scale.lambda_sweep:
        by.setdefault(lam, []).extend(_finished(runs, f"dyncorr-lam{lam:g}", scale.sweep_seeds))
    return [(lam, [run_numbers(d) for d in dirs]) for lam, dirs in sorted(by.items()) if dirs]


def constant_k_points(out: Path, scale: StudyScale) -> list[tuple[float, list[dict[str, float]]]]:
    """The same for the penalty over constant k (``dyncorr-constk-lam*``): lambda 0 is ``topk``
    (TopK at k_end: what dyncorr at constant k and lambda 0 trains). [] without constant-k runs."""
    runs = out / RUNS
    by = {lam: _finished(runs, f"dyncorr-constk-lam{lam:g}", scale.sweep_seeds) for lam in scale.constant_k_lambdas}
    if not any(by.values()):
        return []
    by[0.0] = _finished(runs, "topk", scale.seeds)
    return [(lam, [run_numbers(d) for d in dirs]) for lam, dirs in sorted(by.items()) if dirs]


_SWEEP_COLS = [("explained_variance", "EV", ".4f"), ("dead_fraction", "dead", ".3f"),
               ("mean_sq_corr_coactive", "mean R² co-active", ".4g"),
               ("frac_coactive_abs_corr_gt_0_5", "share abs(R) > 0.5", ".4f"),
               ("decoder_redundancy", "dec. redundancy", ".4f"), ("ce_loss_score", "CE score", ".4f"),
               ("probe_top1", "probe top-1", ".3f")]


def _mean_std(xs: list[float], spec: str) -> str:
    a = np.array([x for x in xs if not math.isnan(x)], dtype=np.float64)
    if not len(a):
        return ""
    if len(a) == 1:
        return format(float(a[0]), spec)
    return f"{format(float(a.mean()), spec)} ± {format(float(a.std(ddof=1)), spec)}"


def sweep_table(points: list[tuple[float, list[dict[str, float]]]]) -> str:
    """Markdown: one row per lambda_max, mean +- std over its seeds."""
    lines = ["| lambda_max | seeds | " + " | ".join(h for _, h, _ in _SWEEP_COLS) + " |",
             "|" + "---|" * (len(_SWEEP_COLS) + 2)]
    for lam, rows in points:
        cells = [_mean_std([r[k] for r in rows], spec) for k, _, spec in _SWEEP_COLS]
        lines.append(f"| {lam:g} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[tuple[float, list[dict[str, float]]]], *, reference: list[Path], path: Path,
               constant_k: list[tuple[float, list[dict[str, float]]]] = ()) -> Path | None:
    """Two panels: held-out mean R² against lambda_max (lambda 0 drawn at the left edge), and
    the Pareto view, EV against mean R², one marker per run, labelled with its lambda; constant-k
    TopK (``reference``) as a grey star; ``constant_k`` (the penalty over constant k) in a second
    colour. None without points."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def finite(pp: Any) -> list[tuple[float, float, float]]:
        return [(lam, r["mean_sq_corr_coactive"], r["explained_variance"]) for lam, rows in pp for r in rows
                if np.isfinite(r["mean_sq_corr_coactive"]) and np.isfinite(r["explained_variance"])]

    pts, cpts = finite(points), finite(constant_k)
    if not pts:
        return None
    positive = sorted({lam for lam, _, _ in pts + cpts if lam > 0})
    zero_at = positive[0] / 10 if positive else 1.0  # lambda 0 on a log axis: one decade left of the first
    fig = Figure(figsize=(10, 4.2), dpi=110)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for series, colour, marker, label in ((points, "C0", "o", f"k cosine {'->'} k_end"),
                                          (constant_k, "C1", "s", "k constant (lambda 0: topk)")):
        for lam, r2, ev in finite(series):
            x = lam if lam > 0 else zero_at
            ax1.scatter([x], [r2], color=colour, marker=marker, s=22)
            ax2.scatter([r2], [ev], color=colour, marker=marker, s=22)
            ax2.annotate(f"{lam:g}", (r2, ev), fontsize=7, xytext=(3, 3), textcoords="offset points")
        means = [(lam if lam > 0 else zero_at, float(np.nanmean([r["mean_sq_corr_coactive"] for r in rows])))
                 for lam, rows in series]
        if means:
            ax1.plot(*zip(*means), color=colour, alpha=0.6, label=label)
    if cpts:
        ax1.legend(fontsize=7)
    ref = [run_numbers(d) for d in reference]
    if ref:
        ax1.axhline(float(np.nanmean([r["mean_sq_corr_coactive"] for r in ref])), color="grey", ls=":", lw=1)
        ax2.scatter([r["mean_sq_corr_coactive"] for r in ref], [r["explained_variance"] for r in ref], color="grey",
                    marker="*", s=60, label="topk, constant k")
    ax2.xaxis.set_major_locator(MaxNLocator(5))
    ax1.set_xscale("log")
    ax1.set_xticks([zero_at, *positive], ["0", *(f"{lam:g}" for lam in positive)])
    ax1.set_xlabel("lambda_max")
    ax1.set_ylabel("held-out mean R² over co-active pairs")
    ax1.set_title("decorrelation vs penalty strength (dotted: topk, mean)")
    ax2.set_xlabel("held-out mean R² over co-active pairs")
    ax2.set_ylabel("held-out explained variance")
    ax2.set_title("reconstruction vs decorrelation (labels: lambda_max)")
    if ref:
        ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def preset(name: str, **overrides: Any) -> StudyScale:
    """A preset by name, with fields replaced (``--seeds``)."""
    if name not in SCALES:
        raise ActcacheError(f"--scale {name!r}: use one of {', '.join(SCALES)}")
    return replace(SCALES[name], **{k: v for k, v in overrides.items() if v is not None})
