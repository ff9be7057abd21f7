"""Rendering of the profile: rich tables (terminal, <= 120 columns), JSON, CSV and markdown."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from profiling.plan import ExtractRow, LargestRow, TrainRow

FORMATS = ("table", "json", "csv", "markdown")
_SHORT = {"float32": "f32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Context:
    device: str  # cpu / cuda
    budget: int
    budget_source: str  # "--budget" or "available RAM" ...
    notes: list[str]
    largest: list[LargestRow] = field(default_factory=list)  # CUDA target: the largest d_sae per card


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
    raise AssertionError


def fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return str(n)


def _dtype(r: TrainRow) -> str:
    s = r.spec
    return _SHORT[s.dtype] + ("*" if s.effective_dtype != s.dtype else "")


def _measured(m, footnotes: list[str], label: str) -> str:
    if m.peak_bytes is not None:
        return fmt_bytes(m.peak_bytes)
    if m.note and "--no-measure" not in m.note:
        footnotes.append(f"{label}: {m.note}")
        return f"[{len(footnotes)}]"
    return "-"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def train_cells(r: TrainRow, footnotes: list[str]) -> dict[str, str]:
    c, e = r.estimate.components, r.estimate
    label = f"{r.spec.arch} d_sae={r.spec.d_sae} B={r.spec.batch_size} {_dtype(r)}"
    return {"arch": r.spec.arch, "d_sae": str(r.spec.d_sae), "B": str(r.spec.batch_size), "dtype": _dtype(r),
            "model+opt": fmt_bytes(c["parameters"] + c["gradients"] + c["optimizer"] + c["buffers"]),
            "acts": fmt_bytes(c["activations"] + c["saved"] + c["input"]),
            "cov M+mu": fmt_bytes(c["covariance"]) if r.spec.arch == "dyncorr" else "-",
            "penalty": fmt_bytes(c["penalty"]) if r.spec.arch == "dyncorr" else "-",
            **({"total": fmt_bytes(e.total), "need": fmt_bytes(r.need)} if r.spec.device == "cuda" else
               {"loader": fmt_bytes(e.loader_host), "total": fmt_bytes(e.total)}),
            "cov%": f"{100 * e.cov_share:.0f}%",
            "measured": _measured(r.measured, footnotes, label), "ratio": _ratio(r.ratio),
            "rss": fmt_bytes(r.measured.rss_bytes), "fits": "yes" if r.fits else "NO"}


def cost_cells(r: TrainRow) -> dict[str, str]:
    k = r.cost
    assert k is not None
    return {"d_sae": str(r.spec.d_sae), "B": str(r.spec.batch_size), "k": str(r.spec.k), "cov": _SHORT.get(
        r.spec.cov_dtype, r.spec.cov_dtype), "pairs/step": fmt_count(k.pairs),
            "dense FLOP": fmt_count(k.dense_flops), "dense bytes": fmt_bytes(k.dense_bytes),
            "lazy FLOP": fmt_count(k.lazy_flops), "lazy bytes": fmt_bytes(k.lazy_bytes),
            "fold every": f"{k.fold_every} steps", "dense/lazy": f"{k.dense_flops / k.lazy_flops:,.0f}x"}


def extract_cells(r: ExtractRow, footnotes: list[str]) -> dict[str, str]:
    s, e = r.spec, r.estimate
    return {"model": s.model if len(s.model) <= 24 else "..." + s.model[-21:], "layer": str(s.hook_layer),
            "tokens": f"{s.batch}x{s.context_size}", "dtype": f"{_SHORT.get(e.compute_dtype, e.compute_dtype)}>"
            f"{_SHORT.get(s.dtype, s.dtype)}", "weights": fmt_bytes(e.weights), "acts": fmt_bytes(e.activations),
            # On CUDA the writer queue is host RAM: the total is what the card holds.
            **({"host queue": fmt_bytes(e.writer_queue), "total": fmt_bytes(e.total - e.writer_queue)}
               if s.device.startswith("cuda") else {"queue": fmt_bytes(e.writer_queue), "total": fmt_bytes(e.total)}),
            "measured": _measured(r.measured, footnotes, f"extract {s.model}"), "ratio": _ratio(r.ratio),
            "fits": "yes" if r.fits else "NO"}


def _unique_costs(rows: list[TrainRow]) -> list[TrainRow]:
    seen, out = set(), []
    for r in rows:
        key = (r.spec.d_sae, r.spec.batch_size, r.spec.k, r.spec.cov_dtype, r.spec.beta)
        if r.cost is not None and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _tables(train: list[TrainRow], extract: list[ExtractRow], ctx: Context) -> tuple[list[tuple[str, list[dict]]], list[str]]:
    footnotes: list[str] = []
    cells = [train_cells(r, footnotes) for r in train]
    # Columns every row shares go to the title; the dtype only when the rss column needs the room.
    has_rss = any(r.measured.rss_bytes is not None for r in train)
    title, shared = [], {"B": {str(r.spec.batch_size) for r in train}, "dtype": {_dtype(r) for r in train}}
    for col, values in shared.items():
        if len(values) == 1 and (col == "B" or has_rss):
            title.append(f"{col} = {next(iter(values))}")
            for c in cells:
                c.pop(col)
    for c in cells if not has_rss else []:
        c.pop("rss")
    batch = f" ({', '.join(title)})" if title else ""
    d_in = f", d_in = {train[0].spec.d_in}" if train else ""
    tables = [(f"SAE training step, predicted peak on {ctx.device}{batch}{d_in}", cells)] if cells else []
    costs = [cost_cells(r) for r in _unique_costs(train)]
    if costs:
        tables.append(("Covariance update per step (dyncorr): dense vs lazy", costs))
    if ctx.largest:
        cards = list(ctx.largest[0].d_sae)
        big = [{"arch": g.arch, "B": str(g.batch_size), "dtype": _SHORT.get(g.dtype, g.dtype),
                **{_card(c, ctx): f"{g.d_sae[c]:,} ({100 * g.cov_share[c]:.0f}% cov)" if g.arch == "dyncorr"
                   else f"{g.d_sae[c]:,}" for c in cards}} for g in ctx.largest]
        tables.append(("Largest d_sae whose CUDA step fits (need <= card; multiple of 1024)", big))
    ext = [extract_cells(r, footnotes) for r in extract]
    if ext:
        tables.append(("Extraction (actcache extract), per process", ext))
    return tables, footnotes


def _card(name: str, ctx: Context) -> str:
    return f"budget {fmt_bytes(ctx.budget)}" if name == "budget" else name


def _legend(train: list[TrainRow], ctx: Context) -> list[str]:
    from profiling.gpu import OVERHEAD

    fits = "need" if ctx.device == "cuda" else "total"
    lines = [f"budget: {fmt_bytes(ctx.budget)} ({ctx.budget_source}); fits = {fits} <= budget; "
             "ratio = predicted / measured",
             "model+opt = parameters, gradients, Adam moments (+ Adam's temporaries when the peak is the optimizer "
             "step), buffers; acts = activations and tensors saved for backward; penalty = dyncorr's pair arrays "
             "(and the PairMoments two outputs hold); loader = group buffers (per shard held) + a batch + a "
             "decoded chunk, host RAM"]
    if ctx.device == "cuda":
        lines.append("CUDA: total = what torch.cuda.max_memory_allocated would report for the step (bf16 autocast, "
                     "the torch.unique penalty path, the input batch on the card; the loader's pinned buffers are "
                     "host RAM); need = total + " + OVERHEAD.describe())
    if any(r.spec.device == "cuda" and r.spec.dtype == "float32" for r in train):
        lines.append("f32 on CUDA: a run without autocast, for comparison; sae train autocasts to bf16 on CUDA")
    if any(r.spec.effective_dtype != r.spec.dtype for r in train):
        lines.append("bf16* = bfloat16 requested, but this trains in float32: Trainer._step autocasts to bf16 on CUDA only")
    return lines + ctx.notes


def render_rich(train: list[TrainRow], extract: list[ExtractRow], ctx: Context, console: Console) -> None:
    tables, footnotes = _tables(train, extract, ctx)
    for title, rows in tables:
        t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  title_justify="left")
        for i, name in enumerate(rows[0]):
            t.add_column(name, justify="left" if i == 0 or name in ("model", "dtype") else "right", no_wrap=True)
        for r in rows:
            t.add_row(*r.values(), style="red" if r.get("fits") == "NO" else None)
        console.print(t)
    for line in _legend(train, ctx) + [f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]:
        console.print(line, highlight=False, markup=False)


def render_markdown(train: list[TrainRow], extract: list[ExtractRow], ctx: Context) -> str:
    tables, footnotes = _tables(train, extract, ctx)
    out = []
    for title, rows in tables:
        head = list(rows[0])
        out += [f"**{title}**", "", "| " + " | ".join(head) + " |",
                "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(r.values()) + " |" for r in rows]
        out.append("")
    out += [f"- {line}" for line in _legend(train, ctx)]
    out += [f"- [{i}] {n}" for i, n in enumerate(footnotes, 1)]
    return "\n".join(out) + "\n"


def train_record(r: TrainRow) -> dict[str, Any]:
    s, e = r.spec, r.estimate
    return {"section": "training", "arch": s.arch, "d_in": s.d_in, "d_sae": s.d_sae, "batch_size": s.batch_size,
            "k": s.k, "k_aux": s.k_aux, "dtype": s.dtype, "runs_as": s.effective_dtype, "device": s.device,
            "cov_dtype": s.cov_dtype, **{f"bytes_{k}": v for k, v in e.components.items()},
            "total_bytes": e.total, "step_bytes": e.step_total, "loader_host_bytes": e.loader_host,
            "need_bytes": r.need,
            "cov_share": round(e.cov_share, 6), "peak_phase": e.peak_phase, "fits": r.fits,
            "measured_bytes": r.measured.peak_bytes, "measured_step_s": r.measured.step_s,
            "measure_method": r.measured.method, "measure_note": r.measured.note,
            "measured_torch_bytes": r.measured.torch_bytes, "measured_numpy_bytes": r.measured.numpy_bytes,
            "measured_peak_op": r.measured.at, "measured_rss_bytes": r.measured.rss_bytes,
            "pred_over_measured": None if r.ratio is None else round(r.ratio, 4),
            "pred_over_rss": None if not r.measured.rss_bytes else round(e.step_total / r.measured.rss_bytes, 4),
            **({f"cov_{k}": v for k, v in asdict(r.cost).items()} if r.cost else {})}


def extract_record(r: ExtractRow) -> dict[str, Any]:
    s, e, m = r.spec, r.estimate, r.shape
    return {"section": "extraction", **{f"spec_{k}": v for k, v in asdict(s).items()}, "model_type": m.model_type,
            "n_layers": m.n_layers, "d_model": m.d_model, "kept_params": m.kept_params, "full_params": m.full_params,
            "compute_dtype": e.compute_dtype, "chunk_rows": e.chunk_rows, "bytes_weights": e.weights,
            "bytes_activations": e.activations, "bytes_cast": e.cast, "bytes_writer_queue": e.writer_queue,
            "total_bytes": e.total, "fits": r.fits, "measured_windows": r.n_windows,
            "measured_comparable_bytes": r.comparable, "measured_bytes": r.measured.peak_bytes,
            "measured_batch_s": r.measured.step_s, "measure_method": r.measured.method,
            "measure_note": r.measured.note, "pred_over_measured": None if r.ratio is None else round(r.ratio, 4)}


def render(fmt: str, train: list[TrainRow], extract: list[ExtractRow], ctx: Context) -> str:
    """The whole profile as text in ``fmt`` (``table`` = the rich tables as plain text, 120 columns)."""
    if fmt == "table":
        console = Console(record=True, width=120, file=io.StringIO())
        render_rich(train, extract, ctx, console)
        return console.export_text()
    if fmt == "markdown":
        return render_markdown(train, extract, ctx)
    records = [train_record(r) for r in train] + [extract_record(r) for r in extract]
    if fmt == "json":
        meta = {"device": ctx.device, "budget_bytes": ctx.budget, "budget_source": ctx.budget_source,
                "notes": _legend(train, ctx), "largest_d_sae": [asdict(g) for g in ctx.largest]}
        return json.dumps({**meta, "rows": records}, indent=2) + "\n"
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()
