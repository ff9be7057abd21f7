"""``sae features``: the typer command (registered by ``trainer/cli.py`` with ``register(app)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from actcache.cli_support import console, fail
from actcache.errors import ActcacheError
from trainer.evaluation.data import SPLITS



def _latents(text: str) -> int:
    if text == "all":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise ActcacheError(f"--latents {text!r}: pass a number of latents or all") from None
    if n < 1:
        raise ActcacheError(f"--latents {n}: pass at least 1, or all")
    return n


def features(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (sae train --out, or sae import --out).")],
    store: Annotated[Optional[str], typer.Option(help="Store to read; default: the training store.")] = None,
    split: Annotated[str, typer.Option(help=f"Chunks of the store: {', '.join(SPLITS)} (with the run's heldout_chunks).")] = "heldout",
    latents: Annotated[str, typer.Option(help="Latents that get a page (the first N by index), or all; the index lists every latent.")] = "256",
    examples: Annotated[int, typer.Option(help="Top activating examples per latent.")] = 20,
    neighbours: Annotated[int, typer.Option(help="Correlation neighbours listed per latent and source.")] = 10,
    max_rows: Annotated[int, typer.Option(help="Rows of the split to read; 0 = all.")] = 0,
    logits: Annotated[bool, typer.Option(help="Load the store's model head for logit effects and token strings.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    out: Annotated[Optional[Path], typer.Option(help="Site directory; default RUN_DIR/features.")] = None,
) -> None:
    """Write a static feature dashboard (index.html, a page per latent, features.json): top activating
    contexts, histograms, logit effects and correlation neighbours (docs/features.md)."""
    from actcache.device import resolve_device
    from trainer.features.build import FeaturesConfig, build_features
    from trainer.features.site import check_out_dir, write_site

    target = out or run_dir / "features"
    try:
        if examples < 1:
            raise ActcacheError(f"--examples {examples}: pass at least 1")
        check_out_dir(target)
        cfg = FeaturesConfig(store=store, split=split, latents=_latents(latents), examples=examples,
                             neighbours=neighbours, max_rows=max_rows, logits=logits,
                             device=str(resolve_device(device)))
        data = build_features(run_dir, cfg)
        index = write_site(data, target)
    except ActcacheError as e:
        fail(str(e))
    for note in data["notes"]:
        console.print(f"[bold yellow]note:[/bold yellow] {note}", highlight=False, soft_wrap=True)
    alive = sum(not lat["dead"] for lat in data["latents"])
    typer.echo(f"{data['d_sae']} latents ({alive} alive) over {data['n_rows']:,} rows, "
               f"{sum(bool(lat['page']) for lat in data['latents'])} pages, neighbours from "
               f"{' and '.join(data['neighbour_sources'])}")
    typer.echo(str(index))


def register(app: typer.Typer) -> None:
    app.command("features")(features)
