"""Benchmark ``actcache extract`` on CPU: writer overhead, truncated depth, storage codecs.

Run: ``python benchmarks/bench_extract.py --out docs/benchmarks.md [--quick]``.

Model: the real Gemma-2 architecture at Gemma-2-2B width (``Gemma2Config()`` defaults: d_model
2304, 8 heads of 256, MLP 9216) with few layers, vocab 32000 and seeded random weights, saved
into a temp dir with the tokenizer of ``embedded:tiny-gemma2``, and loaded through
``actcache.models.load_model`` in bfloat16. Windows come from ``embedded:stdlib-docstrings``
via ``pack_windows`` (context 128, seed 0). Model loading and tokenisation are never timed.

1. Writer overhead: ``runner.run_chunks`` (what ``extract()`` runs after setup: forward, copy-out,
   background zstd write + statistics) on a fresh ``StoreWriter.create`` store, against a
   ``ResidualCapture.run`` loop over exactly the same chunks and batches. Target <= 5%.
2. Truncated vs full depth: ``ResidualCapture`` at ``blocks.1.hook_resid_post`` (stops after
   block 1) against ``model(input_ids, use_cache=False)`` (every block, final norm, lm_head).
3. Codecs: stored bytes/token, compression ratio and write MB/s (uncompressed MB per second of
   zarr chunk writes, 4096 x d_model chunks as the project lays them out) for none, blosc-lz4
   and zstd level 1, on real activations of the random-weight model and of the trained
   ``embedded:smollm2-135m``.

Timings alternate between the variants (A B, B A, ...) and report the median of the repeats;
every ratio compares numbers measured side by side in the same run.
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
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import zarr  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from actcache.capture import ResidualCapture  # noqa: E402
from actcache.corpus import STDLIB_DATASET, iter_documents  # noqa: E402
from actcache.dtypes import storage_dtype, to_storage  # noqa: E402
from actcache.embedded import DEMO_MODEL, tiny_gemma2_path  # noqa: E402
from actcache.hooks import parse_hooks  # noqa: E402
from actcache.models import load_model, n_layers, resolve_model_config  # noqa: E402
from actcache.runner import run_chunks  # noqa: E402
from actcache.store import Layout  # noqa: E402
from actcache.store_writer import StoreWriter, compressors_for  # noqa: E402
from actcache.windows import pack_windows  # noqa: E402

CTX = 128
STORE_CHUNK_ROWS = 4096  # the project's default chunk_rows (32 windows of 128)
CODECS = (("none", "none"), ("blosc-lz4", "blosc-lz4"), ("zstd", "zstd-1 (default `zstd`)"))
WRITE_TARGET = 0.05


@dataclass(frozen=True)
class Sizes:
    full_layers: int  # depth of the random Gemma-2-width model (measurement 2)
    write_layers: int  # blocks kept for measurements 1 and 3; the hook is the last one
    write_windows: int
    write_chunk_rows: int
    batch_size: int
    depth_windows: int
    depth_batch: int
    codec_tokens: int
    repeats: int


DEFAULT = Sizes(8, 2, 16, 1024, 8, 2, 2, 16384, 3)
QUICK = Sizes(4, 2, 2, 128, 1, 1, 1, 1024, 2)


@dataclass
class Section:
    """One result table plus the notes printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- setup ---------------------------------------------------------------------------------------


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


def make_windows(tokenizer, n: int) -> np.ndarray:
    return pack_windows(iter_documents(STDLIB_DATASET), tokenizer, context_size=CTX, n_windows=n, seed=0).tokens


def batches(windows: np.ndarray, size: int):
    for b0 in range(0, len(windows), size):
        yield torch.from_numpy(windows[b0 : b0 + size].astype(np.int64))


def alternate(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each variant ``repeats`` times, flipping the order every round; each fn times itself."""
    names, out = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(fns[n]())
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_times(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


# --- 1. writer overhead --------------------------------------------------------------------------


def bench_writer(model_dir: Path, work: Path, sz: Sizes) -> tuple[Section, np.ndarray]:
    lm = load_model(str(model_dir), dtype=torch.bfloat16, device="cpu", keep_layers=sz.write_layers)
    hook = f"blocks.{sz.write_layers - 1}.hook_resid_post"
    specs = parse_hooks([hook], n_layers(lm.model.config))
    win = pack_windows(iter_documents(STDLIB_DATASET), lm.tokenizer, context_size=CTX,
                       n_windows=sz.write_windows, seed=0)
    layout = Layout.plan(len(win.tokens), CTX, False, sz.write_chunk_rows)
    d = lm.model.config.hidden_size
    stores = iter(range(10_000))

    def new_store() -> StoreWriter:
        return StoreWriter.create(work / f"write-{next(stores)}.zarr", attrs={}, layout=layout, hooks=[hook],
                                  d_model=d, logical_dtype="bfloat16", codec="zstd",
                                  windows=win.tokens, window_source=win.source)

    def forward_only() -> float:
        t0 = time.perf_counter()
        with ResidualCapture(lm.model, specs) as cap:
            for c in range(layout.n_chunks):
                w0, w1 = layout.chunk_windows(c)
                for ids in batches(win.tokens[w0:w1], sz.batch_size):
                    cap.run(ids)
        return time.perf_counter() - t0

    last: list[StoreWriter] = []

    def forward_write() -> float:
        writer = new_store()  # untimed: extract() does this during setup
        assert np.array_equal(writer.group["windows"][:], win.tokens)
        t0 = time.perf_counter()
        run_chunks(writer, lm.model, specs, writer.pending_chunks(), batch_size=sz.batch_size, queue_depth=2)
        t = time.perf_counter() - t0
        writer.finalize()  # raises unless every chunk was committed
        last[:] = [writer]
        return t

    with ResidualCapture(lm.model, specs) as cap:  # warm-up, untimed
        cap.run(next(batches(win.tokens, sz.batch_size)))
    times = alternate({"fwd": forward_only, "write": forward_write}, sz.repeats)
    acts = last[0].group[hook][:]
    r0, r1 = layout.chunk_rows_range(0)
    write_alone = []
    for _ in range(sz.repeats):  # the background thread's work per chunk, on the main thread
        w = new_store()
        t0 = time.perf_counter()
        w.write_chunk(0, {hook: acts[r0:r1]})
        write_alone.append(time.perf_counter() - t0)
    tokens = layout.n_rows
    t_fwd, t_write = med(times["fwd"]), med(times["write"])
    overhead = (t_write - t_fwd) / t_fwd
    sec = Section(f"1. Writer overhead (Gemma-2-2B width, {sz.write_layers} blocks, {hook}, bf16, zstd)",
                  ["variant", "tokens", "median s", "tokens/s", "repeats (s)"])
    sec.rows.append(["forward only (ResidualCapture loop)", str(tokens), f"{t_fwd:.2f}",
                     f"{tokens / t_fwd:.1f}", fmt_times(times["fwd"])])
    sec.rows.append(["forward + write (run_chunks)", str(tokens), f"{t_write:.2f}",
                     f"{tokens / t_write:.1f}", fmt_times(times["write"])])
    pair = [(w - f) / f for f, w in zip(times["fwd"], times["write"])]
    sec.notes += [
        f"**Overhead (t_write - t_fwd) / t_fwd = {overhead:+.1%}** (target <= {WRITE_TARGET:.0%}: "
        f"{'met' if overhead <= WRITE_TARGET else 'NOT met'}); per-repeat pairs: "
        + ", ".join(f"{p:+.1%}" for p in pair) + ".",
        f"{layout.n_chunks} chunks of {layout.chunk_rows} rows, batch {sz.batch_size} windows of {CTX}, "
        f"queue depth 2, {sz.repeats} alternating repeats; the last chunk's write is not overlapped.",
        f"`write_chunk` alone (zstd + statistics, main thread): median {med(write_alone) * 1e3:.0f} ms per "
        f"{r1 - r0}-row chunk = {(r1 - r0) / med(write_alone):,.0f} tokens/s, "
        f"{(r1 - r0) / med(write_alone) / (tokens / t_fwd):,.0f}x the forward rate.",
    ]
    del lm
    gc.collect()
    return sec, acts


# --- 2. truncated vs full depth ------------------------------------------------------------------


def bench_depth(model_dir: Path, sz: Sizes) -> Section:
    lm = load_model(str(model_dir), dtype=torch.bfloat16, device="cpu")
    hook = "blocks.1.hook_resid_post"
    specs = parse_hooks([hook], n_layers(lm.model.config))
    windows = make_windows(lm.tokenizer, sz.depth_windows)

    def truncated() -> float:
        t0 = time.perf_counter()
        with ResidualCapture(lm.model, specs) as cap:
            for ids in batches(windows, sz.depth_batch):
                cap.run(ids)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def full() -> float:
        t0 = time.perf_counter()
        for ids in batches(windows, sz.depth_batch):
            lm.model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0

    truncated()  # warm-up, untimed
    times = alternate({"trunc": truncated, "full": full}, sz.repeats)
    tokens = windows.size
    t_tr, t_full = med(times["trunc"]), med(times["full"])
    sec = Section(f"2. Truncated vs full depth (Gemma-2-2B width, {sz.full_layers} blocks, bf16)",
                  ["variant", "tokens", "median s", "tokens/s", "repeats (s)"])
    sec.rows.append([f"ResidualCapture at {hook} (blocks 0-1)", str(tokens), f"{t_tr:.2f}",
                     f"{tokens / t_tr:.1f}", fmt_times(times["trunc"])])
    sec.rows.append([f"full forward ({sz.full_layers} blocks + norm + lm_head)", str(tokens), f"{t_full:.2f}",
                     f"{tokens / t_full:.1f}", fmt_times(times["full"])])
    sec.notes += [
        f"**Speed-up of the truncated forward: {t_full / t_tr:.2f}x** (no target; compute alone would "
        f"give about ({sz.full_layers} blocks + tied lm_head) / 2 blocks).",
        f"{len(windows)} windows of {CTX} in batches of {sz.depth_batch}, {sz.repeats} alternating repeats.",
    ]
    del lm
    gc.collect()
    return sec


# --- 3. codecs -----------------------------------------------------------------------------------


def fp32_activations(model: str, hook_layer: int | None, n_tokens: int, batch: int) -> tuple[str, np.ndarray]:
    """(hook, float32 (rows, d_model)) from an fp32 forward; hook_layer None = middle block."""
    cfg_layers = n_layers(resolve_model_config(model))
    layer = cfg_layers // 2 if hook_layer is None else hook_layer
    lm = load_model(model, dtype=torch.float32, device="cpu", keep_layers=layer + 1)
    hook = f"blocks.{layer}.hook_resid_post"
    specs = parse_hooks([hook], cfg_layers)
    windows = make_windows(lm.tokenizer, max(1, n_tokens // CTX))
    out = []
    with ResidualCapture(lm.model, specs) as cap:
        for ids in batches(windows, batch):
            a = cap.run(ids)[hook]
            out.append(a.reshape(-1, a.shape[-1]).float().numpy())
    del lm
    gc.collect()
    return hook, np.concatenate(out)


def as_storage(acts32: np.ndarray, logical: str) -> np.ndarray:
    return to_storage(torch.from_numpy(acts32).to({"bfloat16": torch.bfloat16, "float16": torch.float16}[logical]))


def write_codec(acts: np.ndarray, codec: str, path: Path) -> tuple[float, int]:
    """Seconds to write ``acts`` chunk by chunk into a fresh zarr array, and its stored bytes."""
    g = zarr.create_group(str(path))
    arr = g.create_array("acts", shape=acts.shape, chunks=(STORE_CHUNK_ROWS, acts.shape[1]), dtype=acts.dtype,
                         compressors=compressors_for(codec, acts.dtype.itemsize), fill_value=0)
    t0 = time.perf_counter()
    for r0 in range(0, len(acts), STORE_CHUNK_ROWS):
        arr[r0 : r0 + STORE_CHUNK_ROWS] = acts[r0 : r0 + STORE_CHUNK_ROWS]
    t = time.perf_counter() - t0
    stored = sum(f.stat().st_size for f in (path / "acts" / "c").rglob("*") if f.is_file())
    shutil.rmtree(path)
    return t, stored


def codec_rows(label: str, source: str, logical: str, acts: np.ndarray, work: Path, repeats: int) -> list[list[str]]:
    assert acts.dtype == storage_dtype(logical)
    raw = acts.nbytes
    results: dict[str, list[tuple[float, int]]] = {c: [] for c, _ in CODECS}
    for r in range(repeats):  # codecs interleaved, so drift hits them all alike
        for c, _ in CODECS if r % 2 == 0 else CODECS[::-1]:
            results[c].append(write_codec(acts, c, work / f"codec-{c}.zarr"))
    rows = []
    for c, name in CODECS:
        stored = results[c][0][1]
        t = med([t for t, _ in results[c]])
        rows.append([label, source, logical, name, f"{len(acts):,}", f"{stored / len(acts):,.0f}",
                     f"{raw / stored:.3f}", f"{raw / 1e6 / t:,.0f}"])
    return rows


def bench_codecs(model_dir: Path, native_bf16: np.ndarray, work: Path, sz: Sizes) -> Section:
    sec = Section("3. Codecs (zarr v3 chunks of 4096 rows x d_model)",
                  ["model", "activations", "dtype", "codec", "rows", "bytes/token", "ratio", "write MB/s"])
    rnd = "gemma2-2b-width random"
    hook, g32 = fp32_activations(str(model_dir), sz.write_layers - 1, sz.codec_tokens, sz.batch_size)
    for logical in ("bfloat16", "float16"):
        sec.rows += codec_rows(rnd, f"{hook}, fp32 fwd rounded", logical, as_storage(g32, logical), work, sz.repeats)
    sec.rows += codec_rows(rnd, f"{hook}, native bf16 fwd (sec. 1)", "bfloat16", native_bf16, work, sz.repeats)
    del g32
    hook, s32 = fp32_activations(DEMO_MODEL, None, sz.codec_tokens, sz.batch_size)
    for logical in ("bfloat16", "float16"):
        sec.rows += codec_rows("smollm2-135m trained", f"{hook}, fp32 fwd rounded", logical,
                               as_storage(s32, logical), work, sz.repeats)
    sec.notes += [
        "bytes/token = stored chunk bytes / rows (uncompressed: 2 x d_model); ratio = uncompressed / stored; "
        f"write MB/s = uncompressed MB / seconds of the chunk writes, median of {sz.repeats} fresh stores.",
        "Activations come from an fp32 forward rounded to each dtype: on this CPU an fp16 matmul is ~100x slower "
        "than fp32 and bf16 ~5x slower, so native fp16 forwards are out of reach. The native-bf16 row "
        "(section 1's store) checks that rounding changes the compressibility little.",
        "Random-weight activations may compress differently from a trained model's; hence the smollm2 rows.",
    ]
    return sec


# --- report --------------------------------------------------------------------------------------


def machine() -> str:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "avx512_fp16"))
    return (f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}; {isa}); "
            f"device cpu; torch {torch.__version__}, zarr {zarr.__version__}, transformers "
            f"{transformers.__version__}, python {platform.python_version()}")


def to_markdown(sections: list[Section], header: list[str]) -> str:
    lines = header[:]
    for s in sections:
        lines += ["", f"### {s.title}", "", "| " + " | ".join(s.columns) + " |",
                  "|" + "---|" * len(s.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in s.rows]
        lines += [""] + [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"


def render(console: Console, s: Section) -> None:
    t = Table(title=s.title, title_justify="left")
    for c in s.columns:
        t.add_column(c)
    for r in s.rows:
        t.add_row(*r)
    console.print(t)
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
    ap.add_argument("--quick", action="store_true", help="tiny sizes, about a minute: a smoke test")
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else DEFAULT
    transformers.utils.logging.disable_progress_bar()
    console, started, t0 = Console(), datetime.now(timezone.utc), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="actcache-bench-"))
    try:
        model_dir = build_gemma2_width_model(work / "gemma2-2b-width", sz.full_layers)
        console.print(f"model built in {time.perf_counter() - t0:.0f} s", markup=False)
        writer_sec, native_bf16 = bench_writer(model_dir, work, sz)
        render(console, writer_sec)
        depth_sec = bench_depth(model_dir, sz)
        render(console, depth_sec)
        codec_sec = bench_codecs(model_dir, native_bf16, work, sz)
        render(console, codec_sec)
        sections = [writer_sec, depth_sec, codec_sec]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    header = [f"## extract benchmark, {started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}", "",
              f"- Machine: {machine()}",
              f"- Command: `{shlex.join(getattr(sys, 'orig_argv', sys.argv))}`",
              f"- Wall time: {wall:.0f} s (model build and loads included)"]
    append_report(args.out, to_markdown(sections, header))
    console.print(f"appended to {args.out} ({wall:.0f} s)", markup=False)


if __name__ == "__main__":
    main()
