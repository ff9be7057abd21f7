"""``sae profile-memory``: the typer command (registered by ``sae_cli`` as
``app.command("profile-memory")(profile_memory)``)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from actcache.errors import ActcacheError
from trainer.config import SAEConfig
from trainer.loader import LoaderConfig

if TYPE_CHECKING:
    import torch

    from profiling.plan import ExtractRow, TrainRow

console = Console(stderr=True)
_S, _L = SAEConfig(), LoaderConfig()
PIN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _budget(text: Optional[str], gpu: Optional[str], device: torch.device, target: str) -> tuple[int, str]:
    from profiling.gpu import gpu_memory
    from profiling.plan import parse_size
    from profiling.rss import total_ram

    if text is not None and gpu is not None:
        raise ActcacheError("--budget and --gpu exclude each other: give one")
    if gpu is not None:
        return gpu_memory(gpu), f"--gpu {gpu.lower()}"
    if text is not None:
        return parse_size(text), f"--budget {text}"
    if target == "cuda" and device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory, "this GPU's memory"
    if target == "cuda":
        return gpu_memory("h100-80gb"), "an h100-80gb, the default card without a GPU here: --gpu or --budget"
    return total_ram(), "this machine's RAM"


def _target(target: str, device: str) -> tuple[str, str, Optional[str]]:
    """(the device the prediction is for, the device to resolve for measuring, a note): a
    ``--device cuda`` without a GPU here plans the CUDA run (as ``--target cuda``)."""
    import torch

    if target not in ("auto", "cpu", "cuda"):
        raise ActcacheError(f"unknown --target {target!r}: use auto, cpu or cuda")
    no_gpu = not torch.cuda.is_available()
    if device.startswith("cuda") and no_gpu:
        return "cuda", "cpu", f"--device {device}: no GPU here, so this predicts the CUDA step (as --target cuda)"
    if target == "cuda" and no_gpu:
        return "cuda", "cpu", None
    if target == "auto":
        from actcache.device import resolve_device

        return resolve_device(device).type, device, None
    return target, "cpu" if target == "cpu" else device, None


def _free(device: torch.device) -> int:
    """Bytes free now on ``device``."""
    from profiling.rss import available_ram

    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return available_ram()


def _measure_training(rows: list[TrainRow], steps: int, env: dict[str, str], device: torch.device) -> list[TrainRow]:
    from profiling.measure import Measurement, measure_training
    from profiling.model import estimate_training

    done: dict[str, Measurement] = {}
    out = []
    for i, r in enumerate(rows, 1):
        key = repr(sorted(r.flat.items()))  # bf16 rows on CPU run exactly the float32 step: measured once
        s = r.spec
        traced = s.device == "cuda" and device.type == "cpu"  # a CUDA step traced on CPU tensors
        compared = estimate_training(replace(s, traced_on_cpu=True)).step_total if traced else 0
        if s.device == "cuda" and s.dtype == "float32":
            m = Measurement(None, note="not measured: sae train always autocasts to bf16 on CUDA")
        elif key in done:
            m = done[key]
        elif max(r.estimate.step_total, compared) > 0.9 * (free := _free(device)):
            m = Measurement(None, note=f"not measured: needs ~{r.estimate.step_total / 2**30:.1f} GiB, "
                                       f"{free / 2**30:.1f} GiB free on {device}")
        else:
            how = " as on CUDA, traced on CPU" if traced else ""
            console.print(f"measuring {i}/{len(rows)}: {s.arch} d_sae={s.d_sae} B={s.batch_size} ({steps} steps{how})",
                          highlight=False)
            flat = {**r.flat, "device": "cpu"} if traced else r.flat
            m = done[key] = measure_training(flat, s.d_in, steps=steps, env=env, dead_fraction=s.dead_fraction,
                                             target="cuda" if traced else "")
        out.append(replace(r, measured=m, compared=compared))
    return out


def _measure_extraction(row: ExtractRow, env: dict[str, str]) -> ExtractRow:
    from profiling.measure import Measurement, run_child

    if row.spec.device != "cpu":
        return replace(row, measured=Measurement(None, note="not measured: extraction is measured on CPU only"))
    from profiling.rss import available_ram

    if row.comparable > 0.9 * (free := available_ram()):
        return replace(row, measured=Measurement(None, note=f"not measured: needs ~{row.comparable / 2**30:.1f} GiB, "
                                                            f"{free / 2**30:.1f} GiB free on cpu"))
    console.print(f"measuring extraction: {row.spec.model} layer {row.spec.hook_layer}, {row.n_windows} windows",
                  highlight=False)
    spec = {"extract": vars(row.spec), "compute_dtype": row.estimate.compute_dtype, "n_windows": row.n_windows}
    return replace(row, measured=run_child("extract", spec, timeout_s=1800, env=env))


def _notes(rows: list[TrainRow], erows: list[ExtractRow]) -> list[str]:
    fractions = sorted({r.spec.dead_fraction for r in rows if r.spec.arch != "baseline"})
    dead = " or ".join(f"{f:g}" for f in fractions) or "1"
    notes = [f"AuxK with dead fraction {dead} (--dead-fraction): dense (B, n_dead) blocks, n_dead = fraction x d_sae, "
             "min(k_aux, n_dead) latents per token; dyncorr at k = k_start (its peak)"]
    methods = sorted({r.measured.method for r in [*rows, *erows] if r.measured.method})
    if methods:
        notes.append("measured = peak of a fresh subprocess above its baseline (" + "; ".join(methods) + ")" +
                     "; ratio compares the step without the loader (extraction: weights + activations + chunk)")
    rss = sorted({r.measured.note for r in rows if r.measured.rss_bytes is not None})
    if rss:
        notes.append("rss = the same run's peak resident memory above its baseline, what the OS sees (" +
                     "; ".join(n.removeprefix("RSS: ") for n in rss) + "): it moves with glibc's malloc and the "
                     "load, the measured column does not")
    return notes


def profile_memory(
    ctx: typer.Context,
    d_in: Annotated[int, typer.Option(help="Width of the activations (2304: Gemma-2-2B's residual stream).")] = 2304,
    d_sae: Annotated[str, typer.Option(help="Latents, comma list.")] = "2304,16384,65536",
    batch_size: Annotated[str, typer.Option(help="Tokens per step, comma list.")] = "4096",
    arch: Annotated[str, typer.Option(help="Architectures, comma list: baseline, topk, dyncorr.")] = "baseline,topk,dyncorr",
    dtype: Annotated[str, typer.Option(help="float32 and/or bfloat16 (bf16 = autocast, CUDA only: CPU trains in float32).")] = "float32,bfloat16",
    k: Annotated[int, typer.Option(help="Active latents per token (topk).")] = _S.k,
    k_start: Annotated[int, typer.Option(help="Largest k of the dyncorr schedule (its memory peak).")] = _S.k_start,
    k_end: Annotated[int, typer.Option(help="k at the end of the dyncorr schedule.")] = _S.k_end,
    k_aux: Annotated[int, typer.Option(help="AuxK latents per token; 0 = d_in // 2.")] = _S.k_aux,
    cov_dtype: Annotated[str, typer.Option(help="dtype of the dyncorr covariance buffer: float32 or float64.")] = _S.cov_dtype,
    dead_fraction: Annotated[float, typer.Option(help="Share of the latents assumed dead, which sizes the dense B x n_dead AuxK blocks; 1 = every latent, the upper bound.")] = 1.0,
    shuffle_buffer_mb: Annotated[float, typer.Option(help="Loader shuffle buffer per shard held, MiB.")] = _L.shuffle_buffer_mb,
    shards: Annotated[Optional[int], typer.Option(help="Loader row streams this process holds (each with its own buffers); default 1.")] = _L.shards,
    chunk_rows: Annotated[int, typer.Option(help="Rows per store chunk (the loader reads whole chunks).")] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda: where training (and extraction) would run; cuda without a GPU here = --target cuda.")] = "auto",
    target: Annotated[str, typer.Option(help="auto (= --device), cpu or cuda: the device to predict for; cuda plans a GPU run from a machine without one (bf16 autocast, what torch.cuda.max_memory_allocated counts).")] = "auto",
    budget: Annotated[Optional[str], typer.Option(help="Memory to fit in, e.g. 80GB, 80GiB; default: this machine's RAM / GPU memory (--target cuda without a GPU: an h100-80gb).")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="Fit a card instead of --budget: h100-80gb, a100-80gb, a100-40gb, l40s-48gb, l4-24gb, rtx4090-24gb, ... (profiling/gpu.py).")] = None,
    measure: Annotated[bool, typer.Option(help="Also run a few real steps per config in a fresh subprocess and measure the peak (only configs that fit in free memory).")] = False,
    steps: Annotated[int, typer.Option(help="Training steps per measurement (>= 2 reaches the steady state).")] = 3,
    pin_malloc: Annotated[bool, typer.Option(help="Measure with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072): RSS then tracks live tensors.")] = False,
    format: Annotated[str, typer.Option(help="table, json, csv or markdown.")] = "table",
    out: Annotated[Optional[Path], typer.Option(help="Write the report in --format here (the table still goes to the terminal).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="run.json of `sae train` fields: profile exactly that run (options given here win).")] = None,
    run: Annotated[Optional[Path], typer.Option(help="A run directory: profile the run its config.json describes.")] = None,
    extract: Annotated[bool, typer.Option(help="Also profile activation extraction for --extract-model.")] = True,
    extract_model: Annotated[str, typer.Option(help="gemma-2-2b (built-in config), a model dir / .gguf, or a hub id.")] = "gemma-2-2b",
    hook_layer: Annotated[int, typer.Option(help="Deepest hooked block (blocks.L.hook_resid_post).")] = 5,
    context_size: Annotated[int, typer.Option(help="Tokens per extraction window.")] = 128,
    extract_batch: Annotated[int, typer.Option(help="Windows per extraction forward pass.")] = 8,
    extract_batches: Annotated[int, typer.Option(help="Forward passes an extraction measurement runs.")] = 2,
    queue_depth: Annotated[int, typer.Option(help="Chunks queued for the store writer.")] = 2,
    writer_threads: Annotated[int, typer.Option(help="Extraction writer threads; 0 = actcache's default (one per core, at most 4).")] = 0,
    extract_dtype: Annotated[str, typer.Option(help="Storage dtype of the activations: bfloat16, float16 or float32.")] = "bfloat16",
    extract_compute_dtype: Annotated[str, typer.Option(help="Dtype the model runs in: auto (as actcache extract picks it), bfloat16, float16 or float32.")] = "auto",
) -> None:
    """Predict (and with --measure, measure) the peak memory of SAE training and of activation extraction."""
    opts = dict(locals())
    from actcache.device import resolve_device
    from actcache.dtypes import check_logical
    from profiling import plan
    from profiling.extract_side import ExtractSpec
    from profiling.report import FORMATS, Context, render, render_rich

    explicit = {n for n in opts if (src := ctx.get_parameter_source(n)) is not None and src.name != "DEFAULT"}
    try:
        if format not in FORMATS:
            raise ActcacheError(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}")
        if steps < 1 or extract_batches < 1:
            raise ActcacheError("--steps and --extract-batches must be >= 1")
        flat = plan.load_flat(config, run)
        topts = plan.train_options(opts, explicit, flat)
        dev, run_on, target_note = _target(target, topts.device)
        device_obj = resolve_device(run_on)
        limit, source = _budget(budget, gpu, device_obj, dev)
        if dev == "cuda" and "dtype" not in explicit:
            topts = replace(topts, dtype=[])  # what sae train runs there: bf16 autocast
        rows = plan.train_rows(replace(topts, target=dev), limit)
        if flat is not None:  # --run / --config: the extraction that wrote its store, unless told otherwise
            found = plan.store_extraction(str(flat.get("store", ""))) or {}
            for name, value in found.items():
                if name not in explicit:
                    opts[name] = value
            extract_model, hook_layer, context_size = opts["extract_model"], opts["hook_layer"], opts["context_size"]
            extract_dtype = opts["extract_dtype"]
        erows = [plan.extract_row(ExtractSpec(
            model=extract_model, hook_layer=hook_layer, context_size=context_size, batch=extract_batch,
            chunk_rows=chunk_rows, queue_depth=queue_depth, writer_threads=writer_threads,
            dtype=check_logical(extract_dtype), device=dev,
            compute_dtype=extract_compute_dtype if extract_compute_dtype == "auto" else check_logical(extract_compute_dtype),
        ), limit, extract_batches)] if extract else []
        env = {**PIN_MALLOC, **{k: v for k, v in os.environ.items() if k in PIN_MALLOC}} if pin_malloc else {}
        if measure:
            rows = _measure_training(rows, steps, env, device_obj)
            erows = [_measure_extraction(r, env) for r in erows]
        notes = ([target_note] if target_note else []) + _notes(rows, erows)
        report = Context(device=dev, budget=limit, budget_source=source, notes=notes,
                         largest=plan.largest_rows(rows, limit) if dev == "cuda" else [])
        if out is not None:
            try:
                out.write_text(render(format, rows, erows, report))
            except OSError as e:
                raise ActcacheError(f"cannot write --out {out} ({e.strerror}): choose a writable path") from None
    except ActcacheError as e:
        _fail(str(e))
    if format == "table" or out is not None:
        render_rich(rows, erows, report, Console(width=None if sys.stdout.isatty() else 120))
    else:
        typer.echo(render(format, rows, erows, report), nl=False)
