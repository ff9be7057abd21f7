"""``sae eval``: the typer command (registered by ``trainer/cli.py`` with ``register(app)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from actcache.cli_support import console, fail
from actcache.errors import ActcacheError
from trainer.evaluation.data import SPLITS
from trainer.evaluation.probe_data import PROBE_CODE, PROBE_STDLIB
from trainer.evaluation.probing import KS


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"sae eval: {result['eval_config']['split']} of {result['eval_config']['store']}")
    table.add_column("group")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for group, values in result["eval_result_metrics"].items():
        if group.startswith("sparse_probing"):
            continue
        for name, v in values.items():
            table.add_row(group, name, _fmt(v))
    console.print(table)
    metrics = result["eval_result_metrics"]
    by_source = metrics.get("sparse_probing_by_source") or {}
    if len(by_source) > 1:
        for name, sp in by_source.items():
            console.print(_probing_table(sp, name))
    if metrics.get("sparse_probing"):
        console.print(_probing_table(metrics["sparse_probing"], "all sources" if len(by_source) > 1 else ""))


def _acc(sp: dict[str, Any], key: str) -> str:
    a, se = sp.get(key), sp.get(f"{key}_stderr")
    return "n/a" if a is None else f"{a:.3f} ± {se:.3f}" if se is not None else f"{a:.3f}"


def _probing_table(sp: dict[str, Any], source: str = ""):
    """Raw activations (LLM) beside the SAE for each k, mean over tasks ± binomial standard error."""
    from rich.table import Table

    table = Table(title=f"sparse probing{' of ' + source if source else ''}: test accuracy over {sp['n_tasks']} "
                        f"task(s), {sp['n_test']} test texts (± binomial standard error)")
    table.add_column("features")
    table.add_column("LLM (raw activations)", justify="right")
    table.add_column("SAE latents", justify="right")
    for label, infix in [("all", ""), *((f"top {k}", f"top_{k}_") for k in KS)]:
        table.add_row(label, _acc(sp, f"llm_{infix}test_accuracy"), _acc(sp, f"sae_{infix}test_accuracy"))
    return table


def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (sae train --out).")],
    store: Annotated[Optional[str], typer.Option(help="Store to evaluate on; default: the training store.")] = None,
    split: Annotated[str, typer.Option(help=f"Chunks of the store: {', '.join(SPLITS)} (with the run's heldout_chunks).")] = "heldout",
    probe_file: Annotated[Optional[str], typer.Option(help=f"Labelled .jsonl/.csv (text, label) for sparse probing, or {PROBE_STDLIB} or {PROBE_CODE}; several comma-separated; each split 80/20 unless --probe-test-file is given.")] = None,
    probe_test_file: Annotated[Optional[str], typer.Option(help="Labelled test set: the probes train on (one) --probe-file and test on this (SAEBench's protocol).")] = None,
    probe_text_field: Annotated[str, typer.Option(help="Text column of --probe-file.")] = "text",
    probe_label_field: Annotated[str, typer.Option(help="Label column of --probe-file.")] = "label",
    probe_max_per_class: Annotated[int, typer.Option(help="Texts per class at most (seeded sample); 0 = all.")] = 200,
    splice: Annotated[bool, typer.Option(help="CE loss and KL with the SAE spliced into the store's model.")] = True,
    n_windows: Annotated[int, typer.Option(help="Windows of the split for the spliced forward.")] = 64,
    batch_windows: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    max_rows: Annotated[int, typer.Option(help="Rows for the reconstruction and decorrelation metrics; 0 = the whole split.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the probing samples and train/test splits.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Where to write the results; default RUN_DIR/eval.json.")] = None,
) -> None:
    """Evaluate a trained SAE: reconstruction, sparsity, latent decorrelation, spliced CE loss / KL, sparse probing -> eval.json."""
    from trainer import artifacts as A
    from trainer.evaluation.run import evaluate_run

    try:
        result = evaluate_run(run_dir, store=store, split=split, probe_file=probe_file,
                              probe_test_file=probe_test_file, splice=splice,
                              n_windows=n_windows, device=device, batch_windows=batch_windows, max_rows=max_rows,
                              probe_text_field=probe_text_field, probe_label_field=probe_label_field,
                              probe_max_per_class=probe_max_per_class, seed=seed, out=out)
    except ActcacheError as e:
        fail(str(e))
    for w in result["warnings"]:
        console.print(f"[bold yellow]warning:[/bold yellow] {w}", highlight=False, soft_wrap=True)
    _render(result)
    typer.echo(str(out or A.run_paths(run_dir).eval))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_run)
