"""The trainer's typer commands (train, export, eval, compare, experiment, study); ``sae_cli`` adds
``profile-memory`` from ``profiling``, which builds on this package."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from actcache.cli_support import console, fail, new_app
from actcache.errors import ActcacheError
from trainer.config import RunConfig, SAEConfig, TrainConfig
from trainer.loader import LoaderConfig
from trainer.progress import RichTrainProgress
from trainer.saes import ARCHS

app = new_app("Train sparse autoencoders on actcache stores.")
_S, _T, _L = SAEConfig(), TrainConfig(), LoaderConfig()


def _flat_from_cli(ctx: typer.Context, options: dict[str, Any], config: Optional[Path]) -> dict[str, Any]:
    """--config JSON first, then every option the user actually set on the command line."""
    flat: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise ActcacheError(f"cannot read --config {config}: {e}") from None
        if not isinstance(loaded, dict):
            raise ActcacheError(f"--config {config} holds a JSON {type(loaded).__name__}, not an object of fields: "
                                'write {"field": value, ...}')
        flat.update(loaded)
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        if config is None or (source is not None and source.name != "DEFAULT"):
            flat[name] = value
    return flat


def _bases(ctx: typer.Context, options: dict[str, Any], configs: list[Path]) -> list[dict[str, Any]]:
    """A flat config per --config file (one from the options alone without any); with several
    files and --out given, each run goes to OUT/<file stem>."""
    if not configs:
        return [_flat_from_cli(ctx, options, None)]
    bases = []
    for path in configs:
        flat = _flat_from_cli(ctx, options, path)
        if len(configs) > 1 and options["out"]:
            flat["out"] = str(Path(options["out"]) / path.stem)
        bases.append(flat)
    return bases


def _launch_torchrun(ctx: typer.Context, nproc: int, options: dict[str, Any], configs: list[Path], sweeps: list[str],
                     flags: dict[str, bool]) -> int:
    """``sae train --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m trainer train ...``."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "trainer", "train"]
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            args += [f"--{name.replace('_', '-')}", str(value)]
    args += [a for p in configs for a in ("--config", str(p))] + [a for w in sweeps for a in ("--sweep", w)]
    from trainer.train import handle_signals

    proc = subprocess.Popen(args + [f"--{name}" for name, on in flags.items() if on])

    def forward(signum: int, frame: Any) -> None:  # Ctrl-C reaches torchrun and the ranks directly
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    with handle_signals(forward):  # the ranks checkpoint and stop; wait for them
        return proc.wait()


def _fail_once(message: str, code: int, main_rank: bool) -> None:
    """Under torchrun every rank raises the same error: rank 0 prints it."""
    if main_rank:
        fail(message, code)
    raise typer.Exit(code)


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
    max_norm_ratio: Annotated[float, typer.Option(help="Drop rows with norm > this x the batch's median (massive "
                                                       "activations, e.g. 10); 0 = keep all.")] = _T.max_norm_ratio,
    log_every: Annotated[int, typer.Option(help="Steps between metrics records.")] = _T.log_every,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = _T.checkpoint_every,
    config: Annotated[Optional[list[Path]], typer.Option(
        help="run.json with any of these fields (options given here win). Repeat it to train several runs "
             "together from one read of the store, in OUT/<file stem> when --out is given.")] = None,
    sweep: Annotated[Optional[list[str]], typer.Option(
        help="FIELD=V1,V2,...: one run per value, all trained together from one read of the store, each with its "
             "own SAE, optimiser and run dir OUT/FIELD=V (repeat for a grid: --sweep d_sae=2304,16384 "
             "--sweep arch=baseline,dyncorr; hook=... reads each hook once).")] = None,
    nproc: Annotated[int, typer.Option(
        help="Data-parallel processes: launches torchrun (gloo on CPU, nccl with one GPU each); --batch-size "
             "stays the global batch, each process reads batch-size / nproc rows of it.")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue the run(s) in --out from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run(s) in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train an SAE on one hook of a store; writes config, metrics, checkpoints, weights and a SAELens export.

    Several --config files and --sweep values train several SAEs from one pass over the store
    (the runs must agree on store, batch size, seed, tokens and loader settings)."""
    options = {k: v for k, v in locals().items()
               if k not in ("ctx", "config", "sweep", "nproc", "resume", "overwrite", "quiet")}
    from trainer.distributed import env_world_size
    from trainer.multi import expand_runs, preflight, train_many
    from trainer.train import Interrupted

    main_rank = os.environ.get("RANK", "0") == "0"
    progress = RichTrainProgress() if not quiet and main_rank else None
    try:
        cfgs = expand_runs(_bases(ctx, options, config or []), sweep or [])
        if nproc > 1 and env_world_size() == 1:
            preflight(cfgs, resume=resume, overwrite=overwrite, nproc=nproc)  # one-line errors before any process starts
            raise typer.Exit(_launch_torchrun(ctx, nproc, options, config or [], sweep or [],
                                              {"resume": resume, "overwrite": overwrite, "quiet": quiet}))
        summaries = train_many(cfgs, resume=resume, overwrite=overwrite, progress=progress.for_run if progress else None)
    except ActcacheError as e:
        _fail_once(str(e), 2, main_rank)
    except Interrupted:
        _fail_once("interrupted: a checkpoint was written; continue with the same command plus --resume", 130, main_rank)
    finally:
        if progress:
            progress.stop()
    for cfg, summary in zip(cfgs, summaries if main_rank else []):
        h = summary["heldout"]
        name = f"{cfg.train.out}: " if len(cfgs) > 1 else ""
        typer.echo(f"{name}{summary['arch']}: {summary['steps']} steps, {summary['tokens']:,} tokens | held-out "
                   f"explained variance {h['explained_variance']:.4f}, L0 {h['l0']:.2f}, dead fraction "
                   f"{h['dead_fraction']:.4f} | non-finite events {summary['nonfinite_events']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    format: Annotated[str, typer.Option(help="Export format: saelens.")] = "saelens",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
) -> None:
    """Export a trained SAE (SAELens: cfg.json + sae_weights.safetensors)."""
    from trainer import artifacts as A
    from trainer.export import check_export_dir, export_saelens

    try:
        if format != "saelens":
            raise ActcacheError(f"unknown format {format!r}: use saelens")
        weights = A.existing_run(run_dir).weights
        if not weights.exists():
            raise ActcacheError(f"{run_dir} has no {A.WEIGHTS}: train it to the end first (sae train ... --resume)")
        check_export_dir(out, overwrite)
        typer.echo(str(export_saelens(weights, out)))
    except ActcacheError as e:
        fail(str(e))


from trainer.evaluation.cli import register as register_eval  # noqa: E402

register_eval(app)

from trainer.report.cli import compare, experiment, study  # noqa: E402

app.command("compare")(compare)
app.command("experiment")(experiment)
app.command("study")(study)

from trainer.features.cli import register as register_features  # noqa: E402
from trainer.importing import register as register_import  # noqa: E402

register_features(app)
register_import(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
