"""``sae compare`` and ``sae experiment``: typer commands (registered by ``trainer/cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table as RichTable

from actcache.cli_support import console, fail
from actcache.errors import ActcacheError
from trainer.report.experiment import DEFAULT_VARIANTS, VARIANTS
from trainer.report.study import PROBES


def _print_tables(tables) -> None:
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left", show_edge=False, pad_edge=False)
        for i, c in enumerate(t.columns):
            rt.add_column(c, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for row in t.rows:
            rt.add_row(*row)
        console.print(rt)


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by sae train (same hook and d_in).")],
    out: Annotated[Path, typer.Option(help="Report directory: report.md, compare.json and the PNG plots.")],
    plots: Annotated[bool, typer.Option(help="Draw the training-curve plots.")] = True,
) -> None:
    """Compare runs: final eval metrics and stability metrics (table + report.md with plots)."""
    from trainer.report.compare import compare as run_compare

    try:
        result = run_compare(run_dirs, out, plots=plots)
    except ActcacheError as e:
        fail(str(e))
    _print_tables(result.tables)
    typer.echo(str(result.report))


def _progress_factory():
    from trainer.progress import RichTrainProgress

    return lambda name, i, n: RichTrainProgress(f"{name} ({i + 1}/{n})")


def experiment(
    store: Annotated[str, typer.Option(help="Activation store written by actcache extract.")],
    out: Annotated[Path, typer.Option(help="Experiment directory: runs/<variant>-s<seed>/ and report/.")],
    seeds: Annotated[int, typer.Option(help="Seeds per variant (0..N-1).")] = 1,
    variants: Annotated[str, typer.Option(help=f"Comma-separated subset of: {', '.join(VARIANTS)}.")] = ",".join(DEFAULT_VARIANTS),
    hook: Annotated[str, typer.Option(help="Hook to train on; default: the store's only hook.")] = "",
    n_tokens: Annotated[int, typer.Option(help="Training tokens per run; 0 = one pass over the train split.")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the train split allowed.")] = 1,
    d_sae: Annotated[int, typer.Option(help="Latents; 0 = d_in.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Tokens per step.")] = 4096,
    lr: Annotated[float, typer.Option(help="Peak learning rate (every variant).")] = 3e-4,
    k_start: Annotated[int, typer.Option(help="dyncorr: k at the start of the cosine schedule.")] = 128,
    k_end: Annotated[int, typer.Option(help="dyncorr: final k; topk uses k = k_end.")] = 32,
    lambda_max: Annotated[float, typer.Option(help="dyncorr: final correlation-penalty weight.")] = 1.0,
    sparsity_penalty: Annotated[float, typer.Option(help="baseline: L1 coefficient (the seed's run 0: 0.04).")] = 0.04,
    dead_after_tokens: Annotated[int, typer.Option(help="Tokens without firing before a latent counts as dead.")] = 1_000_000,
    normalize: Annotated[str, typer.Option(help="none or expected_average_only_in.")] = "expected_average_only_in",
    log_every: Annotated[int, typer.Option(help="Steps between metrics records (the curves' resolution).")] = 10,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    eval: Annotated[bool, typer.Option(help="Run sae eval on each run before comparing.")] = True,
    splice: Annotated[bool, typer.Option(help="sae eval: splice the SAE into the store's model for CE loss and KL.")] = True,
    eval_windows: Annotated[int, typer.Option(help="sae eval: held-out windows for the spliced CE loss / KL.")] = 64,
    probe_file: Annotated[str, typer.Option(help="sae eval: labelled texts for sparse probing (e.g. embedded:stdlib-packages); empty = none.")] = "",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train baseline, topk, dyncorr (eps 1e-6) and dyncorr (eps 0) with the same seeds and tokens; eval; compare.

    Re-running it skips finished runs and resumes unfinished ones."""
    from trainer.report.experiment import run_experiment
    from trainer.train import Interrupted

    try:
        report = run_experiment(
            store, out, seeds=seeds, variants=tuple(v.strip() for v in variants.split(",") if v.strip()), hook=hook,
            n_tokens=n_tokens, epochs=epochs, d_sae=d_sae, batch_size=batch_size, lr=lr, k_start=k_start, k_end=k_end,
            lambda_max=lambda_max, sparsity_penalty=sparsity_penalty, dead_after_tokens=dead_after_tokens,
            normalize=normalize, device=device, evaluate=eval, train_overrides={"log_every": log_every},
            eval_options={"splice": splice, "n_windows": eval_windows, "probe_file": probe_file or None},
            progress=None if quiet else _progress_factory(), echo=lambda m: console.print(m, highlight=False),
            on_comparison=lambda c: _print_tables(c.tables))
    except ActcacheError as e:
        fail(str(e))
    except Interrupted:
        fail("interrupted: a checkpoint was written; run the same command again to continue", 130)
    typer.echo(f"report: {report}")


def study(
    out: Annotated[Path, typer.Option(help="Study directory: store.zarr, runs/, report/, stress/, study.md.")] = Path("study-out"),
    scale: Annotated[str, typer.Option(help="full (>= 2M tokens, d_sae 8 x d_in, 3 seeds; hours on 2 CPU cores) or small (minutes).")] = "full",
    model: Annotated[str, typer.Option(help="Model to extract from (embedded name, local dir or hub id, e.g. google/gemma-2-2b).")] = "embedded:smollm2-135m",
    hook: Annotated[str, typer.Option(help="Hook; default: the middle layer's blocks.N.hook_resid_post.")] = "",
    dataset: Annotated[str, typer.Option(help="Corpus for actcache extract; default: docstrings of the installed packages, written to OUT/corpus.jsonl.")] = "packages-docstrings",
    seeds: Annotated[int, typer.Option(help="Seeds of the main variants; 0 = the scale's (3).")] = 0,
    stress: Annotated[bool, typer.Option(help="Also run the eps 1e-6 vs eps 0 stress regimes (OUT/stress/).")] = True,
    probe_file: Annotated[str, typer.Option(help="sae eval: labelled texts for sparse probing (comma-separated); empty = none.")] = PROBES,
    splice: Annotated[bool, typer.Option(help="sae eval: CE loss and KL with the SAE spliced into the model.")] = True,
    exclude_bos: Annotated[bool, typer.Option(help="Leave BOS rows out of the store (attention sinks: most of the variance at middle layers).")] = True,
    max_norm_ratio: Annotated[float, typer.Option(help="Every run drops rows with norm > this x the batch median (massive activations); 0 = keep all.")] = 10.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (extraction and training).")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The stability study: extract a store at a middle layer, then train, evaluate and compare baseline, TopK,
    TopK with the cosine k schedule, dyncorr (eps 1e-6 and 0) over seeds and a lambda_max sweep (docs/results.md).

    Re-running it keeps the store and the finished runs and resumes the rest."""
    from trainer.report.study import StudyConfig, preset, run_study
    from trainer.train import Interrupted

    try:
        cfg = StudyConfig(out=out, model=model, hook=hook, dataset=dataset, device=device, stress=stress,
                          probe_file=probe_file, splice=splice, exclude_bos=exclude_bos, max_norm_ratio=max_norm_ratio,
                          scale=preset(scale, seeds=seeds or None))
        path = run_study(cfg, echo=lambda m: console.print(m, highlight=False),
                         progress=None if quiet else _progress_factory(), on_comparison=lambda c: _print_tables(c.tables))
    except ActcacheError as e:
        fail(str(e))
    except Interrupted:
        fail("interrupted: a checkpoint was written; run the same command again to continue", 130)
    typer.echo(path.read_text())
    typer.echo(f"summary: {path}")
