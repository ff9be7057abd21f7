"""The ``actcache`` command line: a thin typer layer over ``actcache.extract`` / ``inspect``."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from actcache.cli_support import console, fail, new_app
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.urls import redact

app = new_app("Cache residual-stream activations of causal LMs in Zarr v3 stores.")
_D = ExtractConfig  # defaults come from the config dataclass, never a second copy


class _TokensPerSecond(ProgressColumn):
    """Average over this run: chunks land seconds apart, too sparse for rich's windowed speed."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("start", 0)
        elapsed = task.elapsed or 0
        return Text(f"{done / elapsed:,.0f} tok/s" if done and elapsed else "- tok/s", style="cyan")


class RichProgress:
    """Adapts extraction progress callbacks to a rich progress bar."""

    def __init__(self) -> None:
        self._bar = Progress(TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
                             _TokensPerSecond(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=console)
        self._task = None

    def start(self, total_rows: int, done_rows: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("extract", total=total_rows, completed=done_rows, start=done_rows)

    def advance(self, rows: int) -> None:
        self._bar.advance(self._task, rows)

    def stop(self) -> None:
        self._bar.stop()


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="Model dir, .gguf dir/file, hub id, or embedded:tiny-gemma2 / embedded:smollm2-135m / embedded:gemma3-270m.")],
    hooks: Annotated[str, typer.Option(help="Comma list, e.g. blocks.5.hook_resid_post,blocks.12.hook_resid_post.")],
    out: Annotated[str, typer.Option(help="Path or URL (s3://, gs://, file://, memory://) of the Zarr v3 store to write; credentials come from the environment.")],
    dataset: Annotated[str, typer.Option(help="Corpus: .txt, .jsonl, .parquet, a save_to_disk dir, or embedded:stdlib-docstrings.")] = _D.dataset,
    text_field: Annotated[str, typer.Option(help="Text field/column of jsonl, parquet and datasets corpora.")] = _D.text_field,
    gguf_file: Annotated[Optional[str], typer.Option(help="The .gguf file inside --model's dir.")] = None,
    context_size: Annotated[int, typer.Option(help="Tokens per window, BOS included.")] = _D.context_size,
    n_tokens: Annotated[Optional[int], typer.Option(help="Rows to write (rounded up to whole windows); default: whole corpus.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = _D.batch_size,
    dtype: Annotated[str, typer.Option(help="Storage dtype: bfloat16, float16 or float32.")] = _D.dtype,
    compute_dtype: Annotated[str, typer.Option(help="Model dtype: auto (storage dtype on CUDA / bf16-capable CPUs, else float32) or a dtype.")] = _D.compute_dtype,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = _D.device,
    codec: Annotated[str, typer.Option(help="zstd (level 1), zstd-N, blosc-lz4 or none.")] = _D.codec,
    chunk_rows: Annotated[int, typer.Option(help="Target rows per chunk (rounded down to whole windows).")] = _D.chunk_rows,
    seed: Annotated[int, typer.Option(help="Seed of the window shuffle.")] = _D.seed,
    prepend_bos: Annotated[bool, typer.Option(help="Start each window with BOS.")] = _D.prepend_bos,
    exclude_bos: Annotated[bool, typer.Option(help="Leave BOS rows out of the store.")] = _D.exclude_bos,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted store (same parameters).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    writer_threads: Annotated[int, typer.Option(help="Threads encoding and writing chunks; 0 = one per core, at most 4.")] = _D.writer_threads,
    workers: Annotated[int, typer.Option(help="Extract on a dask LocalCluster of N worker processes.")] = 0,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler to extract on.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
) -> None:
    """Run MODEL over DATASET and write residual-stream activations at HOOKS into a store."""
    from actcache.extract import extract as run_extract

    cfg = ExtractConfig(model=model, hooks=tuple(h.strip() for h in hooks.split(",") if h.strip()), out=out,
                        dataset=dataset, text_field=text_field, gguf_file=gguf_file, context_size=context_size,
                        n_tokens=n_tokens, batch_size=batch_size, dtype=dtype, compute_dtype=compute_dtype,
                        device=device, codec=codec,
                        chunk_rows=chunk_rows, seed=seed, prepend_bos=prepend_bos, exclude_bos=exclude_bos,
                        writer_threads=writer_threads)
    progress = None if quiet else RichProgress()
    try:
        path = run_extract(cfg, resume=resume, overwrite=overwrite, workers=workers, scheduler=scheduler, progress=progress)
    except ActcacheError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: the old store is kept and the new one's finished chunks too; rerun the same command to "
             "continue" if overwrite else
             "interrupted: finished chunks are kept; continue with the same command plus --resume", 130)
    finally:
        if progress:
            progress.stop()
    if not quiet:
        console.print(f"[green]wrote[/green] {redact(path)}", highlight=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Path or URL (s3://, gs://, file://, memory://) of the store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Hooks, shapes, dtype, codec, bytes on disk, compression ratio and statistics of a store."""
    from actcache.inspection import store_info

    try:
        d = store_info(store)
    except ActcacheError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    out = Console()
    t = Table(box=box.SIMPLE_HEAD, title=f"{d['path']}  ({'complete' if d['complete'] else 'INCOMPLETE'}, {d['chunks_done']}/{d['n_chunks']} chunks)")
    for col in ("hook", "rows x d", "on disk", "ratio", "E||x||", "E||x||^2"):
        t.add_column(col, justify="left" if col == "hook" else "right", no_wrap=True)
    for h in d["hooks"]:
        t.add_row(h["hook"], "x".join(map(str, h["shape"])), _fmt_bytes(h["bytes_on_disk"]),
                  f"{h['ratio']:.2f}" if h["ratio"] else "-",
                  f"{h['mean_norm']:.4g}" if h["mean_norm"] is not None else "-",
                  f"{h['mean_sq_norm']:.4g}" if h["mean_sq_norm"] is not None else "-")
    out.print(t)
    docs = f" ({d['n_documents_used']:,} of {d['n_documents_read']:,} documents read used)" \
        if d["n_documents_used"] is not None else ""
    out.print(f"model {d['model']} | dataset {d['dataset']}{docs} | format {d['format_version']}, "
              f"{'crc32c per chunk' if d['checksums'] else 'no checksums'}\n"
              f"{d['dtype']} (stored as {d['hooks'][0]['storage_dtype']}) | computed in {d['compute_dtype'] or 'unknown'} | "
              f"codec {d['codec']} | chunks of {d['chunk_rows']:,} rows | context {d['context_size']} | "
              f"{_fmt_bytes(d['bytes_per_token'])}/token on disk", highlight=False)


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Path or URL (s3://, gs://, file://, memory://) of the store.")],
    recompute: Annotated[int, typer.Option(help="Re-run the model on N random windows and compare.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed choosing the recomputed windows.")] = 0,
    device: Annotated[str, typer.Option(help="Device for --recompute.")] = "auto",
    repair: Annotated[bool, typer.Option(help="Un-commit damaged chunks (extract --resume recomputes them) and rebuild derived ones.")] = False,
) -> None:
    """Check every chunk of every array: crc32c checksum, decoding, shape/dtype, no NaN/Inf, tokens
    consistent with the windows, manifest complete. Exit 1 when something is wrong."""
    from actcache.inspection import verify_store
    from actcache.repair import repair_store

    try:
        if recompute < 0:
            raise ActcacheError(f"--recompute {recompute} must be >= 0 (the number of windows to re-run)")
        rep = verify_store(store, recompute=recompute, seed=seed, device=device)
        fixed = repair_store(store, rep.findings) if repair else None
    except ActcacheError as e:
        fail(str(e))
    for n in rep.notes:
        console.print(f"[yellow]note:[/yellow] {escape(n)}", highlight=False, soft_wrap=True)
    for p in rep.problems:
        console.print(f"[red]problem:[/red] {escape(p)}", highlight=False, soft_wrap=True)
    extra = f", {rep.windows_recomputed} windows recomputed (max relative error {rep.max_recompute_error:.2e})" if rep.windows_recomputed else ""
    msg = f"{rep.chunks_checked} chunks checked{extra}"
    if rep.ok:
        Console().print(f"[green]ok[/green]: {msg}", highlight=False)
        return
    if fixed is None:
        fail(f"{len(rep.problems)} problems; {msg}" + ("; `--repair` un-commits damaged chunks for extract --resume"
                                                        if rep.findings else ""), 1)
    if fixed.rewritten:
        console.print(f"[green]rewritten:[/green] {escape(', '.join(fixed.rewritten))}", highlight=False, soft_wrap=True)
    if fixed.uncommitted:
        console.print(f"[yellow]un-committed[/yellow] chunks {', '.join(map(str, fixed.uncommitted))}: recompute them "
                      f"with\n  {escape(fixed.resume_command or 'the original extract command plus --resume')}",
                      highlight=False, soft_wrap=True)
    if fixed.unrepairable:
        fail(f"--repair cannot fix {'; '.join(fixed.unrepairable)}: re-extract the store with --overwrite", 1)
    if not (fixed.uncommitted or fixed.rewritten):
        fail(f"{len(rep.problems)} problems; {msg}", 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
