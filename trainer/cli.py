"""The ``sae`` command line: thin typer commands over ``trainer`` (and, later, ``profiling``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from actcache.cli_support import console, fail, new_app
from actcache.errors import ActcacheError
from trainer.config import RunConfig, SAEConfig, TrainConfig
from trainer.loader import LoaderConfig
from trainer.saes import ARCHS

app = new_app("Train sparse autoencoders on actcache stores.")
_S, _T, _L = SAEConfig(), TrainConfig(), LoaderConfig()


class RichTrainProgress:
    def __init__(self) -> None:
        self._bar = Progress(TextColumn("[bold]train"), BarColumn(bar_width=16),
                             TextColumn("{task.completed:,.0f}/{task.total:,.0f}"), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self._task = None

    def start(self, total_steps: int, done_steps: int, batch_size: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("train", total=total_steps, completed=done_steps, info="")

    def update(self, step: int, r: dict[str, Any]) -> None:
        info = (f"{r['tokens_per_s']:,.0f} tok/s loss {r['loss']:.3g} L0 {r['l0']:.0f} "
                f"EV {r['explained_variance']:.3f} dead {r['dead_fraction']:.0%}")
        self._bar.update(self._task, completed=step, info=info)

    def stop(self) -> None:
        self._bar.stop()


def _flat_from_cli(ctx: typer.Context, options: dict[str, Any], config: Optional[Path]) -> dict[str, Any]:
    """--config JSON first, then every option the user actually set on the command line."""
    flat: dict[str, Any] = {}
    if config is not None:
        try:
            flat.update(json.loads(config.read_text()))
        except (OSError, ValueError) as e:
            raise ActcacheError(f"cannot read --config {config}: {e}") from None
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        if config is None or (source is not None and source.name != "DEFAULT"):
            flat[name] = value
    return flat


@app.command()
def train(
    ctx: typer.Context,
    store: Annotated[str, typer.Option(help="Activation store written by actcache extract.")] = "",
    hook: Annotated[str, typer.Option(help="Hook to train on; default: the store's only hook.")] = "",
    out: Annotated[str, typer.Option(help="Run directory.")] = "",
    arch: Annotated[str, typer.Option(help=f"Architecture: {', '.join(ARCHS)}.")] = _S.arch,
    d_sae: Annotated[int, typer.Option(help="Latents; 0 = d_in.")] = _S.d_sae,
    k: Annotated[int, typer.Option(help="Active latents per token (topk).")] = _S.k,
    k_start: Annotated[int, typer.Option(help="k at the start of the cosine schedule (dyncorr).")] = _S.k_start,
    k_end: Annotated[int, typer.Option(help="k at the end of the cosine schedule (dyncorr).")] = _S.k_end,
    sparsity_penalty: Annotated[float, typer.Option(help="L1 coefficient (baseline).")] = _S.sparsity_penalty,
    lambda_max: Annotated[float, typer.Option(help="Final correlation-penalty weight (dyncorr).")] = _S.lambda_max,
    beta: Annotated[float, typer.Option(help="EMA rate of the latent statistics (dyncorr).")] = _S.beta,
    eps: Annotated[float, typer.Option(help="Covariance damping; 0 = none (ablation).")] = _S.eps,
    dead_after_tokens: Annotated[int, typer.Option(help="Tokens without firing before a latent counts as dead.")] = _S.dead_after_tokens,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = _T.lr,
    batch_size: Annotated[int, typer.Option(help="Tokens per step.")] = _T.batch_size,
    n_tokens: Annotated[int, typer.Option(help="Training tokens; 0 = one pass over the train split.")] = _T.n_tokens,
    epochs: Annotated[int, typer.Option(help="Passes over the train split allowed.")] = _T.epochs,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = _T.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = _T.device,
    normalize: Annotated[str, typer.Option(help="none or expected_average_only_in.")] = _L.normalize,
    heldout_chunks: Annotated[int, typer.Option(help="Last store chunks kept out of training, for evaluation.")] = _L.heldout_chunks,
    shuffle_buffer_mb: Annotated[float, typer.Option(help="RAM for the shuffle buffer.")] = _L.shuffle_buffer_mb,
    log_every: Annotated[int, typer.Option(help="Steps between metrics records.")] = _T.log_every,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = _T.checkpoint_every,
    config: Annotated[Optional[Path], typer.Option(help="run.json with any of these fields (options given here win).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train an SAE on one hook of a store; writes config, metrics, checkpoints, weights and a SAELens export."""
    options = {k: v for k, v in locals().items() if k not in ("ctx", "config", "resume", "overwrite", "quiet")}
    from trainer.train import Interrupted, train as run_train

    progress = None if quiet else RichTrainProgress()
    try:
        cfg = RunConfig.from_flat(_flat_from_cli(ctx, options, config))
        summary = run_train(cfg, resume=resume, overwrite=overwrite, progress=progress)
    except ActcacheError as e:
        fail(str(e))
    except Interrupted:
        fail("interrupted: a checkpoint was written; continue with the same command plus --resume", 130)
    finally:
        if progress:
            progress.stop()
    h = summary["heldout"]
    typer.echo(f"{summary['arch']}: {summary['steps']} steps, {summary['tokens']:,} tokens | held-out explained variance "
               f"{h['explained_variance']:.4f}, L0 {h['l0']:.2f}, dead fraction {h['dead_fraction']:.4f} | "
               f"non-finite events {summary['nonfinite_events']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    format: Annotated[str, typer.Option(help="Export format: saelens.")] = "saelens",
) -> None:
    """Export a trained SAE (SAELens: cfg.json + sae_weights.safetensors)."""
    from trainer import artifacts as A
    from trainer.export import export_saelens

    if format != "saelens":
        fail(f"unknown format {format!r}: use saelens")
    weights = A.run_paths(run_dir).weights
    if not weights.exists():
        fail(f"{run_dir} has no {A.WEIGHTS}: train it to the end first (sae train ... --resume)")
    typer.echo(str(export_saelens(weights, out)))


from profiling.cli import profile_memory  # noqa: E402  (profiling builds on trainer; registered here)

app.command("profile-memory")(profile_memory)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
