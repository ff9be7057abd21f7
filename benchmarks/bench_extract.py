"""Benchmark ``actcache extract`` on CPU: writer overhead, truncated depth, storage codecs.

Run: ``python benchmarks/bench_extract.py --out docs/benchmarks.md [--quick]``; it prints rich
tables and appends a markdown section (machine, command, tables) to ``--out``.

Model: the real Gemma-2 architecture at Gemma-2-2B width (``Gemma2Config()`` defaults: d_model
2304, 8 heads of 256, MLP 9216) with few layers, vocab 32000 and seeded random weights, saved to
a temp dir with the tokenizer of ``embedded:tiny-gemma2`` and loaded in bfloat16 through
``actcache.models.load_model``. Windows: ``embedded:stdlib-docstrings`` packed by
``pack_windows`` (context 128, seed 0). Model loading and tokenisation are never timed.

1. Writer overhead: ``runner.run_chunks`` (what ``extract()`` runs after setup: forward, copy-out,
   background zstd write + statistics) on a fresh ``StoreWriter.create`` store, against a
   ``ResidualCapture.run`` loop over exactly the same chunks and batches. Target <= 5%.
2. Truncated vs full depth: ``ResidualCapture`` at ``blocks.1.hook_resid_post`` (stops after
   block 1) against ``model(input_ids, use_cache=False)`` (all blocks, final norm, lm_head).
3. Codecs: stored bytes/token, compression ratio and write MB/s (uncompressed MB per second of
   zarr chunk writes) for none, blosc-lz4 and zstd level 1, on real activations of the
   random-weight model and of the trained ``embedded:smollm2-135m``.

Variants alternate (A B, B A, ...) and medians of the repeats are reported; every ratio compares
numbers measured side by side in one run. Each timing records wall time and the process's CPU
time (all its threads): when other processes share the cores, wall time swings by 2x while CPU
time barely moves, so CPU-time ratios are the noise-robust cross-check.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import zarr
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported, just below
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers

from actcache.capture import ResidualCapture
from actcache.corpus import STDLIB_DATASET, iter_documents
from actcache.dtypes import storage_dtype, to_storage, torch_dtype
from actcache.embedded import DEMO_MODEL, tiny_gemma2_path
from actcache.hooks import parse_hooks
from actcache.models import load_model, n_layers, resolve_model_config
from actcache.runner import run_chunks
from actcache.store import Layout
from actcache.store_writer import StoreWriter, compressors_for
from actcache.windows import Windows, pack_windows

CTX = 128
STORE_CHUNK_ROWS = 4096  # the project's default chunk_rows (32 windows of 128)
CODECS = (("none", "none"), ("blosc-lz4", "blosc-lz4"), ("zstd", "zstd-1 (default `zstd`)"))
WRITE_TARGET = 0.05
TIMING_COLUMNS = ["variant", "tokens", "wall s", "tokens/s", "CPU s", "wall s per repeat", "CPU s per repeat"]
med = statistics.median


@dataclass(frozen=True)
class Sizes:
    full_layers: int  # depth of the random Gemma-2-width model (measurement 2)
    write_layers: int  # blocks kept for measurements 1 and 3; the hook is at the last one
    write_windows: int
    write_chunk_rows: int
    batch_size: int
    depth_windows: int
    depth_batch: int
    codec_tokens: int
    repeats: int
    write_repeats: int  # the writer's overhead is small next to the machine's noise: more repeats


DEFAULT = Sizes(8, 2, 16, 1024, 8, 4, 4, 16384, 3, 5)
QUICK = Sizes(4, 2, 2, 128, 1, 1, 1, 1024, 2, 2)


@dataclass
class Section:
    """One result table and the notes printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Timer:
    """``with Timer() as t: ...`` then ``t.wall`` and ``t.cpu`` (process CPU time, every thread)."""

    def __enter__(self) -> "Timer":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


# --- helpers -------------------------------------------------------------------------------------


def build_gemma2_width_model(out: Path, layers: int) -> Path:
    """Gemma-2-2B-width Gemma-2 with seeded random weights, saved in bf16 with the tiny tokenizer."""
    tok_dir = tiny_gemma2_path()
    cfg = transformers.Gemma2Config(num_hidden_layers=layers, vocab_size=32000,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) <= cfg.vocab_size and (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Gemma2ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def make_windows(tokenizer, n: int) -> Windows:
    return pack_windows(iter_documents(STDLIB_DATASET), tokenizer, context_size=CTX, n_windows=n, seed=0)


def batches(windows: np.ndarray, size: int) -> Iterator[torch.Tensor]:
    for b0 in range(0, len(windows), size):
        yield torch.from_numpy(windows[b0 : b0 + size].astype(np.int64))


def alternate(fns: dict[str, Callable[[], Timer]], repeats: int) -> dict[str, list[Timer]]:
    """Run each variant ``repeats`` times, flipping the order every round; each fn times itself."""
    names, out = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(fns[n]())
    return out


def walls(ts: list[Timer]) -> list[float]:
    return [t.wall for t in ts]


def cpus(ts: list[Timer]) -> list[float]:
    return [t.cpu for t in ts]


def timing_rows(tokens: int, variants: list[tuple[str, list[Timer]]]) -> list[list[str]]:
    def seq(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    return [[label, f"{tokens:,}", f"{med(walls(ts)):.2f}", f"{tokens / med(walls(ts)):.1f}", f"{med(cpus(ts)):.2f}",
             seq(walls(ts)), seq(cpus(ts))] for label, ts in variants]


def rel(a: float, b: float) -> float:
    return (a - b) / b


def release(lm) -> None:
    """Free the weights now (closures may still hold the model object) before the next load."""
    lm.model.to("meta")
    gc.collect()


# --- 1. writer overhead --------------------------------------------------------------------------


def bench_writer(model_dir: Path, work: Path, sz: Sizes) -> tuple[Section, np.ndarray]:
    lm = load_model(str(model_dir), dtype=torch.bfloat16, device="cpu", keep_layers=sz.write_layers)
    hook = f"blocks.{sz.write_layers - 1}.hook_resid_post"
    specs = parse_hooks([hook], n_layers(lm.model.config))
    win = make_windows(lm.tokenizer, sz.write_windows)
    layout = Layout.plan(len(win.tokens), CTX, False, sz.write_chunk_rows)
    n_stores = iter(range(1_000_000))

    def new_store() -> StoreWriter:  # what extract() creates during setup, untimed
        return StoreWriter.create(work / f"write-{next(n_stores)}.zarr", attrs={}, layout=layout, hooks=[hook],
                                  d_model=lm.model.config.hidden_size, logical_dtype="bfloat16", codec="zstd",
                                  windows=win.tokens, window_source=win.source)

    def fwd() -> Timer:
        with ResidualCapture(lm.model, specs) as cap, Timer() as t:
            for c in range(layout.n_chunks):  # the batches compute_chunk runs, chunk by chunk
                for ids in batches(win.tokens[slice(*layout.chunk_windows(c))], sz.batch_size):
                    cap.run(ids)
        return t

    stores: list[StoreWriter] = []

    def write() -> Timer:
        writer = new_store()
        assert np.array_equal(writer.group["windows"][:], win.tokens)  # the very same windows
        with Timer() as t:
            run_chunks(writer, lm.model, specs, writer.pending_chunks(), batch_size=sz.batch_size, queue_depth=2)
        writer.finalize()  # raises unless every chunk was committed
        stores.append(writer)
        return t

    with ResidualCapture(lm.model, specs) as cap:  # warm-up, untimed
        cap.run(next(batches(win.tokens, sz.batch_size)))
    times = alternate({"fwd": fwd, "write": write}, sz.write_repeats)
    acts = stores[-1].group[hook][:]
    r0, r1 = layout.chunk_rows_range(0)
    alone = []
    for w in [new_store() for _ in range(sz.repeats)]:
        with Timer() as t:
            w.write_chunk(0, {hook: acts[r0:r1]})
        alone.append(t)
    release(lm)
    del lm

    tokens, f, w = layout.n_rows, times["fwd"], times["write"]
    wall, cpu = rel(med(walls(w)), med(walls(f))), rel(med(cpus(w)), med(cpus(f)))
    verdict = {True: "met", False: "NOT met"}
    pairs = ", ".join(f"{rel(b.wall, a.wall):+.1%} / {rel(b.cpu, a.cpu):+.1%}" for a, b in zip(f, w))
    sec = Section(f"1. Writer overhead (Gemma-2-2B width, {sz.write_layers} blocks, {hook}, bf16, zstd)",
                  TIMING_COLUMNS, timing_rows(tokens, [("forward only (ResidualCapture loop)", f),
                                                        ("forward + write (run_chunks)", w)]))
    sec.notes += [
        f"**Overhead (t_write - t_fwd) / t_fwd, medians: wall {wall:+.1%}, CPU time {cpu:+.1%}; target <= "
        f"{WRITE_TARGET:.0%}: {verdict[wall <= WRITE_TARGET]} by wall time, {verdict[cpu <= WRITE_TARGET]} by CPU "
        "time.** The forward keeps every core busy here, so the writer's CPU time is taken from it.",
        f"From the fastest run of each: wall {rel(min(walls(w)), min(walls(f))):+.1%}, CPU time "
        f"{rel(min(cpus(w)), min(cpus(f))):+.1%}. Per-repeat pairs (wall / CPU): {pairs}.",
        f"{layout.n_chunks} chunks of {layout.chunk_rows} rows (fewer than the default 4096, so per-chunk costs "
        f"recur more often), batches of {sz.batch_size} windows of {CTX}, queue depth 2, {sz.write_repeats} "
        "alternating repeats; the last chunk's write overlaps no forward.",
        f"`write_chunk` alone (zstd + statistics + manifest, main thread): {med(walls(alone)) * 1e3:.0f} ms wall, "
        f"{med(cpus(alone)) * 1e3:.0f} ms CPU per {r1 - r0}-row chunk = {(r1 - r0) / med(walls(alone)):,.0f} "
        f"tokens/s, {(r1 - r0) / med(walls(alone)) / (tokens / min(walls(f))):,.0f}x the fastest forward-only "
        "run's rate (how much faster a forward, e.g. on a GPU, could get before this writer limits it).",
    ]
    return sec, acts


# --- 2. truncated vs full depth ------------------------------------------------------------------


def bench_depth(model_dir: Path, sz: Sizes) -> Section:
    lm = load_model(str(model_dir), dtype=torch.bfloat16, device="cpu")
    hook = "blocks.1.hook_resid_post"
    specs = parse_hooks([hook], n_layers(lm.model.config))
    windows = make_windows(lm.tokenizer, sz.depth_windows).tokens

    def truncated() -> Timer:
        with ResidualCapture(lm.model, specs) as cap, Timer() as t:
            for ids in batches(windows, sz.depth_batch):
                cap.run(ids)
        return t

    def full() -> Timer:
        with torch.inference_mode(), Timer() as t:
            for ids in batches(windows, sz.depth_batch):
                lm.model(input_ids=ids, use_cache=False)
        return t

    truncated()  # warm-up, untimed
    times = alternate({"trunc": truncated, "full": full}, sz.repeats)
    release(lm)
    del lm
    tr, fu = times["trunc"], times["full"]
    sec = Section(f"2. Truncated vs full depth (Gemma-2-2B width, {sz.full_layers} blocks, bf16)", TIMING_COLUMNS,
                  timing_rows(windows.size, [(f"ResidualCapture at {hook} (runs blocks 0-1)", tr),
                                             (f"full forward ({sz.full_layers} blocks + norm + lm_head)", fu)]))
    sec.notes += [
        f"**Truncated forward is {med(walls(fu)) / med(walls(tr)):.2f}x faster by wall time, "
        f"{med(cpus(fu)) / med(cpus(tr)):.2f}x by CPU time** (medians; no target; by weight count alone about "
        f"({sz.full_layers} blocks + lm_head of ~1 block) / 2 blocks = {(sz.full_layers + 1) / 2:.1f}x).",
        f"From the fastest run of each: {min(walls(fu)) / min(walls(tr)):.2f}x wall, "
        f"{min(cpus(fu)) / min(cpus(tr)):.2f}x CPU. {len(windows)} windows of {CTX} in batches of {sz.depth_batch}, "
        f"{sz.repeats} alternating repeats.",
    ]
    return sec


# --- 3. codecs -----------------------------------------------------------------------------------


def fp32_activations(model: str, layer: int | None, n_tokens: int, batch: int) -> tuple[str, np.ndarray]:
    """(hook, float32 (rows, d_model)) from an fp32 forward; ``layer`` None = the middle block."""
    total = n_layers(resolve_model_config(model))
    layer = total // 2 if layer is None else layer
    lm = load_model(model, dtype=torch.float32, device="cpu", keep_layers=layer + 1)
    hook = f"blocks.{layer}.hook_resid_post"
    out = []
    with ResidualCapture(lm.model, parse_hooks([hook], total)) as cap:
        for ids in batches(make_windows(lm.tokenizer, max(1, n_tokens // CTX)).tokens, batch):
            a = cap.run(ids)[hook]
            out.append(a.reshape(-1, a.shape[-1]).numpy().copy())
    release(lm)
    del lm
    return hook, np.concatenate(out)


def write_codec(acts: np.ndarray, codec: str, chunk: int, path: Path) -> tuple[Timer, int]:
    """Time to write ``acts`` chunk by chunk into a fresh zarr array, and its stored bytes."""
    arr = zarr.create_group(str(path)).create_array(
        "acts", shape=acts.shape, chunks=(chunk, acts.shape[1]), dtype=acts.dtype, fill_value=0,
        compressors=compressors_for(codec, acts.dtype.itemsize))
    with Timer() as t:
        for r0 in range(0, len(acts), chunk):
            arr[r0 : r0 + chunk] = acts[r0 : r0 + chunk]
    stored = sum(f.stat().st_size for f in (path / "acts" / "c").rglob("*") if f.is_file())
    shutil.rmtree(path)
    return t, stored


def codec_rows(model: str, source: str, logical: str, acts: np.ndarray, work: Path, repeats: int) -> list[list[str]]:
    assert acts.dtype == storage_dtype(logical)
    chunk = min(STORE_CHUNK_ROWS, len(acts))  # a short run gets no padded edge chunk
    res: dict[str, list[tuple[Timer, int]]] = {c: [] for c, _ in CODECS}
    for r in range(repeats):  # codecs interleaved, so drift hits them all alike
        for c, _ in CODECS if r % 2 == 0 else CODECS[::-1]:
            res[c].append(write_codec(acts, c, chunk, work / "codec.zarr"))
    rows = []
    for c, name in CODECS:
        stored, ts, mb = res[c][0][1], [t for t, _ in res[c]], acts.nbytes / 1e6
        rows.append([model, source, logical, name, f"{len(acts):,} / {chunk:,}", f"{stored / len(acts):,.0f}",
                     f"{acts.nbytes / stored:.3f}", f"{mb / med(walls(ts)):,.0f}", f"{mb / med(cpus(ts)):,.0f}"])
    return rows


def bench_codecs(model_dir: Path, native_bf16: np.ndarray, work: Path, sz: Sizes) -> Section:
    sec = Section("3. Codecs (zarr v3 chunks of up to 4096 rows x d_model, as the project lays them out)",
                  ["model", "activations", "dtype", "codec", "rows / chunk", "bytes/token", "ratio", "write MB/s",
                   "MB per CPU s"])
    write_codec(native_bf16, "zstd", len(native_bf16), work / "warm-up.zarr")  # untimed
    peaks = []
    for model, layer, name in ((str(model_dir), sz.write_layers - 1, "gemma2-2b-width (random)"),
                               (DEMO_MODEL, None, "smollm2-135m (trained)")):
        hook, a32 = fp32_activations(model, layer, sz.codec_tokens, sz.batch_size)
        peaks.append(f"{name} {np.abs(a32).max():,.1f}")
        for logical in ("bfloat16", "float16"):
            acts = to_storage(torch.from_numpy(a32).to(torch_dtype(logical)))
            sec.rows += codec_rows(name, f"{hook}, fp32 forward rounded", logical, acts, work, sz.repeats)
        if model == str(model_dir):
            sec.rows += codec_rows(name, f"{hook}, bf16 forward (section 1)", "bfloat16", native_bf16, work,
                                   sz.repeats)
        del a32
    sec.notes += [
        "bytes/token = stored chunk bytes / rows (uncompressed: 2 x d_model); ratio = uncompressed / stored; "
        "write MB/s = uncompressed MB / wall seconds of the chunk writes (MB per CPU s: per CPU second), "
        f"medians of {sz.repeats} fresh stores.",
        "Activations come from an fp32 forward rounded to each dtype: this CPU has no native bf16/fp16 matmul "
        "(see the GFLOPS on the machine line), so a 16k-token fp16 forward would take over an hour. "
        "The bf16-forward row (section 1's store) checks whether that shortcut changes compression.",
        "Random-weight activations can compress differently from a trained model's: hence the smollm2 rows.",
        f"Largest |activation| (float16 overflows above 65,504): {', '.join(peaks)}.",
    ]
    return sec


# --- report --------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, m: int, n: int = 1024) -> float:
    """Best of 5 (the least disturbed by other load) of a (m, n) @ (n, n) matmul."""
    a, b = torch.randn(m, n).to(dtype), torch.randn(n, n).to(dtype)
    ts = []
    for _ in range(5):
        with Timer() as t:
            a @ b
        ts.append(t.wall)
    return 2 * m * n * n / min(ts) / 1e9


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((set(ln.split(":", 1)[1].split()) for ln in info if ln.startswith("flags")), set())
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "avx512_fp16"))
    gflops = ", ".join(f"{name} {matmul_gflops(dt, m):.1f}" for name, dt, m in
                       (("fp32", torch.float32, 512), ("bf16", torch.bfloat16, 512), ("fp16", torch.float16, 32)))
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} ({isa}; matmul GFLOPS "
            f"{gflops}); device cpu; torch {torch.__version__}, zarr {zarr.__version__}, transformers "
            f"{transformers.__version__}, python {platform.python_version()}")


def to_markdown(sections: list[Section], header: list[str]) -> str:
    lines = header[:]
    for s in sections:
        lines += ["", f"### {s.title}", "", "| " + " | ".join(s.columns) + " |", "|" + "---|" * len(s.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in s.rows] + [""] + [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"


def render(console: Console, s: Section) -> None:
    table = Table(title=s.title, title_justify="left")
    for c in s.columns:
        table.add_column(c)
    for r in s.rows:
        table.add_row(*r)
    console.print(table)
    for n in s.notes:
        console.print(f"  - {n}", markup=False)


def append_report(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Benchmarks\n\nMeasured by `benchmarks/bench_extract.py`; each section is one run.\n")
    with out.open("a") as fh:
        fh.write("\n" + text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file to append the results to")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (under a minute): a smoke test")
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else DEFAULT
    transformers.utils.logging.disable_progress_bar()
    console = Console(width=None if sys.stdout.isatty() else 200)
    started, t0, loads, host = datetime.now(timezone.utc), time.perf_counter(), [os.getloadavg()[0]], machine()
    work = Path(tempfile.mkdtemp(prefix="actcache-bench-"))
    try:
        model_dir = build_gemma2_width_model(work / "gemma2-2b-width", sz.full_layers)
        console.print(f"built the {sz.full_layers}-block model in {time.perf_counter() - t0:.0f} s", markup=False)
        writer_sec, native_bf16 = bench_writer(model_dir, work, sz)
        render(console, writer_sec)
        loads.append(os.getloadavg()[0])
        depth_sec = bench_depth(model_dir, sz)
        render(console, depth_sec)
        loads.append(os.getloadavg()[0])
        codec_sec = bench_codecs(model_dir, native_bf16, work, sz)
        render(console, codec_sec)
        loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = os.cpu_count()
    header = [f"## extract benchmark, {started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}", "",
              f"- Machine: {host}", f"- Command: `{shlex.join(getattr(sys, 'orig_argv', sys.argv))}`",
              f"- Wall time: {time.perf_counter() - t0:.0f} s (model build and loads included); 1-min load average "
              f"at the start and after each section: {' / '.join(f'{x:.1f}' for x in loads)} (this run alone "
              f"keeps the {n} cores busy)"]
    if max(loads) > n + 0.5:
        header.append(f"- **Other processes competed for the {n} cores during this run: wall times are inflated "
                      "and noisy, so trust the CPU-time ratios (and the fastest-run ratios) more than wall ones.**")
    append_report(args.out, to_markdown([writer_sec, depth_sec, codec_sec], header))
    console.print(f"appended to {args.out}", markup=False)


if __name__ == "__main__":
    main()
